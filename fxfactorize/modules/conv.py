"""The rank-r conv pairs: a conv with the original kernel, stride, padding, dilation, padding mode
and groups to ``latent_channels`` channels (no bias), then a pointwise conv to ``out_channels``
(same groups, with bias). ``FactorizedConv2d`` adds Composer's extra methods (``from_conv2d``,
``set_rank``, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fxfactorize.core.composer_api import factorize_conv2d
from fxfactorize.core.latent import max_rank_with_speedup
from fxfactorize.core.lowrank import factorize_weight
from fxfactorize.core.solution import LowRankSolution
from fxfactorize.layers import conv_arguments
from fxfactorize.modules.pair import FactorizedPair, check_init, kept_bias

__all__ = ["FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d", "FactorizedConvNd"]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _ntuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


class FactorizedConvNd(FactorizedPair):
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
    def layer_kind(self) -> str:
        return f"conv{self.dims}d"

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.kernel_size)

    def conv_arguments(self) -> dict[str, Any]:
        conv = self.module0
        return {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "padding_mode": conv.padding_mode,
        }

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


class FactorizedConv2d(FactorizedConvNd):
    """Factorized replacement for :class:`torch.nn.Conv2d`: a K×K conv to ``latent_channels``
    channels (with the original stride, padding, dilation, padding mode and groups) followed by a
    1×1 conv to ``out_channels`` (same groups, with bias).

    With ``groups = g`` each group is factorized on its own: ``module0`` is
    ``Conv2d(in, r, K, groups=g)`` and ``module1`` ``Conv2d(r, out, 1, groups=g)``, so ``r`` is a
    multiple of ``g`` and the group structure is kept.

    >>> conv = FactorizedConv2d(64, 64, 3, latent_channels=16, padding=1)
    >>> conv(torch.randn(1, 64, 8, 8)).shape
    torch.Size([1, 64, 8, 8])
    """

    dims = 2
    conv_class = nn.Conv2d

    @staticmethod
    def max_allowed_latent_channels(
        in_channels: int, out_channels: int, kernel_size: int | tuple[int, int]
    ) -> int:
        """Largest latent channel count that lowers the multiply-add count (groups=1).

        >>> FactorizedConv2d.max_allowed_latent_channels(256, 256, 3)
        230
        """
        kh, kw = _pair(kernel_size)
        return max_rank_with_speedup(in_channels * kh * kw, out_channels)

    # Composer names this method with "features" on the conv class; kept so ported code runs.
    max_allowed_latent_features = max_allowed_latent_channels

    def _solve_for_rank(self, input: torch.Tensor, rank: int) -> LowRankSolution:
        return factorize_conv2d(
            input.detach(),
            self.module0.weight,
            self.module1.weight,
            rank=rank,
            biasB=self.module1.bias,
            groups=self.groups,
            **self.convolution_kwargs,
        )

    @classmethod
    def from_conv2d(
        cls, module: nn.Conv2d, module_ix: int = -1, init: str = "svd", **kwargs
    ) -> FactorizedConv2d:
        """A factorized copy of ``module`` with its stride, padding, dilation, padding mode and groups.

        ``init="svd"`` (default) keeps the conv's function as well as the rank allows (truncated
        SVD of each group's ``[out/g, in/g·kh·kw]`` weight, bias kept); ``init="random"`` gives
        Composer's freshly initialised layers. ``kwargs`` go to the constructor (e.g.
        ``latent_channels``); ``module_ix`` is accepted for Composer compatibility.

        >>> conv = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        >>> pair = FactorizedConv2d.from_conv2d(conv, latent_channels=8)
        >>> tuple(pair(torch.randn(1, 32, 8, 8)).shape), pair.module0.stride
        ((1, 64, 4, 4), (2, 2))
        """
        check_init(init)
        weight = module.weight
        kwargs.setdefault("bias", module.bias is not None)
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            groups=module.groups,
            **conv_arguments(module),
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        if init == "svd":
            groups, rank = module.groups, new.latent_size
            grouped = weight.detach().reshape(groups, module.out_channels // groups, -1)
            factors = factorize_weight(grouped, module.bias, rank // groups)
            wa = factors.first.reshape(rank, module.in_channels // groups, *new.kernel_size)
            wb = factors.second.reshape(module.out_channels, rank // groups, 1, 1)
            new.apply_solution(LowRankSolution(wa, wb, kept_bias(module, new), rank))
        return new


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
