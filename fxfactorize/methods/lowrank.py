"""The rank-r pair: ``W ≈ B A`` as two ordinary layers (Composer's factorization)."""

from __future__ import annotations

from torch import nn

from fxfactorize.core.lowrank import factorize_weight
from fxfactorize.core.moments import Statistics
from fxfactorize.core.solution import LowRankSolution
from fxfactorize.layers import LayerShape, conv_arguments, grouped_weight, layer_kind
from fxfactorize.methods.base import Solved, register_method, spec_bool, spec_int
from fxfactorize.modules import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedLinear,
)

__all__ = ["LowRankMethod", "grouped_weight", "solution_from_factors"]  # grouped_weight: old home


def solution_from_factors(module: nn.Module, factors, rank: int) -> LowRankSolution:
    """Lay grouped factors out as Composer's ``LowRankSolution`` for ``module``'s kind."""
    first, second = factors.first, factors.second
    if layer_kind(module) == "linear":
        return LowRankSolution(first[0].T, second[0].T, factors.bias, rank, factors.nmse)
    kernel = tuple(module.kernel_size)
    groups = first.shape[0]
    in_per_group = module.in_channels // groups
    wa = first.reshape(rank, in_per_group, *kernel)
    wb = second.reshape(-1, rank // groups, *(1 for _ in kernel))  # pointwise, any conv dims
    return LowRankSolution(wa, wb, factors.bias, rank, factors.nmse)


_CONV_PAIRS = {"conv1d": FactorizedConv1d, "conv2d": FactorizedConv2d, "conv3d": FactorizedConv3d}


class LowRankMethod:
    """Handler of ``method="lowrank"``: a Linear or Conv1d/2d/3d becomes a rank-r pair."""

    name = "lowrank"
    kinds = ("linear", *_CONV_PAIRS)
    is_pair = True

    def accepts(self, layer: LayerShape) -> str | None:
        if layer.kind not in self.kinds:
            return f"method 'lowrank' does not handle {layer.kind}"
        return None

    def cost(self, layer: LayerShape, rank: int) -> tuple[int, int]:
        return layer.factorized_macs(rank), layer.factorized_params(rank)

    def detail(self, layer: LayerShape, rank: int) -> str | None:
        return None

    def solve(
        self,
        module: nn.Module,
        layer: LayerShape,
        rank: int,
        moments: Statistics | None,
        shrinkage: float = 0.0,
    ) -> Solved:
        weight, bias = grouped_weight(module)
        factors = factorize_weight(weight, bias, rank // layer.groups, moments, shrinkage=shrinkage)
        has_bias = factors.bias is not None
        new = self.rebuild(module, layer, {"rank": rank, "bias": has_bias})
        new.apply_solution(solution_from_factors(module, factors, rank))
        return Solved(new, factors.nmse, factors.nmse_source, has_bias)

    def describe(self, replacement: nn.Module) -> dict:
        return {"rank": replacement.latent_size, "bias": replacement.has_bias}

    def spec_shapes(self, layer: LayerShape, spec: dict) -> dict[str, tuple[int, ...]]:
        """Shapes of the pair's weights: the rank must be an int in ``[1, layer.max_rank]``.

        >>> layer = LayerShape("conv2d", 32, 64, (3, 3), 1, positions=16, bias=True)
        >>> LowRankMethod().spec_shapes(layer, {"rank": 8, "bias": False})
        {'module0.weight': (8, 32, 3, 3), 'module1.weight': (64, 8, 1, 1)}
        """
        rank = spec_int(spec, "rank", 1, layer.max_rank)
        has_bias = spec_bool(spec, "bias")
        if rank % layer.groups:
            raise ValueError(f"spec 'rank' must be a multiple of groups={layer.groups}; got {rank}")
        shapes = {
            "module0.weight": (rank, layer.in_features // layer.groups, *layer.kernel),
            "module1.weight": (
                layer.out_features,
                rank // layer.groups,
                *(1 for _ in layer.kernel),
            ),
        }
        if has_bias:
            shapes["module1.bias"] = (layer.out_features,)
        return shapes

    def rebuild(self, module: nn.Module, layer: LayerShape, spec: dict) -> nn.Module:
        reference = grouped_weight(module)[0]
        like = {"device": reference.device, "dtype": reference.dtype}
        rank, has_bias = int(spec["rank"]), bool(spec["bias"])
        if layer.kind == "linear":
            new = FactorizedLinear(
                layer.in_features, layer.out_features, bias=has_bias, latent_features=rank, **like
            )
        else:
            new = _CONV_PAIRS[layer.kind](
                layer.in_features,
                layer.out_features,
                layer.kernel,
                latent_channels=rank,
                bias=has_bias,
                groups=layer.groups,
                **like,
                **conv_arguments(module),
            )
        new.train(module.training)
        return new


register_method(LowRankMethod())
