"""The replacement modules: Composer-compatible factorized pairs for Linear and Conv1d/2d/3d."""

from fxfactorize.modules.conv import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedConvNd,
)
from fxfactorize.modules.linear import FactorizedLinear
from fxfactorize.modules.pair import FactorizedPair, factorizing_could_speedup

__all__ = [
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedConvNd",
    "FactorizedLinear",
    "FactorizedPair",
    "factorizing_could_speedup",
]
