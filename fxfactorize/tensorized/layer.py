"""`FactorizedLinear`: TensorLy-Torch's tensorized Linear, with a fast forward.

Names, arguments and defaults follow ``tltorch.FactorizedLinear`` so that porting is an import
change. Differences are in speed and memory: the ``'factorized'`` forward contracts the input with
the factors in the order with the fewest multiply-adds (see :mod:`.contract`), ``'reconstructed'``
builds the dense weight by the cheapest route, ``'auto'`` picks per call, and in ``eval()`` mode
without autograd the dense weight is cached (rebuilt when a factor changes), so inference costs
what ``nn.Linear`` costs.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fxfactorize.tensorized.contract import (
    ContractionPlan,
    _is_compiling,
    cheapest_order,
    contract,
)
from fxfactorize.tensorized.decompose import decompose
from fxfactorize.tensorized.ranks import resolve_ranks
from fxfactorize.tensorized.structure import Structure, normalize_factorization
from fxfactorize.tensorized.tensorize import tensorize_features, validate_tensorized_features

__all__ = [
    "IMPLEMENTATIONS",
    "FactorizedLinear",
    "choose_implementation",
    "forward_macs",
    "plan_forward",
]

log = logging.getLogger("fxfactorize")

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")


def _assume_constant_result(function):
    """What ``torch.compiler.assume_constant_result`` does, without importing the compiler (3 s)
    at import time: torch.compile then calls ``function`` while tracing instead of tracing it."""
    function._dynamo_marked_constant = True
    return function


_PLANS: dict[tuple[Structure, int], tuple[ContractionPlan, ContractionPlan]] = {}


@_assume_constant_result  # torch.compile calls it at trace time instead of tracing the search
def plan_forward(structure: Structure, batch: int) -> tuple[ContractionPlan, ContractionPlan]:
    """Cheapest contraction plans of one layer of ``structure`` for ``batch`` input rows:
    ``(input with factors → output, factors → dense [out, in] weight)``.

    >>> from fxfactorize.tensorized.ranks import resolve_ranks
    >>> factorized, reconstructed = plan_forward(resolve_ranks("tt", (8, 8), (8, 8), 2), 1)
    >>> factorized.macs < reconstructed.macs
    True
    """
    # a dict, not functools.lru_cache: the compiler traces through lru_cache wrappers
    key = (structure, batch)
    if key not in _PLANS:
        if len(_PLANS) > 4096:  # many distinct batch sizes: start over rather than grow
            _PLANS.clear()
        _PLANS[key] = _plan_forward(structure, batch)
    return _PLANS[key]


def _plan_forward(structure: Structure, batch: int) -> tuple[ContractionPlan, ContractionPlan]:
    terms = tuple(tuple(x for x in labels if x != "l") for _, labels in structure.factors())
    sizes = {**structure.mode_sizes, **structure.rank_sizes, "b": batch}
    sizes.pop("l", None)
    ins = tuple(f"i{k}" for k in range(len(structure.in_modes)))
    outs = tuple(f"o{k}" for k in range(len(structure.out_modes)))
    key = tuple(sorted(sizes.items()))
    factorized = cheapest_order((("b", *ins), *terms), ("b", *outs), key)
    reconstructed = cheapest_order(terms, (*outs, *ins), key)
    return factorized, reconstructed


# Many small batched contractions run at roughly half the rate of one large GEMM on CPU, so
# 'auto' picks 'factorized' only when it needs under half the MACs of 'reconstructed'.
FACTORIZED_MAC_WEIGHT = 2.0


def choose_implementation(structure: Structure, batch: int) -> str:
    """What ``implementation='auto'`` runs for ``batch`` rows: the cheaper, counted in MACs.

    >>> from fxfactorize.tensorized.ranks import resolve_ranks
    >>> choose_implementation(resolve_ranks("tt", (8, 8), (8, 8), 2), 4)
    'factorized'
    """
    factorized, reconstructed = plan_forward(structure, batch)
    dense = reconstructed.macs + batch * math.prod(structure.in_modes) * math.prod(
        structure.out_modes
    )
    return "factorized" if FACTORIZED_MAC_WEIGHT * factorized.macs < dense else "reconstructed"


def forward_macs(structure: Structure, batch: int, implementation: str = "auto") -> int:
    """Multiply-adds of one forward of ``batch`` rows (bias excluded) with ``implementation``.

    >>> from fxfactorize.tensorized.ranks import resolve_ranks
    >>> s = resolve_ranks("tt", (8, 8), (8, 8), 4)
    >>> forward_macs(s, 1, "factorized") < forward_macs(s, 1, "reconstructed")
    True
    """
    if implementation == "auto":
        implementation = choose_implementation(structure, batch)
    factorized, reconstructed = plan_forward(structure, batch)
    if implementation == "factorized":
        return factorized.macs
    dense = batch * math.prod(structure.in_modes) * math.prod(structure.out_modes)
    return reconstructed.macs + dense


class FactorizedLinear(nn.Module):
    """A Linear whose weight, as a tensor ``(*in_tensorized_features, *out_tensorized_features)``,
    is held in CP, Tucker, TT or blockTT (TT-matrix) form.

    Args:
        in_tensorized_features: modes whose product is ``in_features``.
        out_tensorized_features: modes whose product is ``out_features``.
        bias: learn an additive bias.
        factorization: ``'cp'``, ``'tucker'``, ``'tt'`` or ``'blocktt'`` (case-insensitive).
        rank: ``'same'``, a fraction of the dense parameter count, or explicit ranks
            (see :func:`~fxfactorize.tensorized.ranks.resolve_ranks`).
        implementation: ``'factorized'``, ``'reconstructed'`` or ``'auto'``.
        n_layers: number of layers sharing one factorized tensor (an extra mode).
        checkpointing: recompute the forward in backward (training mode) to save activations.

    >>> layer = FactorizedLinear((4, 8), (8, 4), factorization="tt", rank=0.5)
    >>> layer(torch.randn(3, 32)).shape
    torch.Size([3, 32])
    >>> layer.ranks, layer.n_parameters
    ((1, 4, 7, 4, 1), 480)
    """

    def __init__(
        self,
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        bias: bool = True,
        factorization: str = "cp",
        rank: object = "same",
        implementation: str = "factorized",
        n_layers: int = 1,
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_modes = validate_tensorized_features(
            in_tensorized_features, None, "in_tensorized_features"
        )
        out_modes = validate_tensorized_features(
            out_tensorized_features, None, "out_tensorized_features"
        )
        factorization = normalize_factorization(factorization)
        if factorization == "blocktt" and len(in_modes) != len(out_modes):
            raise ValueError(
                "in_tensorized_features and out_tensorized_features must have the same number of "
                f"modes for 'blocktt'; got {in_modes} and {out_modes}"
            )
        if not isinstance(n_layers, numbers.Integral) or isinstance(n_layers, bool) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1; got {n_layers!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool; got {bias!r}")
        self.in_tensorized_features = in_modes
        self.out_tensorized_features = out_modes
        self.in_features = math.prod(in_modes)
        self.out_features = math.prod(out_modes)
        self.n_layers = int(n_layers)
        self.factorization = factorization
        self.implementation = implementation  # validated by the property setter
        self.checkpointing = bool(checkpointing)
        self.structure: Structure = resolve_ranks(
            factorization, in_modes, out_modes, rank, self.n_layers
        )
        layouts = [labels for _, labels in self.structure.factors()]
        # per factor: where its layer mode is (None without one), and its labels without it
        self._layer_positions = [labels.index("l") if "l" in labels else None for labels in layouts]
        self._labels = [tuple(i for i in labels if i != "l") for labels in layouts]
        like = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **like)) for shape, _ in self.structure.factors()]
        )
        bias_shape = (
            (self.n_layers, self.out_features) if self.n_layers > 1 else (self.out_features,)
        )
        self.bias = nn.Parameter(torch.empty(bias_shape, **like)) if bias else None
        self._cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.reset_parameters()

    # -- configuration -------------------------------------------------------------------------
    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {list(IMPLEMENTATIONS)}; got {value!r}"
            )
        self._implementation = value

    @property
    def rank(self) -> tuple[int, ...]:
        """The realised ranks (TensorLy-Torch's attribute name)."""
        return self.structure.ranks

    ranks = rank

    @property
    def n_parameters(self) -> int:
        """Parameters of the factorized weight (bias excluded)."""
        return self.structure.n_parameters

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}, "
            f"in_tensorized_features={self.in_tensorized_features}, "
            f"out_tensorized_features={self.out_tensorized_features}, n_layers={self.n_layers}, "
            f"implementation={self.implementation!r}, bias={self.bias is not None}"
        )

    # -- parameters ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random factors whose product has ``nn.Linear``'s weight variance; ``nn.Linear``'s bias.

        >>> layer = FactorizedLinear((16, 16), (16, 16), factorization="cp", rank=0.5)
        >>> 0.7 < float(layer.get_weight().detach().std() * math.sqrt(3 * 256)) < 1.3
        True
        """
        target_var = 1.0 / (3 * self.in_features)  # kaiming_uniform(a=√5) as in nn.Linear
        combos = math.prod(self.structure.rank_sizes.values())
        n = len(self.factors)
        # every weight entry sums `combos` products of one entry per factor
        std = (target_var / combos) ** (1.0 / (2 * n))
        for factor in self.factors:
            factor.normal_(0.0, std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)
        self._cache.clear()

    def _terms(self, indices: int) -> tuple[list[torch.Tensor], list[tuple[str, ...]]]:
        """Factors and labels for one layer (the layer mode, if any, sliced at ``indices``)."""
        factors = list(self.factors._parameters.values())  # iterating the ParameterList is slower
        if self.n_layers > 1:
            factors = [
                f if position is None else f.select(position, indices)
                for f, position in zip(factors, self._layer_positions, strict=True)
            ]
        return factors, self._labels

    def _check_index(self, indices: object) -> int:
        if _is_compiling():  # isinstance on numbers.Integral breaks the graph; checked eagerly
            return indices
        if not isinstance(indices, numbers.Integral) or not 0 <= indices < self.n_layers:
            raise ValueError(f"indices must be an int in [0, {self.n_layers}); got {indices!r}")
        return int(indices)

    def get_weight(self, indices: int = 0) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight of layer ``indices``.

        >>> FactorizedLinear((2, 3), (4,), rank=2).get_weight().shape
        torch.Size([4, 6])
        """
        indices = self._check_index(indices)
        tensors, terms = self._terms(indices)
        plan = plan_forward(self.structure, 1)[1]  # output (*out modes, *in modes)
        return contract(tensors, terms, plan.output, plan).reshape(
            self.out_features, self.in_features
        )

    def _bias(self, indices: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias[indices] if self.n_layers > 1 else self.bias

    # -- cost ----------------------------------------------------------------------------------
    def _plans(self, batch: int) -> tuple[ContractionPlan, ContractionPlan]:
        return plan_forward(self.structure, batch)

    def macs(self, batch: int, implementation: str | None = None) -> int:
        """Multiply-adds of one forward on ``batch`` rows (bias excluded).

        ``'auto'`` counts the implementation that 'auto' runs at that batch size.

        >>> layer = FactorizedLinear((8, 8), (8, 8), factorization="tt", rank=4)
        >>> layer.macs(1, "factorized") < layer.macs(1, "reconstructed")
        True
        """
        return forward_macs(self.structure, batch, implementation or self.implementation)

    # -- forward -------------------------------------------------------------------------------
    def _cached_weight(self, indices: int) -> torch.Tensor:
        # a factor changed in place bumps its _version; a swapped-in tensor has a new data_ptr
        key = tuple((p._version, p.data_ptr()) for p in self.factors._parameters.values())
        hit = self._cache.get(indices)
        if hit is not None and hit[0] == key:
            return hit[1]
        weight = self.get_weight(indices).contiguous()  # a permuted view would slow F.linear
        self._cache[indices] = (key, weight)
        return weight

    def forward(self, x: torch.Tensor, indices: int = 0) -> torch.Tensor:
        """``x @ W_indices.T + bias``; ``x`` is ``[..., in_features]``."""
        # inference fast path: the cached dense weight and nothing else, so it costs what
        # nn.Linear costs
        if (
            not (self.training or torch.is_grad_enabled())
            and type(indices) is int
            and 0 <= indices < self.n_layers
            and x.shape[-1] == self.in_features
            and not _is_compiling()
        ):
            return F.linear(x, self._cached_weight(indices), self._bias(indices))
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input with last dimension {self.in_features}; got shape {tuple(x.shape)}"
            )
        indices = self._check_index(indices)
        if not self.training and not torch.is_grad_enabled() and not _is_compiling():
            return F.linear(x, self._cached_weight(indices), self._bias(indices))
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, indices, use_reentrant=False)
        return self._forward(x, indices)

    def _forward(self, x: torch.Tensor, indices: int) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        rows = math.prod(batch_shape)
        use = self.implementation
        if use == "auto":
            use = choose_implementation(self.structure, rows)
        if use == "reconstructed":
            return F.linear(x, self.get_weight(indices), self._bias(indices))
        factorized, _ = self._plans(rows)
        tensors, terms = self._terms(indices)
        ins = tuple(f"i{k}" for k in range(len(self.in_tensorized_features)))
        outs = tuple(f"o{k}" for k in range(len(self.out_tensorized_features)))
        xt = x.reshape(rows, *self.in_tensorized_features)
        y = contract([xt, *tensors], [("b", *ins), *terms], ("b", *outs), factorized)
        y = y.reshape(*batch_shape, self.out_features)
        bias = self._bias(indices)
        return y if bias is None else y + bias

    # -- layer views ---------------------------------------------------------------------------
    def get_linear(self, indices: int) -> nn.Module:
        """A module computing layer ``indices`` of this (shared-tensor) stack.

        >>> stack = FactorizedLinear((4, 4), (4, 4), rank=0.5, n_layers=2)
        >>> x = torch.randn(2, 16)
        >>> torch.equal(stack.get_linear(1)(x), stack(x, indices=1))
        True
        """
        return _LayerView(self, self._check_index(indices))

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: object = "same",
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        in_tensorized_features: Sequence[int] | None = None,
        out_tensorized_features: Sequence[int] | None = None,
        bias: bool = True,
        factorization: str = "cp",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: dict | None = None,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """Decompose ``linear``'s weight into a tensorized layer (``linear`` is not changed).

        >>> lin = nn.Linear(64, 64)
        >>> layer = FactorizedLinear.from_linear(lin, rank=0.5, factorization="blocktt",
        ...                                      n_tensorized_modes=2)
        >>> layer.in_tensorized_features, round(layer.n_parameters / 64**2, 2)
        ((8, 8), 0.5)
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        return cls.from_linear_list(
            [linear],
            *_modes(
                linear,
                auto_tensorize,
                n_tensorized_modes,
                in_tensorized_features,
                out_tensorized_features,
            ),
            rank=rank,
            bias=bias,
            factorization=factorization,
            implementation=implementation,
            checkpointing=checkpointing,
            decomposition_kwargs=decomposition_kwargs,
            verbose=verbose,
        )

    @classmethod
    def from_linear_list(
        cls,
        linear_list: Sequence[nn.Linear],
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        rank: object,
        bias: bool = True,
        factorization: str = "cp",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: dict | None = None,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """One tensor shared by several same-shaped Linears (``n_layers = len(linear_list)``).

        >>> lins = [nn.Linear(16, 16) for _ in range(3)]
        >>> stack = FactorizedLinear.from_linear_list(lins, (4, 4), (4, 4), rank="same",
        ...                                           factorization="tucker")
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(stack(x, indices=2), lins[2](x), atol=1e-4)
        True
        """
        linear_list = list(linear_list)
        if not linear_list or not all(isinstance(m, nn.Linear) for m in linear_list):
            raise ValueError("linear_list must be a non-empty list of nn.Linear")
        shapes = {tuple(m.weight.shape) for m in linear_list}
        if len(shapes) != 1:
            raise ValueError(
                f"linear_list layers must all have the same shape; got {sorted(shapes)}"
            )
        reference = linear_list[0].weight
        in_modes = validate_tensorized_features(
            in_tensorized_features, reference.shape[1], "in_tensorized_features"
        )
        out_modes = validate_tensorized_features(
            out_tensorized_features, reference.shape[0], "out_tensorized_features"
        )
        n_layers = len(linear_list)
        has_bias = bias and all(m.bias is not None for m in linear_list)
        layer = cls(
            in_modes,
            out_modes,
            bias=has_bias,
            factorization=factorization,
            rank=rank,
            implementation=implementation,
            n_layers=n_layers,
            checkpointing=checkpointing,
            device=reference.device,
            dtype=reference.dtype,
        )
        start = time.perf_counter()
        with torch.no_grad():
            # in the layers' own dtype: decompose() picks its working precision from it
            weights = torch.stack([m.weight.detach().T.contiguous() for m in linear_list])
            tensor = weights.reshape(*([n_layers] if n_layers > 1 else []), *in_modes, *out_modes)
            factors = decompose(tensor, layer.structure, **(decomposition_kwargs or {}))
            for param, value in zip(layer.factors, factors, strict=True):
                param.copy_(value.to(param.dtype))
            if has_bias:
                biases = torch.stack([m.bias.detach() for m in linear_list])
                layer.bias.copy_(biases if n_layers > 1 else biases[0])
        layer._cache.clear()
        layer.train(linear_list[0].training)
        message = "tensorized %d Linear(s) %s→%s as %s ranks %s (%d params) in %.3fs"
        args = (
            n_layers,
            in_modes,
            out_modes,
            layer.factorization,
            layer.rank,
            layer.n_parameters,
            time.perf_counter() - start,
        )
        (log.info if verbose else log.debug)(message, *args)
        return layer


def _modes(
    linear, auto_tensorize, n_modes, in_modes, out_modes
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out_features, in_features = linear.weight.shape
    if in_modes is not None or out_modes is not None or not auto_tensorize:
        if in_modes is None or out_modes is None:
            raise ValueError(
                "in_tensorized_features and out_tensorized_features must both be given "
                "when auto_tensorize=False or either one is set"
            )
        return (
            validate_tensorized_features(in_modes, in_features, "in_tensorized_features"),
            validate_tensorized_features(out_modes, out_features, "out_tensorized_features"),
        )
    return tensorize_features(in_features, n_modes), tensorize_features(out_features, n_modes)


class _LayerView(nn.Module):
    """Layer ``index`` of a shared-tensor :class:`FactorizedLinear`."""

    def __init__(self, main: FactorizedLinear, index: int) -> None:
        super().__init__()
        self.main = main
        self.index = index
        self.in_features, self.out_features = main.in_features, main.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x, self.index)

    @property
    def weight(self) -> torch.Tensor:
        return self.main.get_weight(self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}"
