"""`FactorizedConv1d` and `FactorizedConv3d`: the rank-r conv pair for 1-d and 3-d convolutions.

They share :class:`~fxfactorize.modules.factorized.FactorizedConvNd` with ``FactorizedConv2d``: a conv
with the original kernel, stride, padding, dilation, padding mode and groups to ``latent_channels``
channels (no bias), then a pointwise conv to ``out_channels`` (same groups, with bias).
``FactorizedConv2d`` adds Composer's extra methods (``from_conv2d``, ``set_rank``, ...).
"""

from __future__ import annotations

import torch  # noqa: F401  (doctests)
from torch import nn

from fxfactorize.modules.factorized import FactorizedConvNd

__all__ = ["FactorizedConv1d", "FactorizedConv3d", "FactorizedConvNd"]


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
