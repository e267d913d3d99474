"""Factorization methods: a registry of name → handler, so a new method plugs in without touching
the passes. A handler knows which layers it takes, the cost of its replacement at a rank, and how
to solve and build that replacement (see :class:`fxfactorize.methods.base.Method`); each module
registers its handlers where they are defined. ``"auto"`` is not a handler: the planner picks,
per conv, the pair or a registered conv structure (:data:`CONV_STRUCTURES`), and the pair for
Linear layers.
"""

from fxfactorize.methods.base import (
    AUTO_METHOD,
    DEFAULT_METHOD,
    Method,
    Solved,
    get_method,
    register_method,
    registered_methods,
)
from fxfactorize.methods.lowrank import LowRankMethod
from fxfactorize.methods.structured import CONV_STRUCTURES, SpatialMethod, Tucker2Method
from fxfactorize.methods.tensorized import TensorizedMethod

__all__ = [
    "AUTO_METHOD",
    "CONV_STRUCTURES",
    "DEFAULT_METHOD",
    "LowRankMethod",
    "Method",
    "Solved",
    "SpatialMethod",
    "TensorizedMethod",
    "Tucker2Method",
    "get_method",
    "register_method",
    "registered_methods",
]
