"""The layer vocabulary every other part stands on: which modules are Linear/Conv layers, their
geometry (:class:`LayerShape`), their weights grouped per conv group, and their conv arguments.

This is the one place that tells a Linear from a Conv. Factorized layers (defined above this
module, in :mod:`fxfactorize.modules`) take part through the :class:`FactorizedLayer` interface.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "OP_NAMES",
    "PLAIN_LAYERS",
    "FactorizedLayer",
    "LayerShape",
    "conv_arguments",
    "describe_module",
    "grouped_weight",
    "layer_kind",
]

#: The torch layers the pass factorizes.
PLAIN_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Report names of the layer kinds.
OP_NAMES = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}


class FactorizedLayer(nn.Module):
    """What a factorized replacement of a Linear/Conv exposes to the rest of the package.

    :class:`fxfactorize.modules.FactorizedPair` implements it; nothing outside a pair reads its
    children.
    """

    in_size: int
    out_size: int
    groups: int
    latent_size: int

    @property
    def layer_kind(self) -> str:
        """``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``: the layer it replaces."""
        raise NotImplementedError

    @property
    def kernel(self) -> tuple[int, ...]:
        """Kernel size of the layer it replaces (``()`` for a Linear)."""
        raise NotImplementedError

    @property
    def has_bias(self) -> bool:
        """Whether the output carries a bias."""
        raise NotImplementedError

    def grouped_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The effective weight ``[G, M_g, D_g]`` and output bias."""
        raise NotImplementedError

    def conv_arguments(self) -> dict[str, Any]:
        """``stride``, ``padding``, ``dilation``, ``padding_mode`` (a conv) or ``{}``."""
        raise NotImplementedError


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``/``"conv2d"``/``"conv3d"`` for a layer the pass handles, else ``None``.

    >>> layer_kind(nn.Linear(2, 3)), layer_kind(nn.Conv3d(1, 1, 1)), layer_kind(nn.ReLU())
    ('linear', 'conv3d', None)
    """
    if isinstance(module, FactorizedLayer):
        return module.layer_kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"conv{module.weight.dim() - 2}d"
    return None


def grouped_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [G, M_g, D_g], bias)`` of a Linear, a Conv or a factorized layer (its product).

    >>> tuple(grouped_weight(nn.Conv2d(4, 6, 3, groups=2))[0].shape)
    (2, 3, 18)
    """
    if isinstance(module, FactorizedLayer):
        return module.grouped_weight()
    weight = module.weight
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1), module.bias


def conv_arguments(module: nn.Module) -> dict[str, Any]:
    """The ``stride``, ``padding``, ``dilation`` and ``padding_mode`` of a conv (or its pair).

    >>> conv_arguments(nn.Conv2d(1, 1, 3, stride=2))["stride"]
    (2, 2)
    """
    if isinstance(module, FactorizedLayer):
        return dict(module.conv_arguments())
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "padding_mode": module.padding_mode,
    }


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
    #: a conv's stride (``()``: unit or unknown); structures whose first conv runs at the input's
    #: resolution cost ``prod(stride)`` times more there
    stride: tuple[int, ...] = ()

    @property
    def input_positions(self) -> int:
        """Positions at the input's resolution (about ``positions · prod(stride)``).

        >>> LayerShape("conv2d", 8, 8, (3, 3), 1, positions=16, bias=False, stride=(2, 2)).input_positions
        64
        """
        return self.positions * math.prod(self.stride)

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


def describe_module(module: nn.Module, output_numel: int = 0) -> LayerShape | None:
    """The :class:`LayerShape` of a layer the pass handles (``None`` for any other module);
    ``output_numel`` (elements of one output) gives its ``positions``.

    >>> describe_module(nn.Conv2d(8, 16, 3), output_numel=16 * 6 * 6).positions
    36
    """
    kind = layer_kind(module)
    if kind is None:
        return None
    if isinstance(module, FactorizedLayer):
        in_size, out_size, kernel = module.in_size, module.out_size, module.kernel
        bias, latent = module.has_bias, module.latent_size
    else:
        weight = module.weight
        in_size = weight.shape[1] * getattr(module, "groups", 1)
        out_size, kernel = weight.shape[0], tuple(weight.shape[2:])
        bias, latent = module.bias is not None, None
    groups = getattr(module, "groups", 1)
    stride = tuple(conv_arguments(module)["stride"]) if kind != "linear" else ()
    return LayerShape(
        kind, in_size, out_size, kernel, groups, output_numel // out_size, bias, latent, stride
    )
