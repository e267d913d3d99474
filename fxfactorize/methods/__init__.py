"""Factorization methods: a registry of name → handler, so a new method plugs in without touching
the passes. A handler knows which layers it takes, the cost of its replacement at a rank, and how
to solve and build that replacement (see :class:`fxfactorize.methods.base.Method`); each module
registers its handlers where they are defined.
"""

from fxfactorize.methods.base import (
    DEFAULT_METHOD,
    Method,
    Solved,
    get_method,
    register_method,
    registered_methods,
)
from fxfactorize.methods.lowrank import LowRankMethod
from fxfactorize.methods.tensorized import TensorizedMethod

__all__ = [
    "DEFAULT_METHOD",
    "LowRankMethod",
    "Method",
    "Solved",
    "TensorizedMethod",
    "get_method",
    "register_method",
    "registered_methods",
]
