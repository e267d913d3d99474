"""The other conv structures as methods: ``'spatial'`` (spatial SVD) and ``'tucker2'`` (Tucker-2).

The plan's one rank knob ``r`` means: the spatial SVD's inner channels (``K_h×1`` to ``r``, then
``1×K_w``); Tucker-2's output-side rank ``r₂ = r`` with the input side in proportion to the
channels, ``r₁ = round(r · in / out)`` (both at least 1, at most the channels). Each handler also
predicts its error per rank (:meth:`predicted_errors`), so ``method="auto"`` can compare structures.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxfactorize.core.lowrank import output_nmse, refit_bias, singular_values
from fxfactorize.core.moments import Statistics
from fxfactorize.core.structured import (
    hosvd_error,
    refine,
    spatial_factors,
    spatial_matrix,
    spatial_weight,
    tucker2_factors,
    tucker2_weight,
)
from fxfactorize.layers import LayerShape, conv_arguments
from fxfactorize.methods.base import Solved, register_method, spec_bool, spec_int, spec_value
from fxfactorize.modules.structured import SpatialConv2d, Tucker2Conv

__all__ = ["CONV_STRUCTURES", "SpatialMethod", "Tucker2Method", "tucker2_ranks"]


def tucker2_ranks(layer: LayerShape, rank: int) -> tuple[int, int]:
    """``(r₁, r₂)`` of Tucker-2 at the plan's ``rank``: ``r₂ = rank``, ``r₁`` in proportion to the channels.

    >>> tucker2_ranks(LayerShape("conv2d", 64, 128, (3, 3), 1, 1, False), 32)
    (16, 32)
    """
    r2 = max(1, min(rank, layer.out_features))
    r1 = max(1, min(layer.in_features, round(rank * layer.in_features / layer.out_features)))
    return r1, r2


def _common_refusal(name: str, layer: LayerShape) -> str | None:
    if layer.kind == "linear":
        return f"method {name!r} handles convolutions only, not Linear layers"
    if layer.groups > 1:
        return f"method {name!r} does not support grouped convs (groups={layer.groups})"
    if layer.latent is not None:
        return f"already factorized at rank {layer.latent}"
    if math.prod(layer.kernel) == 1:
        return f"method {name!r}: a 1×1 conv has no kernel to factorize (the pair fits it)"
    return None


def _measured(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approx: torch.Tensor,
    new_bias: torch.Tensor | None,
    moments: Statistics | None,
) -> tuple[float, str]:
    """The nmse of ``approx`` (the stored weights, in float64): the discarded share of ``‖W‖²``
    without statistics (as the pair reports), else exact on the calibration statistics."""
    w = weight.detach().to(torch.float64)
    if moments is None:
        total = float(w.pow(2).sum())
        return (float((w - approx).pow(2).sum()) / total if total > 0 else 0.0), "weights"
    flat = w.reshape(1, w.shape[0], -1)
    return output_nmse(flat, bias, approx.reshape(flat.shape), new_bias, moments), "calibration"


class _StructuredConv:
    """What the two structured conv methods share: the solve's bookkeeping and the spec."""

    name = ""
    module_class: type[nn.Module] = nn.Module
    kinds: tuple[str, ...] = ()
    is_pair = False

    def max_rank(self, layer: LayerShape) -> int:
        raise NotImplementedError

    def _factors(self, weight: torch.Tensor, layer: LayerShape, rank: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def _expand(self, *factors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load(self, module: nn.Module, factors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def solve(
        self,
        module: nn.Module,
        layer: LayerShape,
        rank: int,
        moments: Statistics | None,
        shrinkage: float = 0.0,
    ) -> Solved:
        weight = module.weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("weight contains NaN or Inf")
        bias = None if module.bias is None else module.bias.detach()
        w64 = weight.to(torch.float64)
        factors = self._factors(w64, layer, rank)
        if moments is not None:  # from the data-free optimum: the refinement only lowers the error
            factors = refine(w64, factors, self._expand, moments, shrinkage)
        has_bias = bias is not None or moments is not None
        new = self.rebuild(module, layer, {**self._spec(layer, rank), "bias": has_bias})
        self._load(new, factors)
        with torch.no_grad():
            approx = new.effective_weight().to(torch.float64)  # as stored, rounding included
            new_bias = None
            if moments is not None:
                flat = w64.reshape(1, w64.shape[0], -1)
                new_bias = refit_bias(flat, bias, approx.reshape(flat.shape), moments)
            elif bias is not None:
                new_bias = bias.to(torch.float64)
            if new_bias is not None:
                new.output_bias.copy_(new_bias.to(new.output_bias.dtype))
                new_bias = new.output_bias.to(torch.float64)
            nmse, source = _measured(w64, bias, approx, new_bias, moments)
        new.train(module.training)
        return Solved(new, nmse, source, has_bias, detail=self.detail(layer, rank))

    def describe(self, replacement: nn.Module) -> dict:
        raise NotImplementedError

    def _spec_ranks(self, spec: dict) -> int | tuple[int, ...]:
        """The module's rank argument, from a validated spec."""
        raise NotImplementedError

    def rebuild(self, module: nn.Module, layer: LayerShape, spec: dict) -> nn.Module:
        reference = module.weight
        new = self.module_class(
            layer.in_features,
            layer.out_features,
            layer.kernel,
            self._spec_ranks(spec),
            bias=bool(spec["bias"]),
            device=reference.device,
            dtype=reference.dtype,
            **conv_arguments(module),
        )
        new.train(module.training)
        return new

    def _spec(self, layer: LayerShape, rank: int) -> dict:
        raise NotImplementedError

    def detail(self, layer: LayerShape, rank: int) -> str:
        raise NotImplementedError

    def predicted_errors(
        self,
        module: nn.Module,
        layer: LayerShape,
        ranks: list[int],
        moments: Statistics | None,
    ) -> list[float]:
        """Predicted nmse at each of ``ranks``. Data-free: the data-free solve's (exactly). With
        statistics: the data-free solution's error on them, which the solve can only lower."""
        weight = module.weight.detach().to(torch.float64)
        bias = None if module.bias is None else module.bias.detach()
        errors = []
        for rank in ranks:
            approx = self._expand(*self._factors(weight, layer, rank))
            flat = weight.reshape(1, weight.shape[0], -1)
            new_bias = None
            if moments is not None:
                new_bias = refit_bias(flat, bias, approx.reshape(flat.shape), moments)
            errors.append(_measured(weight, bias, approx, new_bias, moments)[0])
        return errors


class SpatialMethod(_StructuredConv):
    """``method="spatial"``: a 2-d conv becomes ``K_h×1`` to ``rank`` channels, then ``1×K_w``.

    >>> layer = LayerShape("conv2d", 64, 64, (3, 3), 1, positions=100, bias=True)
    >>> SpatialMethod().cost(layer, 32), SpatialMethod().detail(layer, 32)
    ((1228800, 12352), 'spatial r=32')
    """

    name = "spatial"
    module_class = SpatialConv2d
    kinds = ("conv2d",)

    def accepts(self, layer: LayerShape) -> str | None:
        if layer.kind not in ("linear", "conv2d"):
            return f"method 'spatial' handles 2-d convs only, not {layer.kind}"
        return _common_refusal(self.name, layer)

    def max_rank(self, layer: LayerShape) -> int:
        kh, kw = layer.kernel
        return min(layer.in_features * kh, layer.out_features * kw)

    def cost(self, layer: LayerShape, rank: int) -> tuple[int, int]:
        kh, kw = layer.kernel
        stride_w = layer.stride[1] if layer.stride else 1  # the first conv keeps the input's width
        first = layer.positions * stride_w * rank * layer.in_features * kh
        second = layer.positions * layer.out_features * rank * kw
        params = rank * (layer.in_features * kh + layer.out_features * kw)
        return first + second, params + (layer.out_features if layer.bias else 0)

    def detail(self, layer: LayerShape, rank: int) -> str:
        return f"spatial r={rank}"

    def _spec(self, layer: LayerShape, rank: int) -> dict:
        return {"rank": rank}

    def _factors(self, weight: torch.Tensor, layer: LayerShape, rank: int) -> list[torch.Tensor]:
        return list(spatial_factors(weight, rank))

    def _expand(self, *factors: torch.Tensor) -> torch.Tensor:
        return spatial_weight(*factors)

    def _load(self, module: nn.Module, factors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for child, factor in zip((module.module0, module.module1), factors, strict=True):
                child.weight.copy_(factor.to(child.weight.dtype))

    def predicted_errors(
        self, module: nn.Module, layer: LayerShape, ranks: list[int], moments: Statistics | None
    ) -> list[float]:
        if moments is not None:
            return super().predicted_errors(module, layer, ranks, moments)
        s2 = singular_values(spatial_matrix(module.weight.detach().to(torch.float64))) ** 2
        total = float(s2.sum())
        return [float(s2[r:].sum()) / total if total > 0 else 0.0 for r in ranks]

    def describe(self, replacement: nn.Module) -> dict:
        return {"rank": replacement.rank, "bias": replacement.output_bias is not None}

    def spec_shapes(self, layer: LayerShape, spec: dict) -> dict[str, tuple[int, ...]]:
        """Shapes of the two convs' weights: the rank must be an int in ``[1, max_rank]``.

        >>> layer = LayerShape("conv2d", 32, 64, (3, 5), 1, positions=16, bias=True)
        >>> SpatialMethod().spec_shapes(layer, {"rank": 8, "bias": False})
        {'module0.weight': (8, 32, 3, 1), 'module1.weight': (64, 8, 1, 5)}
        """
        rank = spec_int(spec, "rank", 1, self.max_rank(layer))
        kh, kw = layer.kernel
        shapes = {
            "module0.weight": (rank, layer.in_features, kh, 1),
            "module1.weight": (layer.out_features, rank, 1, kw),
        }
        if spec_bool(spec, "bias"):
            shapes["module1.bias"] = (layer.out_features,)
        return shapes

    def _spec_ranks(self, spec: dict) -> int | tuple[int, ...]:
        return int(spec["rank"])


class Tucker2Method(_StructuredConv):
    """``method="tucker2"``: pointwise ``in → r₁``, the kernel ``r₁ → r₂``, pointwise ``r₂ → out``.

    >>> layer = LayerShape("conv2d", 64, 64, (3, 3), 1, positions=100, bias=True)
    >>> Tucker2Method().cost(layer, 32), Tucker2Method().detail(layer, 32)
    ((1331200, 13376), 'tucker2 (32, 32)')
    """

    name = "tucker2"
    module_class = Tucker2Conv
    kinds = ("conv1d", "conv2d", "conv3d")

    def accepts(self, layer: LayerShape) -> str | None:
        return _common_refusal(self.name, layer)

    def max_rank(self, layer: LayerShape) -> int:
        return layer.out_features

    def cost(self, layer: LayerShape, rank: int) -> tuple[int, int]:
        r1, r2 = tucker2_ranks(layer, rank)
        kernel = math.prod(layer.kernel)
        macs = layer.input_positions * layer.in_features * r1 + layer.positions * (
            r1 * r2 * kernel + r2 * layer.out_features
        )
        params = layer.in_features * r1 + r1 * r2 * kernel + r2 * layer.out_features
        return macs, params + (layer.out_features if layer.bias else 0)

    def detail(self, layer: LayerShape, rank: int) -> str:
        return f"tucker2 {tucker2_ranks(layer, rank)}"

    def _spec(self, layer: LayerShape, rank: int) -> dict:
        return {"ranks": list(tucker2_ranks(layer, rank))}

    def _factors(self, weight: torch.Tensor, layer: LayerShape, rank: int) -> list[torch.Tensor]:
        return list(tucker2_factors(weight, tucker2_ranks(layer, rank)))

    def _expand(self, *factors: torch.Tensor) -> torch.Tensor:
        return tucker2_weight(*factors)

    def _load(self, module: nn.Module, factors: list[torch.Tensor]) -> None:
        children = (module.module0, module.module1, module.module2)
        with torch.no_grad():
            for child, factor in zip(children, factors, strict=True):
                child.weight.copy_(factor.reshape(child.weight.shape).to(child.weight.dtype))

    def predicted_errors(
        self, module: nn.Module, layer: LayerShape, ranks: list[int], moments: Statistics | None
    ) -> list[float]:
        if moments is not None:
            return super().predicted_errors(module, layer, ranks, moments)
        weight = module.weight.detach().to(torch.float64)
        return hosvd_error(weight, [tucker2_ranks(layer, r) for r in ranks])

    def describe(self, replacement: nn.Module) -> dict:
        return {"ranks": list(replacement.ranks), "bias": replacement.output_bias is not None}

    def spec_shapes(self, layer: LayerShape, spec: dict) -> dict[str, tuple[int, ...]]:
        """Shapes of the three convs' weights; ``ranks`` = ``[r₁ ≤ in, r₂ ≤ out]``.

        >>> layer = LayerShape("conv2d", 32, 64, (3, 3), 1, positions=16, bias=True)
        >>> Tucker2Method().spec_shapes(layer, {"ranks": [8, 16], "bias": True})["module1.weight"]
        (16, 8, 3, 3)
        """
        ranks = spec_value(spec, "ranks")
        if not isinstance(ranks, list) or len(ranks) != 2:
            raise ValueError(f"spec 'ranks' must be a list of two ints; got {ranks!r:.60}")
        r1 = spec_int({"ranks[0]": ranks[0]}, "ranks[0]", 1, layer.in_features)
        r2 = spec_int({"ranks[1]": ranks[1]}, "ranks[1]", 1, layer.out_features)
        ones = tuple(1 for _ in layer.kernel)
        shapes = {
            "module0.weight": (r1, layer.in_features, *ones),
            "module1.weight": (r2, r1, *layer.kernel),
            "module2.weight": (layer.out_features, r2, *ones),
        }
        if spec_bool(spec, "bias"):
            shapes["module2.bias"] = (layer.out_features,)
        return shapes

    def _spec_ranks(self, spec: dict) -> int | tuple[int, ...]:
        return tuple(spec["ranks"])


#: The conv structures ``method="auto"`` chooses among besides the pair, by name.
CONV_STRUCTURES = {
    method.name: register_method(method) for method in (SpatialMethod(), Tucker2Method())
}
