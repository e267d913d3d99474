"""Rank policies: ``'same'``, a fraction of the dense parameter count, or explicit ranks."""

from __future__ import annotations

import itertools
import math
import numbers

from fxfactorize.tensorized.structure import Structure

__all__ = ["resolve_ranks"]


def _check_int(value: object, name: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must contain ints >= 1; got {value!r}")


def resolve_ranks(
    factorization: str,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    rank: object,
    n_layers: int = 1,
) -> Structure:
    """The :class:`Structure` for ``rank``.

    ``rank`` is ``'same'`` (as many parameters as the dense weights), a float > 0 (that fraction
    of the dense parameter count; the closest count the format can reach, within 2 % for layers
    of realistic size), an int (CP rank, Tucker rank of every mode, TT bond size) or a tuple of
    explicit ranks in :class:`Structure`'s convention.

    >>> s = resolve_ranks("tt", (8, 8, 16), (8, 8, 16), 0.25)
    >>> s.ranks, abs(s.n_parameters / 1024**2 - 0.25) < 0.005
    ((1, 8, 64, 122, 121, 16, 1), True)
    >>> resolve_ranks("cp", (4, 4), (4, 4), 3).ranks
    (3,)
    >>> resolve_ranks("cp", (4, 4), (4, 4), "half")
    Traceback (most recent call last):
    ...
    ValueError: rank must be 'same', a float > 0, an int >= 1 or a tuple of ints; got 'half'
    """
    probe = Structure(factorization, in_modes, out_modes, n_layers, ())
    n_modes = len(probe.mode_names)
    if isinstance(rank, str) and rank == "same":
        rank = 1.0
    if isinstance(rank, float) and not isinstance(rank, bool):
        if not (rank > 0 and math.isfinite(rank)):
            raise ValueError(f"rank as a fraction must be a float > 0; got {rank!r}")
        target = rank * n_layers * math.prod(in_modes) * math.prod(out_modes)
        return _fit(probe, target)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        r = _check_int(rank, "rank")
        caps = probe.max_ranks() if factorization != "cp" else (r,)
        if factorization == "cp":
            ranks = (r,)
        elif factorization == "tucker":
            ranks = tuple(min(r, c) for c in caps)
        else:
            ranks = (1, *(min(r, c) for c in caps[1:-1]), 1)
        return dataclasses_replace(probe, ranks)
    if isinstance(rank, (tuple, list)):
        ranks = tuple(_check_int(v, "rank") for v in rank)
        expected = {"cp": 1, "tucker": n_modes}.get(factorization, len(probe.core_groups()) + 1)
        if len(ranks) != expected:
            raise ValueError(
                f"rank for {factorization!r} must have {expected} entries here; got {tuple(rank)}"
            )
        if factorization in ("tt", "blocktt") and (ranks[0] != 1 or ranks[-1] != 1):
            raise ValueError(f"rank for {factorization!r} must start and end with 1; got {ranks}")
        if factorization == "tucker":
            sizes = list(probe.mode_sizes.values())
            if any(r > n for r, n in zip(ranks, sizes, strict=True)):
                raise ValueError(f"rank {ranks} exceeds the mode sizes {tuple(sizes)}")
        return dataclasses_replace(probe, ranks)
    raise ValueError(
        f"rank must be 'same', a float > 0, an int >= 1 or a tuple of ints; got {rank!r}"
    )


def dataclasses_replace(structure: Structure, ranks: tuple[int, ...]) -> Structure:
    return Structure(
        structure.format, structure.in_modes, structure.out_modes, structure.n_layers, ranks
    )


def _fit(probe: Structure, target: float) -> Structure:
    """Ranks whose parameter count is closest to ``target``."""
    if probe.format == "cp":
        per_rank = sum(probe.mode_sizes.values())
        return dataclasses_replace(probe, (max(1, round(target / per_rank)),))
    if probe.format == "tucker":
        return _fit_tucker(probe, target)
    return _fit_tt(probe, target)


def _fit_tucker(probe: Structure, target: float) -> Structure:
    sizes = list(probe.mode_sizes.values())

    def ranks_at(alpha: float) -> tuple[int, ...]:
        return tuple(min(n, max(1, round(alpha * n))) for n in sizes)

    def params(ranks: tuple[int, ...]) -> int:  # core + factors, without building a Structure
        return math.prod(ranks) + sum(r * n for r, n in zip(ranks, sizes, strict=True))

    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on a common fraction of every mode
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(ranks_at(mid)) < target else (lo, mid)
    base = ranks_at(hi)
    # then the best nearby combination: one rank step can move the core by > 10 %
    best = base
    for spread in (1, 2):  # widen the search only when the narrow one misses by more than 1 %
        choices = [
            range(max(1, r - spread), min(n, r + spread) + 1)
            for r, n in zip(base, sizes, strict=True)
        ]
        best = min(itertools.product(*choices), key=lambda rs: abs(params(rs) - target))
        if abs(params(best) - target) <= 0.01 * target or len(sizes) > 7:
            break
    return dataclasses_replace(probe, tuple(best))


def _fit_tt(probe: Structure, target: float) -> Structure:
    caps = probe.max_ranks()

    def uniform(r: int) -> tuple[int, ...]:
        return (1, *(min(r, c) for c in caps[1:-1]), 1)

    r = 1
    while (
        uniform(r + 1) != uniform(r)
        and dataclasses_replace(probe, uniform(r + 1)).n_parameters <= target
    ):
        r += 1
    ranks = list(uniform(r))
    # raise single bonds, middle first, while that brings the count closer to the target
    order = sorted(range(1, len(ranks) - 1), key=lambda k: abs(k - len(ranks) / 2))
    improved = True
    while improved:
        improved = False
        for k in order:
            if ranks[k] >= caps[k]:
                continue
            now = dataclasses_replace(probe, tuple(ranks)).n_parameters
            ranks[k] += 1
            after = dataclasses_replace(probe, tuple(ranks)).n_parameters
            if abs(after - target) < abs(now - target):
                improved = True
            else:
                ranks[k] -= 1
    return dataclasses_replace(probe, tuple(ranks))
