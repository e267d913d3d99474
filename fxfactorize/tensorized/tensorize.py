"""Balanced factorizations of a feature count into tensor modes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["tensorize_features", "validate_tensorized_features"]


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def tensorize_features(n_features: int, n_modes: int = 3) -> tuple[int, ...]:
    """Split ``n_features`` into ``n_modes`` integer factors whose sizes are as equal as possible.

    Primes are dealt, largest first, to the currently smallest factor; the result is ascending.

    >>> tensorize_features(1024, 3)
    (8, 8, 16)
    >>> tensorize_features(768, 2)
    (24, 32)
    """
    if not isinstance(n_features, numbers.Integral) or n_features < 1:
        raise ValueError(f"n_features must be an int >= 1; got {n_features!r}")
    if not isinstance(n_modes, numbers.Integral) or isinstance(n_modes, bool) or n_modes < 1:
        raise ValueError(f"n_tensorized_modes must be an int >= 1; got {n_modes!r}")
    modes = [1] * int(n_modes)
    for prime in sorted(_prime_factors(int(n_features)), reverse=True):
        modes[modes.index(min(modes))] *= prime
    return tuple(sorted(modes))


def validate_tensorized_features(
    value: Sequence[int], features: int | None, name: str
) -> tuple[int, ...]:
    """Check a tensorized shape (positive ints whose product is ``features`` when given).

    >>> validate_tensorized_features([4, 8], 32, "in_tensorized_features")
    (4, 8)
    >>> validate_tensorized_features((4, 8), 30, "in_tensorized_features")
    Traceback (most recent call last):
    ...
    ValueError: in_tensorized_features=(4, 8) has product 32, but the layer has 30 features
    """
    try:
        shape = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of ints >= 1; got {value!r}") from None
    if not shape or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape
    ):
        raise ValueError(f"{name} must be a non-empty tuple of ints >= 1; got {value!r}")
    shape = tuple(int(v) for v in shape)
    if features is not None and math.prod(shape) != features:
        raise ValueError(
            f"{name}={shape} has product {math.prod(shape)}, but the layer has {features} features"
        )
    return shape
