"""Rank policies: fixed (``latent_*``), ``tolerance=ε`` and ``budget=β``.

The tolerance and budget policies need, per layer, the predicted nmse at every rank: an
*error curve*. Data-free it is the discarded share of the weight's squared singular values;
with calibration statistics it is the same for the whitened weight ``Lᵀ Wᵀ`` (``L Lᵀ`` the input
covariance), which is the exact output nmse of the best rank-r pair on that data.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fxfactorize.core.lowrank import reduced_rank_regression, singular_values
from fxfactorize.core.moments import InputMoments
from fxfactorize.layers import grouped_weight

__all__ = [
    "BudgetItem",
    "allocate_budget",
    "candidate_ranks",
    "error_curve",
    "module_error_curve",
    "rank_for_tolerance",
    "rank_step",
]

log = logging.getLogger("fxfactorize")


def error_curve(weight: torch.Tensor, moments: InputMoments | None = None) -> torch.Tensor:
    """Predicted nmse of the best pair at per-group rank ``k``, for ``k = 0 … max_rank``.

    ``weight`` is grouped, ``[G, M_g, D_g]`` (see :func:`fxfactorize.layers.grouped_weight`).

    >>> w = torch.diag(torch.tensor([3.0, 1.0])).unsqueeze(0)
    >>> error_curve(w).tolist()
    [1.0, 0.1, 0.0]
    """
    w64 = weight.detach().to(torch.float64)
    spectra = []
    for g in range(w64.shape[0]):
        if moments is None:
            spectra.append(singular_values(w64[g]))
        else:
            spectra.append(reduced_rank_regression(moments.covariance()[g], w64[g].T, 1)[2])
    energy = (torch.stack(spectra) ** 2).sum(dim=0)  # per-group rank k keeps k values per group
    total = float(energy.sum())
    if total <= 0:
        return torch.zeros(energy.numel() + 1, dtype=torch.float64)
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), energy.cumsum(0)])
    return ((total - kept) / total).clamp_min(0.0)


def rank_for_tolerance(curve: torch.Tensor, tolerance: float) -> int:
    """Smallest rank ``k`` with ``curve[k] <= tolerance`` (at least 1).

    >>> rank_for_tolerance(torch.tensor([1.0, 0.3, 0.05, 0.0]), 0.1)
    2
    """
    within = (curve <= tolerance).nonzero()
    rank = int(within[0]) if within.numel() else curve.numel() - 1
    return max(rank, 1)


@dataclasses.dataclass
class BudgetItem:
    """One layer in a budget allocation.

    ``ranks`` are its candidate ranks, ascending, each predicted to pay; ``errors[i]`` and
    ``costs[i]`` are the nmse and cost at ``ranks[i]``; keeping the layer costs ``original_cost``
    with no error.
    """

    key: str
    ranks: Sequence[int]
    errors: Sequence[float]
    costs: Sequence[float]
    original_cost: float

    def option(self, index: int) -> tuple[float, float]:
        """``(error, cost)`` of option ``index``; ``len(ranks)`` means the original layer."""
        if index == len(self.ranks):
            return 0.0, self.original_cost
        return self.errors[index], self.costs[index]


def allocate_budget(items: Sequence[BudgetItem], budget: float) -> dict[str, int | None]:
    """Ranks (``None``: keep the layer) minimising the summed nmse with summed cost ≤ ``budget``.

    Greedy: every layer starts at its smallest rank; then the step with the largest error
    reduction per unit of extra cost is taken while it fits, until none fits. If even the
    smallest ranks exceed the budget they are kept (the plan then carries a warning).

    >>> items = [BudgetItem("a", [1, 2], [0.5, 0.1], [1.0, 2.0], 4.0),
    ...          BudgetItem("b", [1, 2], [0.2, 0.1], [1.0, 2.0], 4.0)]
    >>> allocate_budget(items, budget=3.0)
    {'a': 2, 'b': 1}
    """
    state = {item.key: 0 for item in items if item.ranks}
    by_key = {item.key: item for item in items}
    spent = sum(by_key[key].option(0)[1] for key in state)
    if spent > budget:
        log.debug(
            "budget cannot be met: the smallest ranks cost %.3g > %.3g; using them", spent, budget
        )
    heap: list[tuple[float, str]] = []

    def push(key: str) -> None:
        item, index = by_key[key], state[key]
        if index >= len(item.ranks):
            return
        error, cost = item.option(index)
        next_error, next_cost = item.option(index + 1)
        gain, extra = error - next_error, next_cost - cost
        ratio = float("inf") if extra <= 0 else gain / extra
        heapq.heappush(heap, (-ratio, key))

    for key in state:
        push(key)
    while heap:
        _, key = heapq.heappop(heap)
        item, index = by_key[key], state[key]
        extra = item.option(index + 1)[1] - item.option(index)[1]
        if spent + extra > budget:
            continue  # costs only grow along an item's options: this layer is done
        spent += extra
        state[key] = index + 1
        push(key)
    allocation: dict[str, int | None] = {item.key: None for item in items}
    for key, index in state.items():
        ranks = by_key[key].ranks
        allocation[key] = ranks[index] if index < len(ranks) else None
    return allocation


def rank_step(max_rank: int, multiple: int = 1, points: int = 32) -> int:
    """The spacing of :func:`candidate_ranks`' grid: about ``points`` multiples of ``multiple``.

    >>> rank_step(256), rank_step(64, multiple=8)
    (8, 8)
    """
    return max(multiple, (max_rank // points) // multiple * multiple)


def candidate_ranks(
    max_rank: int, pays: Callable[[int], bool], multiple: int = 1, points: int = 32
) -> list[int]:
    """Ranks on a grid of about ``points`` multiples of ``multiple`` below ``max_rank`` that pay.

    >>> candidate_ranks(64, lambda r: r < 40, multiple=8)
    [8, 16, 24, 32]
    """
    step = rank_step(max_rank, multiple, points)
    ranks = []
    for rank in range(step, max_rank, step):
        if not pays(rank):
            break  # cost grows with rank: no larger rank pays either
        ranks.append(rank)
    return ranks


def module_error_curve(module: nn.Module, moments: InputMoments | None) -> torch.Tensor:
    """:func:`error_curve` of a Linear/Conv2d (or an existing pair)."""

    return error_curve(grouped_weight(module)[0], moments)
