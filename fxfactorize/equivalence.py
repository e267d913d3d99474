"""`check_equivalence`: does a candidate model compute what the reference does? Hypothesis decides.

Hypothesis draws inputs shaped after the example inputs (other batch sizes, value distributions,
magnitudes, special rows; integer inputs keep their range), runs both models in eval mode under
``torch.no_grad()``, compares every output leaf by nmse and max abs error, and shrinks any failure to
a small counterexample, raised as :class:`EquivalenceError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import hypothesis
import torch
from hypothesis import HealthCheck
from torch import nn

from fxfactorize.testing.inputs import describe_inputs, inputs_for, probe_dtypes

__all__ = [
    "EquivalenceError",
    "Tolerance",
    "check_equivalence",
    "compare_outputs",
    "default_tolerance",
]

log = logging.getLogger("fxfactorize")

# Outputs whose nmse is below this agree to about 4 significant digits: float32 round-off of the
# rewritten graph (a different summation order) stays orders of magnitude below it.
EXACT_NMSE = 1e-8
# Per-element slack, relative to the largest reference magnitude, for outputs with ~zero variance.
EXACT_MAX_ABS = 1e-4
# Multiples of the output dtype's machine epsilon allowed as RMS error for float16/bfloat16 outputs.
DTYPE_SLACK = 30.0
# A layer counts as truncated when its reported nmse exceeds this (SVD round-off is ~1e-14).
TRUNCATION_NMSE = 1e-10
# Fallback only (a truncated layer with no counterpart in the reference): layer errors add up in RMS
# terms along the graph and later layers can amplify them, hence this much headroom.
MARGIN = 10.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a candidate's output may be from the reference's, per output tensor.

    An output passes if its ``nmse`` (mean squared error / variance of the reference output) is at
    most ``nmse``, or if every element is within ``max_abs · max(1, max|reference|)`` (for outputs
    with ~zero variance, where nmse means nothing).

    >>> Tolerance(nmse=1e-3).nmse
    0.001
    >>> Tolerance(nmse=-1)
    Traceback (most recent call last):
    ...
    ValueError: Tolerance.nmse must be a number >= 0; got -1
    """

    nmse: float = EXACT_NMSE
    max_abs: float = EXACT_MAX_ABS
    #: widen ``nmse`` to ``(30 · eps)²`` for outputs in a dtype coarser than float32 (float16 and
    #: bfloat16 round-off alone exceeds the float32 default)
    dtype_aware: bool = True

    def nmse_for(self, dtype: torch.dtype) -> float:
        """The nmse limit for an output of ``dtype``.

        >>> Tolerance().nmse_for(torch.float32), round(Tolerance().nmse_for(torch.bfloat16), 3)
        (1e-08, 0.055)
        """
        if not self.dtype_aware or not dtype.is_floating_point:
            return self.nmse
        eps = torch.finfo(dtype).eps
        coarse = eps > torch.finfo(torch.float32).eps
        return max(self.nmse, (DTYPE_SLACK * eps) ** 2) if coarse else self.nmse

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_aware, bool):
            raise ValueError(f"Tolerance.dtype_aware must be a bool; got {self.dtype_aware!r}")
        for name in ("nmse", "max_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Tolerance.{name} must be a number >= 0; got {value!r}")


class EquivalenceError(AssertionError):
    """The candidate disagrees with the reference; the message holds the shrunk falsifying input.

    Attributes: ``inputs`` (the falsifying inputs), ``path`` (the offending output, e.g.
    ``output[1]``), ``nmse`` and ``max_abs`` (its errors; ``nan`` where the candidate raised).
    """

    def __init__(
        self, message: str, inputs: Any = None, path: str = "", nmse: float = math.nan,
        max_abs: float = math.nan,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.inputs, self.path, self.nmse, self.max_abs = inputs, path, nmse, max_abs


@dataclasses.dataclass
class Mismatch:
    """One output leaf that failed the comparison."""

    path: str
    nmse: float
    max_abs: float
    detail: str


def _leaf_errors(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    ref, cand = reference.detach().double(), candidate.detach().double()
    both_nonfinite = ~torch.isfinite(ref) & ~torch.isfinite(cand)
    same_special = both_nonfinite & ((ref == cand) | (torch.isnan(ref) & torch.isnan(cand)))
    if bool((~torch.isfinite(ref) ^ ~torch.isfinite(cand)).any()) or not bool(
        same_special[both_nonfinite].all()
    ):
        return math.inf, math.inf
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0, 0.0
    diff = (ref - cand)[finite]
    mse, max_abs = float(diff.pow(2).mean()), float(diff.abs().max())
    variance = float(ref[finite].var(unbiased=False)) if int(finite.sum()) > 1 else 0.0
    nmse = mse / variance if variance > 0 else (0.0 if mse == 0 else math.inf)
    return nmse, max_abs


def compare_outputs(
    reference: Any, candidate: Any, tolerance: Tolerance, path: str = "output"
) -> Mismatch | None:
    """The first output leaf where ``candidate`` is out of ``tolerance``, or ``None``.

    Walks tensors, tuples, lists, dicts (including ``ModelOutput``-style mappings) and dataclasses;
    other leaves must be equal.

    >>> a = (torch.ones(3), {"x": torch.arange(4.0)})
    >>> b = (torch.ones(3), {"x": torch.arange(4.0) + 1})
    >>> compare_outputs(a, b, Tolerance()).path
    "output[1]['x']"
    >>> compare_outputs(a, a, Tolerance()) is None
    True
    """
    if isinstance(reference, torch.Tensor):
        if not isinstance(candidate, torch.Tensor):
            return Mismatch(path, math.inf, math.inf, f"tensor vs {type(candidate).__name__}")
        if reference.shape != candidate.shape:
            detail = f"shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}"
            return Mismatch(path, math.inf, math.inf, detail)
        nmse, max_abs = _leaf_errors(reference, candidate)
        scale = (
            float(reference.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
            if reference.numel()
            else 0.0
        )
        limit = tolerance.nmse_for(reference.dtype)
        if nmse <= limit or max_abs <= tolerance.max_abs * max(1.0, scale):
            return None
        return Mismatch(path, nmse, max_abs, f"nmse {nmse:.3g} > {limit:.3g}")
    if dataclasses.is_dataclass(reference) and not isinstance(reference, type):
        if type(candidate) is not type(reference):
            return Mismatch(
                path,
                math.inf,
                math.inf,
                f"{type(candidate).__name__} vs {type(reference).__name__}",
            )
        pairs = [
            (f"{path}.{f.name}", getattr(reference, f.name), getattr(candidate, f.name))
            for f in dataclasses.fields(reference)
        ]
    elif isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping) or list(candidate) != list(reference):
            got = list(candidate) if isinstance(candidate, Mapping) else type(candidate).__name__
            return Mismatch(path, math.inf, math.inf, f"keys {got}, expected {list(reference)}")
        pairs = [(f"{path}[{key!r}]", reference[key], candidate[key]) for key in reference]
    elif isinstance(reference, (tuple, list)):
        if not isinstance(candidate, (tuple, list)) or len(candidate) != len(reference):
            return Mismatch(
                path,
                math.inf,
                math.inf,
                f"{candidate!r:.60} does not match a {type(reference).__name__} of {len(reference)}",
            )
        pairs = [
            (f"{path}[{i}]", r, c)
            for i, (r, c) in enumerate(zip(reference, candidate, strict=True))
        ]
    else:
        return (
            None
            if reference == candidate
            else Mismatch(path, math.inf, math.inf, f"{candidate!r} != {reference!r}")
        )
    for sub_path, ref, cand in pairs:
        mismatch = compare_outputs(ref, cand, tolerance, sub_path)
        if mismatch is not None:
            return mismatch
    return None


def _report_of(candidate: nn.Module) -> Any:
    meta = getattr(candidate, "meta", None)
    return meta.get("fxfactorize") if isinstance(meta, dict) else None


def _truncated_layers(candidate: nn.Module) -> list[Any]:
    report = _report_of(candidate)
    if report is None:
        return []
    return [r for r in report.layers if r.factorized and (r.nmse or 0.0) > TRUNCATION_NMSE]


def default_tolerance(candidate: nn.Module) -> Tolerance:
    """The end-to-end tolerance implied by ``candidate``'s report alone.

    Exact-ish (:data:`EXACT_NMSE`) unless ``candidate.meta["fxfactorize"]`` reports a truncated
    layer; then ``MARGIN · (Σ_l √nmse_l)²`` over the reported per-layer errors. A heuristic:
    :func:`check_equivalence` uses it only for truncated layers it cannot find in the reference.

    >>> import fxfactorize as ff
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> default_tolerance(ff.transform(model, torch.randn(2, 8), min_features=1, latent_features=2, progress=False)).nmse > 1e-3
    True
    >>> default_tolerance(model).nmse
    1e-08
    """
    truncated = _truncated_layers(candidate)
    if not truncated:
        return Tolerance()
    return Tolerance(nmse=EXACT_NMSE + MARGIN * sum(math.sqrt(r.nmse) for r in truncated) ** 2)


def _weight_dtype(layer: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in layer.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


def _effective_weight(module: nn.Module) -> torch.Tensor | None:
    from fxfactorize.methods.lowrank import (
        grouped_weight,  # methods import modules; keep import light
    )

    try:
        return grouped_weight(module)[0].detach().double()
    except (AttributeError, RuntimeError, TypeError):
        return None


def _shared(reference: nn.Module, candidate: nn.Module, target: str) -> bool:
    try:
        return reference.get_submodule(target) is candidate.get_submodule(target)
    except AttributeError:
        return False


def _check_layers_match_report(reference: nn.Module, candidate: nn.Module, truncated: list) -> dict:
    """``{target: (reference layer, candidate layer)}``; raise if a layer's weight error exceeds its report.

    The data-free report's nmse is the relative squared weight error ‖W - Ŵ‖²/‖W‖²: a factorized
    layer whose weights were altered after solving would otherwise hide inside the truncation bound.
    """
    pairs = {}
    for record in truncated:
        try:
            ref_layer = reference.get_submodule(record.target)
            cand_layer = candidate.get_submodule(record.target)
        except AttributeError:
            continue  # reference laid out differently: the end-to-end bound still applies
        if ref_layer is cand_layer:
            continue  # transformed in place: the reference already runs the candidate's layer
        pairs[record.target] = (ref_layer, cand_layer)
        if record.nmse_source != "weights":
            continue  # calibrated errors are exact only on the calibration data, which we lack
        w_ref, w_cand = _effective_weight(ref_layer), _effective_weight(cand_layer)
        if w_ref is None or w_cand is None or w_ref.shape != w_cand.shape:
            continue
        energy = float(w_ref.pow(2).sum())
        error = float((w_ref - w_cand).pow(2).sum()) / energy if energy > 0 else 0.0
        # slack: float64 solve vs. the layer's dtype (the factors are rounded to it after solving)
        rounding = (2 * torch.finfo(_weight_dtype(cand_layer)).eps) ** 2
        if error > record.nmse * (1 + 1e-3) + 1e-7 + rounding:
            raise EquivalenceError(
                f"layer {record.target!r} (node {record.node!r}) does not match its report: relative "
                f"squared weight error {error:.3g}, reported nmse {record.nmse:.3g}",
                path=record.target,
                nmse=error,
            )
    return pairs


@contextlib.contextmanager
def _substituted(pairs: dict) -> Iterator[None]:
    """While active, each paired reference layer returns what its candidate layer computes.

    The reference then runs its own graph with the candidate's (truncated) layers in place: the
    candidate must match that exactly, so any fault outside the factorized layers shows.
    """

    def hook_for(candidate_layer: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return candidate_layer(*args)

        return hook

    handles = [ref.register_forward_hook(hook_for(cand)) for ref, cand in pairs.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _validate(max_examples: Any, seed: Any, batch_dim: Any, tolerance: Any) -> None:
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an int >= 1; got {max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None; got {seed!r}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"batch_dim must be an int >= 0; got {batch_dim!r}")
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise TypeError(f"tolerance must be a Tolerance or None; got {type(tolerance).__name__}")


def check_equivalence(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    tolerance: Tolerance | None = None,
    max_examples: int = 50,
    seed: int | None = None,
    batch_dim: int = 0,
) -> None:
    """Raise :class:`EquivalenceError` unless ``candidate`` computes what ``reference`` does.

    Hypothesis draws up to ``max_examples`` inputs shaped after ``example_inputs`` (a tensor, a tuple
    of positional inputs or a dict of keyword inputs): batch sizes from 1 to beyond the example's
    along ``batch_dim``, normal/uniform/heavy-tailed/constant values, magnitudes from 1e-3 to 1e3
    times the example's, all-zero rows, and float32 / float64 / the example's dtype where both
    models accept it; integer and bool inputs keep the example's value range. Both models run in eval mode under ``torch.no_grad()``
    (their modes are restored); neither is changed. A failing input is shrunk, and the error names
    its shapes, the offending output path (``output[1]['logits']``) and its nmse / max abs error.

    ``tolerance=None`` compares exactly (nmse ≤ 1e-8, float32 round-off) when no layer was
    truncated. When ``candidate.meta["fxfactorize"]`` reports truncated layers, the check has two
    parts: each data-free layer's weight error ``‖W - Ŵ‖²/‖W‖²`` must not exceed its reported
    nmse (the error the report predicts), and the candidate must match, exactly, the reference run
    with those truncated layers substituted (so any fault elsewhere shows, however lossy the
    truncation). An explicit ``tolerance`` compares with the reference directly. ``seed`` makes
    the draw deterministic; a drawn input on which the reference itself raises is discarded.
    Called inside a ``@given`` test, the inputs are drawn from that test's data (no nested search;
    ``seed`` is then ignored), so Hypothesis shrinks the model and the inputs together.

    >>> import fxfactorize as ff
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> gm = ff.transform(model, torch.randn(3, 16), min_features=1, latent_features=16, progress=False)
    >>> check_equivalence(model, gm, torch.randn(3, 16), max_examples=10, seed=0)
    >>> broken = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> check_equivalence(model, broken, torch.randn(3, 16), max_examples=10, seed=0)
    Traceback (most recent call last):
    ...
    fxfactorize.equivalence.EquivalenceError: candidate differs from reference at output: ...
    """
    for name, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")
    _validate(max_examples, seed, batch_dim, tolerance)
    truncated = _truncated_layers(candidate) if tolerance is None else []
    pairs = _check_layers_match_report(reference, candidate, truncated) if truncated else {}
    if tolerance is not None:
        fixed = tolerance
    elif len(pairs) == len(truncated) or all(
        _shared(reference, candidate, r.target) for r in truncated if r.target not in pairs
    ):
        fixed = Tolerance()  # truncated layers are substituted into the reference: compare exactly
    else:  # some truncated layer has no counterpart in the reference: the report's bound instead
        fixed = default_tolerance(candidate)

    rejected = [0]
    nested = hypothesis.currently_in_test_context()

    def failure(inputs: Any, drawn: bool = True) -> tuple[Mismatch | None, Tolerance]:
        with _evaluating(reference, candidate):
            try:
                with _substituted(pairs):
                    expected = _call(reference, inputs)
            except Exception:
                if not drawn:
                    raise  # the caller's own example must run: let them see why it does not
                rejected[0] += 1
                if nested:  # skip it: rejecting would discard the caller's whole example
                    return None, fixed
                hypothesis.reject()  # inputs the reference itself refuses say nothing
            try:
                got = _call(candidate, inputs)
            except Exception as error:  # a candidate that raises where the reference did not fails
                return Mismatch(
                    "output",
                    math.nan,
                    math.nan,
                    f"candidate raised {type(error).__name__}: {error}",
                ), fixed
        return compare_outputs(expected, got, fixed), fixed

    # The example itself first: a plain failure there needs no search.
    outcome = failure(example_inputs, drawn=False)
    if outcome[0] is not None:
        _raise(example_inputs, *outcome)

    accepted = probe_dtypes(candidate, example_inputs, _call)
    dtypes = [d for d in probe_dtypes(reference, example_inputs, _call) if d in accepted]
    strategy = inputs_for(example_inputs, batch_dim=batch_dim, dtypes=dtypes)
    if nested:
        # Inside a @given test: draw from the caller's data instead of starting a nested search,
        # so Hypothesis shrinks the caller's example and these inputs together.
        data = hypothesis.control.current_build_context().data
        for _ in range(max_examples):
            inputs = data.draw(strategy)
            outcome = failure(inputs)
            if outcome[0] is not None:
                _raise(inputs, *outcome)
        return
    base = hypothesis.settings.default
    settings = hypothesis.settings(
        base,
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    try:
        counterexample = hypothesis.find(
            strategy,
            lambda inputs: failure(inputs)[0] is not None,
            settings=settings,
            random=None if seed is None else random.Random(seed),
        )
    except hypothesis.errors.NoSuchExample:
        return
    except hypothesis.errors.Unsatisfiable as error:
        raise ValueError(
            f"the reference model raised on every drawn input ({rejected[0]} tried); check that "
            f"batch_dim={batch_dim} is the batch dimension of example_inputs"
        ) from error
    _raise(counterexample, *failure(counterexample, drawn=False))


def _raise(inputs: Any, mismatch: Mismatch | None, tolerance: Tolerance) -> None:
    if mismatch is None:  # flaky: the shrunk input passes on re-run
        raise EquivalenceError(
            f"candidate differs from reference only intermittently on {describe_inputs(inputs)}",
            inputs,
        )
    raise EquivalenceError(
        f"candidate differs from reference at {mismatch.path}: {mismatch.detail} "
        f"(nmse {mismatch.nmse:.3g}, max abs error {mismatch.max_abs:.3g}; tolerance nmse "
        f"{tolerance.nmse:.3g}, max_abs {tolerance.max_abs:.3g})\n"
        f"falsifying input: {describe_inputs(inputs)}",
        inputs, mismatch.path, mismatch.nmse, mismatch.max_abs,
    )  # fmt: skip
