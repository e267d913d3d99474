"""Factorization methods: a registry of name → handler, so a new method plugs in without touching
the passes. A handler knows which layers it takes, the cost of its replacement at a rank, and how
to solve and build that replacement (see :class:`fxfactorize.methods.base.Method`).
"""

from fxfactorize.methods.base import Method, Solved, get_method, register_method
from fxfactorize.methods.lowrank import LowRankMethod

register_method(LowRankMethod())

__all__ = ["LowRankMethod", "Method", "Solved", "get_method", "register_method"]
