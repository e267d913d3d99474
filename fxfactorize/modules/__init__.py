"""The replacement modules: Composer-compatible factorized pairs for Linear and Conv1d/2d/3d, and
the other conv structures (spatial SVD, Tucker-2)."""

from fxfactorize.modules.conv import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedConvNd,
)
from fxfactorize.modules.linear import FactorizedLinear
from fxfactorize.modules.pair import FactorizedPair, factorizing_could_speedup
from fxfactorize.modules.structured import STRUCTURED_CONVS, SpatialConv2d, Tucker2Conv

__all__ = [
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedConvNd",
    "FactorizedLinear",
    "FactorizedPair",
    "STRUCTURED_CONVS",
    "SpatialConv2d",
    "Tucker2Conv",
    "factorizing_could_speedup",
]
