"""Pass 3, cost: the shape, multiply-adds and parameters of every Linear/Conv node.

Each ``call_module`` node of a supported layer gets ``node.meta["fxfactorize_layer"]``, a
:class:`LayerShape`. MACs are counted for one forward pass of the example inputs.
"""

from __future__ import annotations

import dataclasses
import math

from torch import fx, nn

from fxfactorize.modules.factorized import FactorizedConvNd, FactorizedLinear

__all__ = ["LAYER_META", "LayerShape", "annotate_costs", "describe_module"]

LAYER_META = "fxfactorize_layer"


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """Geometry of a linear operator ``y = W x + b`` applied at ``positions`` places.

    ``kind`` is ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``; for a conv ``in_features``/``out_features`` are
    channels and ``kernel`` the kernel size. ``latent`` is the current rank of an already
    factorized pair (``None`` for a plain layer).

    >>> s = LayerShape("linear", 512, 256, (), 1, positions=8, bias=True)
    >>> s.macs, s.factorized_macs(32)
    (1048576, 196608)
    """

    kind: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...]
    groups: int
    positions: int
    bias: bool
    latent: int | None = None

    @property
    def fan_in(self) -> int:
        """Inputs of one output element: ``in / groups · prod(kernel)``."""
        return self.in_features // self.groups * math.prod(self.kernel)

    @property
    def out_per_group(self) -> int:
        return self.out_features // self.groups

    @property
    def max_rank(self) -> int:
        """Rank at which the pair is exact for any weight: ``groups · min(fan_in, out / groups)``."""
        return self.groups * min(self.fan_in, self.out_per_group)

    @property
    def macs(self) -> int:
        """Multiply-adds of the layer as it is now."""
        if self.latent is not None:
            return self.factorized_macs(self.latent)
        return self.positions * self.fan_in * self.out_features

    @property
    def params(self) -> int:
        """Parameters of the layer as it is now."""
        if self.latent is not None:
            return self.factorized_params(self.latent)
        return self.fan_in * self.out_features + (self.out_features if self.bias else 0)

    def factorized_macs(self, rank: int) -> int:
        """Multiply-adds of the pair at total rank ``rank``."""
        return self.positions * rank * (self.fan_in + self.out_per_group)

    def factorized_params(self, rank: int, bias: bool | None = None) -> int:
        """Parameters of the pair at total rank ``rank``."""
        has_bias = self.bias if bias is None else bias
        return rank * (self.fan_in + self.out_per_group) + (self.out_features if has_bias else 0)


def describe_module(module: nn.Module, output_numel: int) -> LayerShape | None:
    """The :class:`LayerShape` of a supported module, or ``None`` if it is not one.

    >>> describe_module(nn.Conv2d(8, 16, 3), output_numel=16 * 6 * 6).positions
    36
    """
    factorized = isinstance(module, (FactorizedLinear, FactorizedConvNd))
    if isinstance(module, (nn.Linear, FactorizedLinear)):
        kind, kernel, groups = "linear", (), 1
        in_size, out = module.in_features, module.out_features
        latent = module.latent_features if factorized else None
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, FactorizedConvNd)):
        kind, kernel, groups = (
            f"conv{len(module.kernel_size)}d",
            tuple(module.kernel_size),
            module.groups,
        )
        in_size, out = module.in_channels, module.out_channels
        latent = module.latent_channels if factorized else None
    else:
        return None
    bias = (module.module1 if factorized else module).bias is not None
    return LayerShape(kind, in_size, out, kernel, groups, output_numel // out, bias, latent=latent)


def annotate_costs(gm: fx.GraphModule) -> fx.GraphModule:
    """Attach a :class:`LayerShape` to each supported ``call_module`` node (needs shape metadata).

    >>> import torch
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> gm = propagate_shapes(fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2))), torch.ones(3, 4))
    >>> [n.meta[LAYER_META].macs for n in annotate_costs(gm).graph.nodes if LAYER_META in n.meta]
    [24]
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or "tensor_meta" not in node.meta:
            continue
        meta = node.meta["tensor_meta"]
        shape = getattr(meta, "shape", None)
        if shape is None:  # the module returned a non-tensor
            continue
        layer = describe_module(gm.get_submodule(node.target), math.prod(shape))
        if layer is not None:
            node.meta[LAYER_META] = layer
    return gm
