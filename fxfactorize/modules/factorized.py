"""Where the pair classes used to live; kept so existing imports work.

``FactorizedLinear`` is in :mod:`fxfactorize.modules.linear`, the conv pairs in
:mod:`fxfactorize.modules.conv`, their base :class:`FactorizedPair` in :mod:`fxfactorize.modules.pair`.
"""

from fxfactorize.core.latent import max_rank_with_speedup
from fxfactorize.modules.conv import FactorizedConv2d, FactorizedConvNd
from fxfactorize.modules.linear import FactorizedLinear
from fxfactorize.modules.pair import FactorizedPair, factorizing_could_speedup

_FactorizedModule = FactorizedPair  # the old private name

__all__ = [
    "FactorizedConv2d",
    "FactorizedConvNd",
    "FactorizedLinear",
    "FactorizedPair",
    "factorizing_could_speedup",
    "max_rank_with_speedup",
]
