"""Wall-clock timing of a callable: warm-up, then repeats (synchronised on GPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["best_seconds", "median_seconds"]


def _samples(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
    return samples


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall-clock seconds of one call of ``fn`` over ``repeats`` calls, after ``warmup``.

    >>> median_seconds(lambda: sum(range(100)), repeats=3, warmup=1) > 0
    True
    """
    return statistics.median(_samples(fn, repeats, warmup))


def best_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Fastest wall-clock seconds of one call of ``fn`` over ``repeats`` calls, after ``warmup``.

    What the device can do: other work on the machine only ever adds time, so the minimum varies
    less between runs than the median (for a micro-benchmark, not for a whole model).

    >>> best_seconds(lambda: sum(range(100)), repeats=3, warmup=1) > 0
    True
    """
    return min(_samples(fn, repeats, warmup))
