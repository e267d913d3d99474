"""How far to trust the calibration data: shrinkage chosen by cross-validation over folds.

A data-aware solve fits the calibration inputs exactly; when they are few (or few *distinct*:
crops of a handful of photos) it fits their accidents and does worse than data-free on new inputs.
:func:`choose_shrinkage` blends the statistics toward the data-free problem by each ``α`` of
:data:`SHRINKAGE_GRID` (see :func:`fxfactorize.core.lowrank.shrunk_problem`), solves on all folds
but one, measures the error on the held-out fold, and keeps the ``α`` with the least error summed
over the folds. ``α = 1`` (data-free) is on the grid, so the choice is never worse than data-free
on the held-out folds; ties go to the larger ``α``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fxfactorize.core.lowrank import (
    RIDGE,
    error_energy,
    refit_bias,
    shrunk_problem,
    top_singular_pair,
    truncated_svd,
)
from fxfactorize.core.moments import InputMoments, Statistics

__all__ = ["SHRINKAGE_GRID", "ShrinkageChoice", "choose_shrinkage", "sum_statistics"]

#: The blends tried, from the calibration data alone (0) to data-free (1).
SHRINKAGE_GRID = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class ShrinkageChoice:
    """The chosen ``alpha`` and the held-out error of every ``α`` tried (``errors``, relative to
    data-free's: 1.0 is as good as data-free), or why none could be validated (``reason``)."""

    alpha: float
    errors: dict[float, float]
    reason: str | None = None


def sum_statistics(parts: Sequence[Statistics]) -> Statistics:
    """The statistics of all rows of ``parts`` (they add up).

    >>> a, b = InputMoments.zeros(2), InputMoments.zeros(2)
    >>> a.update(torch.ones(3, 2)); b.update(torch.ones(4, 2))
    >>> sum_statistics([a, b]).count
    7
    """
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def choose_shrinkage(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank_per_group: int,
    folds: Sequence[Statistics],
    grid: Sequence[float] = SHRINKAGE_GRID,
) -> ShrinkageChoice:
    """The ``α`` of ``grid`` whose solutions, each fitted without one fold, err least on it.

    ``weight`` is ``[G, M_g, D_g]``; ``folds`` are disjoint parts of the calibration statistics.
    With fewer than two folds holding at least two rows each, or inputs that do not vary, nothing
    can be validated and the answer is ``α = 1`` (data-free) with the reason.

    >>> _ = torch.manual_seed(0); w = torch.randn(1, 6, 8)
    >>> folds = [InputMoments.zeros(8), InputMoments.zeros(8)]
    >>> for fold in folds: fold.update(torch.randn(2, 8))  # 4 rows for 8 inputs: scarce
    >>> choice = choose_shrinkage(w, None, 2, folds)
    >>> choice.alpha > 0, min(choice.errors.values()) <= choice.errors[1.0]
    (True, True)
    """
    usable = [fold for fold in folds if fold.count >= 2]
    if len(usable) < 2:
        return ShrinkageChoice(
            1.0, {}, "fewer than two calibration folds of 2+ rows to validate on"
        )
    total = sum_statistics(list(folds))
    inputs = total if isinstance(total, InputMoments) else total.inputs
    if float(inputs.covariance().diagonal(dim1=-2, dim2=-1).sum()) <= 0:
        return ShrinkageChoice(1.0, {}, "the calibration inputs do not vary")
    w64 = weight.detach().to(torch.float64)
    errors = dict.fromkeys(grid, 0.0)
    for index, held in enumerate(folds):
        if held.count == 0:
            continue
        rest = sum_statistics([fold for i, fold in enumerate(folds) if i != index])
        for alpha, approx, new_bias in _solutions(w64, bias, rank_per_group, rest, grid):
            errors[alpha] += error_energy(w64, bias, approx, new_bias, held)
    reference = errors[1.0] if 1.0 in errors else max(errors.values())
    best = min(reversed(grid), key=lambda alpha: errors[alpha])  # ties: the larger α
    scale = reference if reference > 0 else 1.0
    return ShrinkageChoice(best, {alpha: errors[alpha] / scale for alpha in grid})


def _solutions(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank_per_group: int,
    stats: Statistics,
    grid: Sequence[float],
) -> list[tuple[float, torch.Tensor, torch.Tensor | None]]:
    """``(α, Ŵ, b̂)`` for every ``α`` of ``grid``, from one eigendecomposition per group.

    ``(1 − α) C + α τ I + λ I = V diag(d) Vᵀ`` with ``d = (1 − α) eig(C) + α τ + λ`` (the ridge
    ``λ = RIDGE · τ`` does not depend on ``α``: the trace is kept), so each ``α`` costs only the
    small Gram eigensolve of the whitened target, not a new factorization of ``C``.
    """
    groups = weight.shape[0]
    prepared = []
    for g in range(groups):
        weight_t = weight[g].T
        cov, cross = shrunk_problem(stats, weight_t, g, 0.0)
        target = cov @ weight_t if cross is None else cross
        values, vectors = torch.linalg.eigh(cov)
        tau = float(values.sum()) / values.numel()
        prepared.append(
            (values.clamp_min(0), vectors, vectors.T @ target, vectors.T @ weight_t, tau)
        )
    results = []
    for alpha in grid:
        approx = []
        for g in range(groups):
            if alpha == 1.0:
                first, second, _ = truncated_svd(weight[g], rank_per_group)
                approx.append(second @ first)
                continue
            values, vectors, target_v, weight_v, tau = prepared[g]
            ridge = RIDGE * tau
            d = ((1 - alpha) * values + alpha * tau + ridge).clamp_min(ridge if ridge > 0 else 1.0)
            z = ((1 - alpha) * target_v + (alpha * tau + ridge) * weight_v) / d.sqrt().unsqueeze(1)
            left, right, _ = top_singular_pair(z, rank_per_group)
            approx.append(((vectors / d.sqrt()) @ left @ right).T)
        stacked = torch.stack(approx)
        b64 = None if bias is None else bias.detach().to(torch.float64)
        new_bias = b64 if alpha == 1.0 else refit_bias(weight, b64, stacked, stats)
        results.append((alpha, stacked, new_bias))
    return results
