"""``method="auto"`` for convs: each candidate is a (structure, rank) with its cost and predicted
error; the planner keeps the Pareto frontier and picks from it by the rank policy.

Costs are the cost model's: the pair's as it prices pairs, another structure's as the original
layer's cost scaled by the structure's share of its MACs (cost models price pairs only). Errors
are each structure's predicted nmse (see ``predicted_errors`` of
:mod:`fxfactorize.methods.structured`; the pair's error curve), times the layer's sensitivity
weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from fxfactorize.core.moments import Statistics
from fxfactorize.costmodels import CostModel, LayerSite
from fxfactorize.methods import AUTO_METHOD, CONV_STRUCTURES, DEFAULT_METHOD
from fxfactorize.policies import candidate_ranks, module_error_curve

__all__ = [
    "Candidate",
    "auto_applies",
    "choose_at_cost",
    "choose_for_tolerance",
    "conv_candidates",
    "pareto",
]

#: Ranks tried per structure other than the pair: each costs a solve-sized prediction with
#: calibration statistics (the pair's whole curve comes from one decomposition).
STRUCTURE_POINTS = 16


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to factorize a layer: ``method`` at ``rank``, its ``cost`` and predicted ``error``."""

    method: str
    rank: int
    cost: float
    error: float


def auto_applies(method: str, site: LayerSite) -> bool:
    """Whether ``method`` is ``"auto"`` and some structure besides the pair takes ``site``'s layer.

    >>> from fxfactorize.layers import LayerShape
    >>> auto_applies("auto", LayerSite(LayerShape("conv2d", 8, 8, (3, 3), 1, 4, False)))
    True
    >>> auto_applies("auto", LayerSite(LayerShape("linear", 8, 8, (), 1, 4, False)))
    False
    """
    if method != AUTO_METHOD:
        return False
    return any(m.accepts(site.layer) is None for m in CONV_STRUCTURES.values())


def structure_cost(site: LayerSite, method: str, rank: int, cost_model: CostModel) -> float:
    """The cost of ``method`` at ``rank`` in the cost model's unit."""
    if method == DEFAULT_METHOD:
        return cost_model.cost(site, rank)
    macs = CONV_STRUCTURES[method].cost(site.layer, rank)[0]
    return cost_model.cost(site, None) * macs / max(site.layer.macs, 1)


def conv_candidates(
    site: LayerSite,
    module: nn.Module,
    cost_model: CostModel,
    moments: Statistics | None = None,
    weight: float = 1.0,
    multiple: int = 1,
) -> list[Candidate]:
    """Every (structure, rank) on each structure's rank grid that the cost model says pays.

    >>> import torch
    >>> from fxfactorize.costmodels import get_cost_model
    >>> from fxfactorize.layers import describe_module
    >>> conv = nn.Conv2d(32, 32, 3, padding=1)
    >>> site = LayerSite(describe_module(conv, 32 * 8 * 8), conv)
    >>> sorted({c.method for c in conv_candidates(site, conv, get_cost_model("macs"))})
    ['lowrank', 'spatial', 'tucker2']
    """
    layer = site.layer
    original = cost_model.cost(site, None)
    limit = (1 - cost_model.margin) * original
    candidates = []
    curve = module_error_curve(module, moments)
    for rank in candidate_ranks(layer.max_rank, lambda r: cost_model.pays(site, r), multiple):
        error = float(curve[min(rank, curve.numel() - 1)]) * weight
        candidates.append(Candidate(DEFAULT_METHOD, rank, cost_model.cost(site, rank), error))
    for name, method in CONV_STRUCTURES.items():
        if method.accepts(layer) is not None:
            continue

        def pays(rank: int, name: str = name) -> bool:
            return structure_cost(site, name, rank, cost_model) <= limit

        ranks = candidate_ranks(method.max_rank(layer), pays, multiple, STRUCTURE_POINTS)
        errors = method.predicted_errors(module, layer, ranks, moments) if ranks else []
        for rank, error in zip(ranks, errors, strict=True):
            cost = structure_cost(site, name, rank, cost_model)
            candidates.append(Candidate(name, rank, cost, error * weight))
    return candidates


def pareto(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both cost and error, by increasing cost (decreasing error).

    >>> c = [Candidate("a", 1, 1.0, 0.5), Candidate("b", 1, 2.0, 0.6), Candidate("c", 1, 3.0, 0.1)]
    >>> [x.method for x in pareto(c)]
    ['a', 'c']
    """
    frontier: list[Candidate] = []
    order = sorted(candidates, key=lambda c: (c.cost, c.error, c.method != DEFAULT_METHOD))
    for candidate in order:
        if not frontier or candidate.error < frontier[-1].error:
            frontier.append(candidate)
    return frontier


def choose_at_cost(candidates: Sequence[Candidate], allowed: float) -> Candidate | None:
    """The lowest predicted error among candidates costing at most ``allowed`` (ties: cheaper, then
    the pair), or ``None`` if none fits.

    >>> c = [Candidate("lowrank", 4, 2.0, 0.3), Candidate("spatial", 4, 1.5, 0.2)]
    >>> choose_at_cost(c, 2.0).method
    'spatial'
    """
    fitting = [c for c in candidates if c.cost <= allowed * (1 + 1e-12)]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (c.error, c.cost, c.method != DEFAULT_METHOD))


def choose_for_tolerance(candidates: Sequence[Candidate], tolerance: float) -> Candidate | None:
    """The cheapest candidate predicted within ``tolerance``, else the most accurate one.

    >>> c = [Candidate("lowrank", 4, 2.0, 0.05), Candidate("tucker2", 4, 1.5, 0.08)]
    >>> choose_for_tolerance(c, 0.1).method, choose_for_tolerance(c, 0.01).method
    ('tucker2', 'lowrank')
    """
    if not candidates:
        return None
    within = [c for c in candidates if c.error <= tolerance]
    if within:
        return min(within, key=lambda c: (c.cost, c.error))
    return min(candidates, key=lambda c: (c.error, c.cost))


def finite_weights(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())
