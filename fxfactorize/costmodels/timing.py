"""Wall-clock timing of a callable: warm-up, then the median of repeats (synchronised on GPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_seconds"]


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall-clock seconds of one call of ``fn`` over ``repeats`` calls, after ``warmup``.

    >>> median_seconds(lambda: sum(range(100)), repeats=3, warmup=1) > 0
    True
    """
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
    return statistics.median(samples)
