"""Factorization methods: a registry of name → handler, so a new method plugs in without touching
the passes. A handler knows which layers it takes, the cost of its replacement at a rank, and how
to solve and build that replacement (see :class:`fxfactorize.methods.base.Method`).
"""

from fxfactorize.methods.base import Method, Solved, get_method, register_method
from fxfactorize.methods.lowrank import LowRankMethod

register_method(LowRankMethod())

from fxfactorize.methods.tensorized import TensorizedMethod, register_tensorized_methods  # noqa: E402

register_tensorized_methods(register_method)

__all__ = [
    "LowRankMethod",
    "Method",
    "Solved",
    "TensorizedMethod",
    "get_method",
    "register_method",
]
