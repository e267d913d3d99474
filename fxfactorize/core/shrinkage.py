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

from fxfactorize.core import linalg
from fxfactorize.core.lowrank import (
    RIDGE,
    top_singular_pair,
    truncated_svd,
)
from fxfactorize.core.moments import Statistics

__all__ = ["SHRINKAGE_GRID", "ShrinkageChoice", "choose_shrinkage", "sum_statistics"]

#: The blends tried, from the calibration data alone (0) to data-free (1).
SHRINKAGE_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class ShrinkageChoice:
    """The chosen ``alpha`` and the held-out error of every ``α`` tried (``errors``, relative to
    data-free's: 1.0 is as good as data-free), or why none could be validated (``reason``)."""

    alpha: float
    errors: dict[float, float]
    reason: str | None = None


def sum_statistics(parts: Sequence[Statistics]) -> Statistics:
    """The statistics of all rows of ``parts`` (they add up).

    >>> from fxfactorize.core.moments import InputMoments
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

    >>> from fxfactorize.core.moments import InputMoments
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
    if float(total.inputs.covariance().diagonal(dim1=-2, dim2=-1).sum()) <= 0:
        return ShrinkageChoice(1.0, {}, "the calibration inputs do not vary")
    w64 = weight.detach().to(torch.float64)
    b64 = None if bias is None else bias.detach().to(torch.float64).reshape(w64.shape[:2])
    errors = dict.fromkeys(grid, 0.0)
    for index, held in enumerate(folds):
        if held.count == 0:
            continue
        rest = sum_statistics([fold for i, fold in enumerate(folds) if i != index])
        error_of = _held_out_error(w64, b64, held)
        for alpha, second, first, new_bias in _solutions(w64, b64, rank_per_group, rest, grid):
            errors[alpha] += error_of(second, first, new_bias)
    reference = errors[1.0] if 1.0 in errors else max(errors.values())
    best = min(reversed(grid), key=lambda alpha: errors[alpha])  # ties: the larger α
    scale = reference if reference > 0 else 1.0
    return ShrinkageChoice(best, {alpha: errors[alpha] / scale for alpha in grid})


def _held_out_error(weight: torch.Tensor, bias: torch.Tensor | None, held: Statistics):
    """A function ``(P, Q, b̂) ↦ Σ ‖W x + b − P Q x′ − b̂‖²`` over the rows of ``held`` and
    every group, for the factored ``Ŵ = P Q`` (``weight`` ``[G, M, D]``, ``P`` ``[G, M, r]``,
    ``Q`` ``[G, r, D]``, biases ``[G, M]``): the parts that do not depend on the solution are
    computed once, so each call costs ``O(G r D²)`` instead of ``O(G M D²)``."""
    n, inputs, original = held.count, held.inputs, held.original
    b = torch.zeros(weight.shape[:2], dtype=torch.float64) if bias is None else bias
    target_mean = (weight @ original.xsum.unsqueeze(-1)).squeeze(-1)  # Σ W x, [G, M]
    target_energy = float(torch.einsum("gmd,gde,gme->", weight, original.xtx, weight))
    target_energy += float(2 * (b * target_mean).sum() + n * (b * b).sum())
    target_sum = target_mean + n * b  # Σ y
    target_cross = held.cross @ weight.mT + inputs.xsum.unsqueeze(-1) * b.unsqueeze(-2)  # Σ x′yᵀ

    def error(second: torch.Tensor, first: torch.Tensor, new_bias: torch.Tensor | None) -> float:
        b_hat = torch.zeros_like(b) if new_bias is None else new_bias
        first_in = first @ inputs.xtx  # [G, r, D]
        quad = float(((second.mT @ second) * (first_in @ first.mT)).sum())
        mixed = float(((first @ target_cross) * second.mT).sum())  # Σ yᵀ Ŵ x′
        fitted_sum = (second @ (first @ inputs.xsum.unsqueeze(-1))).squeeze(-1)  # Σ Ŵ x′
        approx_energy = quad + float(2 * (b_hat * fitted_sum).sum() + n * (b_hat * b_hat).sum())
        total = target_energy + approx_energy - 2 * (mixed + float((b_hat * target_sum).sum()))
        return max(total, 0.0)

    return error


def _solutions(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    stats: Statistics,
    grid: Sequence[float],
):
    """``(α, P, Q, b̂)`` with ``Ŵ = P Q`` for every ``α`` of ``grid``, for all groups of
    ``weight`` (``[G, M, D]``) at once, from one eigendecomposition of each input covariance.

    ``(1 − α) C + α τ I + λ I = V diag(d) Vᵀ`` with ``d = (1 − α) eig(C) + α τ + λ`` (the ridge
    ``λ = RIDGE · τ`` does not depend on ``α``: the trace is kept), so each ``α`` costs only the
    small Gram eigensolve of the whitened target, not a new factorization of ``C``.
    """
    weight_t = weight.mT
    cov = stats.inputs.covariance()
    target = stats.cross_covariance() @ weight_t  # C Wᵀ unpaired: the two sides coincide
    values, vectors = linalg.eigh(cov)
    values = values.clamp_min(0)
    tau = values.mean(-1, keepdim=True)  # [G, 1]
    target_v, weight_v = vectors.mT @ target, vectors.mT @ weight_t
    shift = (weight @ stats.original.mean().unsqueeze(-1)).squeeze(-1)  # W μ: b̂ = b + W μ − Ŵ μ′
    mean_in = stats.inputs.mean().unsqueeze(-1)
    base = torch.zeros(weight.shape[:2], dtype=torch.float64) if bias is None else bias
    ridge = RIDGE * tau
    floor = torch.where(ridge > 0, ridge, torch.ones_like(ridge))
    results = []
    for alpha in grid:
        if alpha == 1.0:
            first, second, _ = truncated_svd(weight, rank)
            results.append((alpha, second, first, bias))
            continue
        d = torch.maximum((1 - alpha) * values + alpha * tau + ridge, floor)
        root = d.sqrt().unsqueeze(-1)  # [G, D, 1]
        z = ((1 - alpha) * target_v + (alpha * tau + ridge).unsqueeze(-1) * weight_v) / root
        left, right, _ = top_singular_pair(z, rank)
        first = ((vectors / root.mT) @ left).mT  # [G, r, D]
        second = right.mT  # [G, M, r]
        new_bias = base + shift - (second @ (first @ mean_in)).squeeze(-1)
        results.append((alpha, second, first, new_bias))
    return results
