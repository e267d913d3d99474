"""Tensorized formats as pass methods: ``'cp'``, ``'tucker'``, ``'tt'``, ``'blocktt'`` for Linear nodes.

The plan's rank ``r`` for a Linear sets the parameter budget: the tensorized layer gets as many
parameters as the rank-``r`` pair would (``r · (in + out)``), so one ``latent_features`` knob means
the same budget for every method. Modes are balanced factorizations of the features into 3.
"""

from __future__ import annotations

import torch
from torch import nn

from fxfactorize.core.lowrank import output_nmse
from fxfactorize.core.moments import Statistics
from fxfactorize.layers import LayerShape
from fxfactorize.methods.base import Solved, register_method, spec_bool, spec_value
from fxfactorize.tensorized.layer import FactorizedLinear, forward_macs
from fxfactorize.tensorized.ranks import resolve_ranks
from fxfactorize.tensorized.structure import FORMATS, Structure, normalize_factorization
from fxfactorize.tensorized.tensorize import tensorize_features, validate_tensorized_features

__all__ = ["TensorizedMethod", "register_tensorized_methods"]

N_MODES = 3
#: A saved spec may give at most this many times ``in · out + in + out`` parameters (the plan's
#: ranks give at most about 2 · in · out: a rank-r budget is ``r · (in + out)``, ``r <= min(in, out)``).
MAX_PARAMETER_FACTOR = 4
#: At most this many modes per side in a saved spec (the pass writes N_MODES; TensorLy-Torch
#: users write a handful): bounds the work of checking a spec read from a file.
MAX_SPEC_MODES = 32


class TensorizedMethod:
    """Handler of one tensorized format (``method='cp'`` etc.) for ``nn.Linear`` nodes.

    >>> from fxfactorize.layers import LayerShape
    >>> layer = LayerShape("linear", 1024, 1024, (), 1, positions=64, bias=True)
    >>> TensorizedMethod("blocktt").detail(layer, 128)
    'blocktt (8, 8, 16)→(8, 8, 16) ranks (1, 61, 62, 1)'
    """

    implementation = "auto"  # the pass's layers pick the cheaper forward per batch
    kinds = ("linear",)
    is_pair = False

    def __init__(self, factorization: str) -> None:
        self.name = factorization

    def structure(self, layer: LayerShape, rank: int) -> Structure:
        fraction = (
            rank
            * (layer.in_features + layer.out_features)
            / (layer.in_features * layer.out_features)
        )
        return resolve_ranks(
            self.name,
            tensorize_features(layer.in_features, N_MODES),
            tensorize_features(layer.out_features, N_MODES),
            float(fraction),
        )

    def detail(self, layer: LayerShape, rank: int) -> str:
        s = self.structure(layer, rank)
        return f"{self.name} {s.in_modes}→{s.out_modes} ranks {s.ranks}"

    def accepts(self, layer: LayerShape) -> str | None:
        if layer.kind != "linear":
            return f"method {self.name!r} handles Linear layers only, not {layer.kind}"
        if layer.latent is not None:
            return f"already factorized at rank {layer.latent}"
        return None

    def cost(self, layer: LayerShape, rank: int) -> tuple[int, int]:
        s = self.structure(layer, rank)
        macs = forward_macs(s, layer.positions, self.implementation)
        return macs, s.n_parameters + (layer.out_features if layer.bias else 0)

    def solve(
        self,
        module: nn.Module,
        layer: LayerShape,
        rank: int,
        moments: Statistics | None,
        shrinkage: float = 0.0,
    ) -> Solved:  # the tensorized solve is data-free: statistics only measure its error
        s = self.structure(layer, rank)
        new = FactorizedLinear.from_linear(
            module,
            rank=s.ranks,
            in_tensorized_features=s.in_modes,
            out_tensorized_features=s.out_modes,
            factorization=self.name,
            implementation=self.implementation,
        )
        with torch.no_grad():
            weight = module.weight.detach().to(torch.float64)
            approx = new.get_weight().to(torch.float64)
            if moments is None:  # white-input error: the discarded share of ‖W‖²
                nmse, source = float((weight - approx).norm() ** 2 / weight.norm() ** 2), "weights"
            else:
                bias = None if module.bias is None else module.bias.detach()
                nmse = output_nmse(weight[None], bias, approx[None], bias, moments)
                source = "calibration"
        return Solved(new, nmse, source, module.bias is not None, detail=self.detail(layer, rank))

    def describe(self, replacement: nn.Module) -> dict:
        return {
            "factorization": replacement.factorization,
            "in_tensorized_features": list(replacement.in_tensorized_features),
            "out_tensorized_features": list(replacement.out_tensorized_features),
            "rank": list(replacement.rank),
            "bias": replacement.bias is not None,
        }

    def spec_shapes(self, layer: LayerShape, spec: dict) -> dict[str, tuple[int, ...]]:
        """Shapes of the factors (and bias) of the spec's structure, bounded by the layer's size.

        >>> layer = LayerShape("linear", 64, 64, (), 1, positions=2, bias=True)
        >>> spec = {"factorization": "blocktt", "in_tensorized_features": [4, 4, 4],
        ...         "out_tensorized_features": [4, 4, 4], "rank": [1, 1500, 1500, 1], "bias": True}
        >>> TensorizedMethod("blocktt").spec_shapes(layer, spec)
        Traceback (most recent call last):
        ...
        ValueError: spec 'rank' (1, 1500, 1500, 1) gives 36,048,000 parameters, more than 16,896 (= 4 × (in·out + in + out)) for a 64→64 Linear
        """
        structure = self._spec_structure(layer, spec)
        shapes = {f"factors.{k}": shape for k, (shape, _) in enumerate(structure.factors())}
        if spec_bool(spec, "bias"):
            shapes["bias"] = (layer.out_features,)
        return shapes

    def _spec_structure(self, layer: LayerShape, spec: dict) -> Structure:
        factorization = normalize_factorization(spec_value(spec, "factorization"))
        if factorization != self.name:
            raise ValueError(f"spec 'factorization' {factorization!r} is not {self.name!r}")
        in_modes, out_modes = (
            validate_tensorized_features(_spec_list(spec, key, MAX_SPEC_MODES), features, key)
            for key, features in (
                ("in_tensorized_features", layer.in_features),
                ("out_tensorized_features", layer.out_features),
            )
        )
        if self.name == "blocktt" and len(in_modes) != len(out_modes):
            raise ValueError(
                "in_tensorized_features and out_tensorized_features must have the same number of "
                f"modes for 'blocktt'; got {in_modes} and {out_modes}"
            )
        structure = resolve_ranks(self.name, in_modes, out_modes, tuple(_spec_list(spec, "rank")))
        n_in, n_out = layer.in_features, layer.out_features
        limit = MAX_PARAMETER_FACTOR * (n_in * n_out + n_in + n_out)
        if structure.n_parameters > limit:
            raise ValueError(
                f"spec 'rank' {structure.ranks} gives {structure.n_parameters:,} parameters, more "
                f"than {limit:,} (= {MAX_PARAMETER_FACTOR} × (in·out + in + out)) for a "
                f"{n_in}→{n_out} Linear"
            )
        return structure

    def rebuild(self, module: nn.Module, layer: LayerShape, spec: dict) -> nn.Module:
        new = FactorizedLinear(
            tuple(spec["in_tensorized_features"]),
            tuple(spec["out_tensorized_features"]),
            bias=bool(spec["bias"]),
            factorization=spec["factorization"],
            rank=tuple(spec["rank"]),
            implementation=self.implementation,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new.train(module.training)
        return new


def _spec_list(spec: dict, key: str, max_length: int | None = None) -> list:
    value = spec_value(spec, key)
    if not isinstance(value, list):
        raise ValueError(f"spec {key!r} must be a list of ints; got {value!r:.60}")
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"spec {key!r} has {len(value)} entries; at most {max_length} are read")
    return value


def register_tensorized_methods(register=register_method) -> None:
    """Register one :class:`TensorizedMethod` per format (done when this module is imported)."""
    for name in FORMATS:
        register(TensorizedMethod(name))


register_tensorized_methods()
