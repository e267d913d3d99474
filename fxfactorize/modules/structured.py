"""The two other conv structures as plain modules of ordinary convs (children ``module0``, ...):

* :class:`SpatialConv2d` — spatial SVD (AIMET's): a ``K_h×1`` conv to ``rank`` channels (the
  original's vertical stride, padding and dilation), then a ``1×K_w`` conv to ``out`` (the
  horizontal ones, with the bias).
* :class:`Tucker2Conv` — Tucker-2 (Kim et al., ICLR 2016): a pointwise conv ``in → r₁``, the
  original ``K×K`` conv ``r₁ → r₂`` (stride, padding, dilation, padding mode), a pointwise conv
  ``r₂ → out`` with the bias. 1-d, 2-d and 3-d.

Both compute exactly their effective weight's conv for every padding mode: padding (zeros,
reflect, replicate, circular) commutes with a channel mix and, per axis, with a conv along the
other axis. Neither supports groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxfactorize.core.structured import spatial_weight, tucker2_weight

__all__ = ["STRUCTURED_CONVS", "SpatialConv2d", "Tucker2Conv", "spatial_convs"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _split(value: Any, axis: int, neutral: int) -> Any:
    """The per-axis part of a 2-d conv argument: ``value`` on ``axis``, ``neutral`` on the other
    (a string padding — ``'same'``/``'valid'`` — applies per axis as it is)."""
    if isinstance(value, str):
        return value
    pair = (value, value) if isinstance(value, int) else tuple(value)
    return tuple(pair[i] if i == axis else neutral for i in range(2))


def spatial_convs(
    in_channels: int,
    out_channels: int,
    rank: int,
    kernel_size: tuple[int, int],
    bias: bool = True,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    padding_mode: str = "zeros",
    **factory: Any,
) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The vertical and horizontal convs of a spatial SVD of a conv with these arguments.

    >>> first, second = spatial_convs(8, 16, 4, (3, 5), stride=2, padding=(1, 2))
    >>> first.kernel_size, first.stride, first.padding, second.kernel_size, second.padding
    ((3, 1), (2, 1), (1, 0), (1, 5), (0, 2))
    """
    first = nn.Conv2d(
        in_channels,
        rank,
        (kernel_size[0], 1),
        stride=_split(stride, 0, 1),
        padding=_split(padding, 0, 0),
        dilation=_split(dilation, 0, 1),
        padding_mode=padding_mode,
        bias=False,
        **factory,
    )
    second = nn.Conv2d(
        rank,
        out_channels,
        (1, kernel_size[1]),
        stride=_split(stride, 1, 1),
        padding=_split(padding, 1, 0),
        dilation=_split(dilation, 1, 1),
        padding_mode=padding_mode,
        bias=bias,
        **factory,
    )
    return first, second


class SpatialConv2d(nn.Module):
    """Spatial SVD of a 2-d conv: ``K_h×1`` to ``rank`` channels, then ``1×K_w`` to ``out``.

    >>> layer = SpatialConv2d(8, 16, (3, 3), rank=4, padding=1)
    >>> tuple(layer(torch.randn(2, 8, 10, 10)).shape), tuple(layer.effective_weight().shape)
    ((2, 16, 10, 10), (16, 8, 3, 3))
    """

    structure = "spatial"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        rank: int,
        bias: bool = True,
        **conv_args: Any,
    ) -> None:
        super().__init__()
        self.rank = int(rank)
        self.module0, self.module1 = spatial_convs(
            in_channels, out_channels, self.rank, tuple(kernel_size), bias, **conv_args
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.module1(self.module0(input))

    def effective_weight(self) -> torch.Tensor:
        """The ``[out, in, K_h, K_w]`` weight of the conv this module computes."""
        return spatial_weight(self.module0.weight, self.module1.weight)

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.module1.bias


class Tucker2Conv(nn.Module):
    """Tucker-2 of a conv: pointwise ``in → r₁``, the original kernel ``r₁ → r₂``, pointwise ``r₂ → out``.

    >>> layer = Tucker2Conv(8, 16, (3, 3), ranks=(4, 6), stride=2, padding=1)
    >>> tuple(layer(torch.randn(2, 8, 10, 10)).shape), tuple(layer.effective_weight().shape)
    ((2, 16, 5, 5), (16, 8, 3, 3))
    """

    structure = "tucker2"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        ranks: tuple[int, int],
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        **conv_args: Any,
    ) -> None:
        super().__init__()
        kernel = tuple(kernel_size)
        conv = _CONVS[len(kernel)]
        factory = {"device": device, "dtype": dtype}
        self.ranks = (int(ranks[0]), int(ranks[1]))
        r1, r2 = self.ranks
        self.module0 = conv(in_channels, r1, 1, bias=False, **factory)
        self.module1 = conv(r1, r2, kernel, bias=False, **conv_args, **factory)
        self.module2 = conv(r2, out_channels, 1, bias=bias, **factory)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.module2(self.module1(self.module0(input)))

    def effective_weight(self) -> torch.Tensor:
        """The ``[out, in, *kernel]`` weight of the conv this module computes."""
        first = self.module0.weight.flatten(1)
        last = self.module2.weight.flatten(1)
        return tucker2_weight(first, self.module1.weight, last)

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.module2.bias


#: The structured conv modules (the equivalence checker finds factorized layers by these types).
STRUCTURED_CONVS = (SpatialConv2d, Tucker2Conv)
