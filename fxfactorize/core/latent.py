"""Latent sizes: an int ≥ 1 is a rank, a float in (0, 1) a fraction of ``min(in, out)``; and the
largest rank at which a pair still saves multiply-adds."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["max_rank_with_speedup", "resolve_latent_size", "validate_latent_size"]


def validate_latent_size(value: Any, name: str) -> int | float:
    """Check a latent size: an int ≥ 1 (a rank) or a float in (0, 1) (a fraction).

    >>> validate_latent_size(0.25, "latent_channels")
    0.25
    >>> validate_latent_size(0, "latent_features")
    Traceback (most recent call last):
    ...
    ValueError: latent_features must be an int >= 1 (a rank) or a float in (0, 1) (a fraction of min(in, out)); got 0
    """
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_fraction = isinstance(value, float) and 0.0 < value < 1.0
    if (is_int and value >= 1) or is_fraction:
        return int(value) if is_int else float(value)
    raise ValueError(
        f"{name} must be an int >= 1 (a rank) or a float in (0, 1) "
        f"(a fraction of min(in, out)); got {value!r}"
    )


def resolve_latent_size(latent_size: int | float, in_size: int, out_size: int) -> int:
    """Turn a latent size into a rank for a layer with ``in_size`` inputs and ``out_size`` outputs.

    A float is a fraction of ``min(in_size, out_size)``, rounded down, at least 1 (Composer's rule).

    >>> resolve_latent_size(0.25, 512, 2048)
    128
    >>> resolve_latent_size(96, 512, 2048)
    96
    """
    latent_size = validate_latent_size(latent_size, "latent_size")
    if isinstance(latent_size, float):
        return max(1, int(latent_size * min(in_size, out_size)))
    return latent_size


def max_rank_with_speedup(fan_in: int, out_size: int) -> int:
    """Largest rank ``r`` with ``r · (fan_in + out) < fan_in · out`` (fewer multiply-adds).

    >>> max_rank_with_speedup(512, 512)
    255
    """
    breakeven = fan_in * out_size / (fan_in + out_size)
    return int(math.ceil(breakeven - 1))
