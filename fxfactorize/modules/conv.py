"""`FactorizedConv1d` and `FactorizedConv3d`: the rank-r conv pair for 1-d and 3-d convolutions.

They share :class:`FactorizedConvNd`, an N-d version of :class:`FactorizedConv2d`'s layout: a conv
with the original kernel, stride, padding, dilation, padding mode and groups to ``latent_channels``
channels (no bias), then a pointwise conv to ``out_channels`` (same groups, with bias).
``FactorizedConv2d`` keeps its own class (it carries Composer's extra methods).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxfactorize.core.solution import LowRankSolution
from fxfactorize.modules.factorized import _FactorizedModule, max_rank_with_speedup

__all__ = ["FactorizedConv1d", "FactorizedConv3d", "FactorizedConvNd"]


def _ntuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


class FactorizedConvNd(_FactorizedModule):
    """Shared logic of the N-d conv pairs; subclasses set ``dims`` and ``conv_class``."""

    dims: int = 0
    conv_class: type[nn.Module] = nn.Module

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        latent_channels: int | float = 0.25,
        **kwargs,
    ) -> None:
        groups = int(kwargs.pop("groups", 1))
        bias = bool(kwargs.pop("bias", True))
        factory = {"device": kwargs.pop("device", None), "dtype": kwargs.pop("dtype", None)}
        self.kernel_size = _ntuple(kernel_size, self.dims)
        super().__init__(in_channels, out_channels, latent_channels, groups=groups)
        if not self.should_factorize(self.latent_size):
            raise ValueError(
                f"latent_channels={self.latent_size} does not reduce multiply-adds for a "
                f"{in_channels}->{out_channels} {self.kernel_size} conv; it must be <= "
                f"{self._max_rank_with_speedup()}"
            )
        self.convolution_kwargs = dict(kwargs)
        self.module0 = self.conv_class(
            in_channels,
            self.latent_size,
            self.kernel_size,
            groups=groups,
            bias=False,
            **kwargs,
            **factory,
        )
        self.module1 = self.conv_class(
            self.latent_size, out_channels, 1, groups=groups, bias=bias, **factory
        )

    def _fan_in_per_group(self) -> int:
        return self.in_size // self.groups * math.prod(self.kernel_size)

    @property
    def in_channels(self) -> int:
        return self.in_size

    @property
    def out_channels(self) -> int:
        return self.out_size

    @property
    def latent_channels(self) -> int:
        """Output channels of ``module0``, input channels of ``module1``."""
        return self.latent_size

    def _set_latent(self, rank: int) -> None:
        self.latent_size = rank
        self.module0.out_channels = rank
        self.module1.in_channels = rank

    def _solution_weights(self, solution: LowRankSolution) -> tuple[torch.Tensor, torch.Tensor]:
        return solution.Wa, solution.Wb  # [r, in/g, *kernel] and [out, r/g, 1, ...]

    @classmethod
    def max_allowed_latent_channels(
        cls, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...]
    ) -> int:
        """Largest latent channel count that lowers the multiply-add count (groups=1)."""
        fan_in = in_channels * math.prod(_ntuple(kernel_size, cls.dims))
        return max_rank_with_speedup(fan_in, out_channels)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_size}, out_channels={self.out_size}, "
            f"kernel_size={self.kernel_size}, latent_channels={self.latent_size}, groups={self.groups}"
        )


class FactorizedConv1d(FactorizedConvNd):
    """Factorized replacement for :class:`torch.nn.Conv1d` (see :class:`FactorizedConvNd`).

    >>> conv = FactorizedConv1d(64, 64, 5, latent_channels=16, padding=2)
    >>> conv(torch.randn(2, 64, 30)).shape, conv.module1.kernel_size
    (torch.Size([2, 64, 30]), (1,))
    """

    dims = 1
    conv_class = nn.Conv1d


class FactorizedConv3d(FactorizedConvNd):
    """Factorized replacement for :class:`torch.nn.Conv3d` (see :class:`FactorizedConvNd`).

    >>> conv = FactorizedConv3d(32, 32, 3, latent_channels=8, padding=1)
    >>> conv(torch.randn(1, 32, 4, 5, 6)).shape
    torch.Size([1, 32, 4, 5, 6])
    >>> FactorizedConv3d.max_allowed_latent_channels(32, 32, 3)
    30
    """

    dims = 3
    conv_class = nn.Conv3d
