"""`inputs_for`: Hypothesis strategy of model inputs shaped after example inputs.

Below :mod:`fxfactorize.equivalence`, which draws from it; :mod:`fxfactorize.testing.inputs`
re-exports it for downstream test suites."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from fxfactorize.calling import evaluation_mode

__all__ = ["describe_inputs", "inputs_for", "probe_dtypes"]

# How drawn float values are distributed; the first is where Hypothesis shrinks to.
VALUE_KINDS = ("normal", "uniform", "heavy_tailed", "constant", "sparse", "example_like")


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, torch.Tensor)]
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs; got {type(inputs).__name__}"
    )


def _map(inputs: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: fn(value) for key, value in inputs.items()}
    return type(inputs)(fn(value) for value in inputs)


def _float_values(
    example: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, kind: str, log_scale: int,
    zero_rows: bool, batch_dim: int, gen: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    ex = example.detach().double().cpu()
    spread = float(ex.std()) if ex.numel() > 1 else 0.0
    spread = spread if spread > 0 and spread == spread else 1.0
    centre = float(ex.mean()) if ex.numel() else 0.0
    scale = spread * 10.0**log_scale
    if kind == "normal":
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "uniform":
        noise = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    elif kind == "heavy_tailed":  # ratio of normals: Cauchy, clipped so float16 stays finite
        ratio = torch.randn(shape, generator=gen, dtype=torch.float64) / (
            torch.randn(shape, generator=gen, dtype=torch.float64).abs() + 1e-2
        )
        noise = ratio.clamp(-100, 100)
    elif kind == "constant":
        noise = torch.full(shape, float(torch.randn(1, generator=gen)), dtype=torch.float64)
    elif kind == "sparse":
        keep = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.1
        noise = torch.randn(shape, generator=gen, dtype=torch.float64) * keep
    else:  # example rows, resampled along the batch dimension, plus a little noise
        rows = ex.movedim(batch_dim, 0) if ex.dim() > batch_dim else ex.unsqueeze(0)
        picks = torch.randint(0, rows.shape[0], (shape[batch_dim] if shape else 1,), generator=gen)
        chosen = rows[picks].movedim(0, batch_dim) if ex.dim() > batch_dim else rows[0]
        noise = (chosen.reshape(shape) - centre) / spread + 0.01 * torch.randn(
            shape, generator=gen, dtype=torch.float64
        )
    values = centre + scale * noise
    if zero_rows and len(shape) > batch_dim and shape[batch_dim] > 0:
        rows = torch.rand(shape[batch_dim], generator=gen) < 0.5
        rows[0] = True  # at least one all-zero row
        index = [slice(None)] * len(shape)
        index[batch_dim] = rows
        values[tuple(index)] = 0.0
    return values.to(dtype=dtype, device=example.device)


def _integer_values(
    example: torch.Tensor, shape: Sequence[int], gen: torch.Generator
) -> torch.Tensor:
    if example.dtype == torch.bool:
        return (torch.rand(shape, generator=gen) < 0.5).to(example.device)
    low = int(example.min()) if example.numel() else 0
    high = int(example.max()) if example.numel() else 0
    drawn = torch.randint(low, high + 1, tuple(shape), generator=gen, dtype=torch.int64)
    return drawn.to(dtype=example.dtype, device=example.device)


@st.composite
def _one_tensor(
    draw: st.DrawFn, example: torch.Tensor, batch: int | None, batch_dim: int,
    dtypes: Sequence[torch.dtype],
) -> torch.Tensor:  # fmt: skip
    shape = list(example.shape)
    if batch is not None:
        shape[batch_dim] = batch
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if not example.is_floating_point():
        return _integer_values(example, shape, gen)
    dtype = draw(st.sampled_from(list(dtypes) or [example.dtype]))
    kind = draw(st.sampled_from(VALUE_KINDS))
    log_scale = draw(st.integers(-3, 3))  # magnitudes 1e-3..1e3 of the example's spread
    zero_rows = draw(st.booleans())
    return _float_values(example, shape, dtype, kind, log_scale, zero_rows, batch_dim, gen)


def inputs_for(
    example_inputs: Any,
    *,
    batch_dim: int = 0,
    max_batch: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> st.SearchStrategy:
    """Hypothesis strategy of inputs with the structure of ``example_inputs`` (tensor, tuple, dict).

    Tensors whose size along ``batch_dim`` equals the first tensor's share one drawn batch size
    (1 to ``max_batch``, default ``max(8, 4 × the example's)``); other dimensions are kept. Float
    tensors get normal, uniform, heavy-tailed, constant, sparse or example-like values scaled 1e-3 to
    1e3 times the example's spread, sometimes with all-zero rows, in one of ``dtypes`` (default: the
    example's dtype). Integer tensors stay within the example's [min, max] (token ids, masks); bool
    tensors stay bool; anything else is passed through unchanged.

    >>> from hypothesis import find
    >>> ids = torch.tensor([[3, 7, 1], [0, 2, 2]])
    >>> drawn = find(inputs_for((torch.randn(2, 5), ids)), lambda x: x[0].shape[0] > 3)
    >>> tuple(drawn[0].shape), tuple(drawn[1].shape), bool(drawn[1].max() <= 7)
    ((4, 5), (4, 3), True)
    """
    tensors = _tensors(example_inputs)
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"batch_dim must be an int >= 0; got {batch_dim!r}")
    batched = [t for t in tensors if t.dim() > batch_dim]
    example_batch = batched[0].shape[batch_dim] if batched else None
    if max_batch is None:
        max_batch = max(8, 4 * (example_batch or 1))
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1; got {max_batch!r}")
    dtypes = tuple(dtypes) if dtypes else ()

    @st.composite
    def drawn(draw: st.DrawFn) -> Any:
        batch = draw(st.integers(1, max_batch)) if example_batch is not None else None

        def one(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            same = value.dim() > batch_dim and value.shape[batch_dim] == example_batch
            return draw(_one_tensor(value, batch if same else None, batch_dim, dtypes))

        return _map(example_inputs, one)

    return drawn()


def probe_dtypes(model: torch.nn.Module, example_inputs: Any, call: Callable) -> list[torch.dtype]:
    """Float dtypes (of float32, float64 and the example's) that ``model`` runs on; example's first.

    >>> probe_dtypes(torch.nn.Linear(3, 2), torch.ones(1, 3), lambda m, x: m(x))
    [torch.float32]
    """
    floats = [t for t in _tensors(example_inputs) if t.is_floating_point()]
    if not floats:
        return []
    candidates = [floats[0].dtype] + [
        d for d in (torch.float32, torch.float64) if d != floats[0].dtype
    ]
    accepted = []
    with evaluation_mode(model), torch.no_grad():
        for dtype in candidates:
            cast = _map(
                example_inputs,
                lambda v, d=dtype: (
                    v.to(d) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                ),
            )
            try:
                call(model, cast)
            except Exception:
                continue
            accepted.append(dtype)
    return accepted


def describe_inputs(inputs: Any) -> str:
    """Shapes, dtypes and value ranges of ``inputs``, for error messages.

    >>> describe_inputs((torch.zeros(2, 3), 5))
    '(tensor[2, 3] float32 in [0, 0] with 2 all-zero row(s), 5)'
    """

    def one(value: Any) -> str:
        if not isinstance(value, torch.Tensor):
            return repr(value)
        text = f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        if value.numel():
            as_double = value.detach().double()
            text += f" in [{float(as_double.min()):.3g}, {float(as_double.max()):.3g}]"
            if value.dim() > 1:
                zero = int((as_double.flatten(1) == 0).all(dim=1).sum())
                text += f" with {zero} all-zero row(s)" if zero else ""
        return text

    if isinstance(inputs, torch.Tensor):
        return one(inputs)
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    return "(" + ", ".join(one(v) for v in inputs) + ")"
