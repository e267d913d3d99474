"""Pass 6, solve: the replacement module of every planned layer, with the error it makes."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from fxfactorize.core.moments import InputMoments, Statistics
from fxfactorize.core.shrinkage import choose_shrinkage, sum_statistics
from fxfactorize.layers import LayerShape, grouped_weight
from fxfactorize.methods import Solved, get_method
from fxfactorize.passes.cost import LAYER_META
from fxfactorize.passes.distributed import Group, solve_owned
from fxfactorize.report import LayerRecord, Plan

__all__ = ["solve_layer", "solve_layers", "solve_plan", "solved_records"]

log = logging.getLogger("fxfactorize")


def solve_plan(
    gm: fx.GraphModule,
    plan: Plan,
    moments: Mapping[str, InputMoments] | None = None,
    progress: bool = True,
) -> dict[str, Solved]:
    """Solve each planned layer of ``plan``: data-free, or data-aware where ``moments`` has its target.

    Returns ``{target: Solved}``. ``gm`` is not changed.
    """
    layers = {
        node.target: (gm.get_submodule(node.target), node.meta[LAYER_META])
        for node in gm.graph.nodes
        if LAYER_META in node.meta
    }
    return solve_layers(layers, plan, moments, progress)[0]


def solve_layer(
    record: LayerRecord,
    module: nn.Module,
    layer: LayerShape,
    statistics: Statistics | Sequence[Statistics] | None,
    shrinkage: float | str = 0.0,
) -> Solved:
    """Solve one planned layer: data-free without ``statistics``; else data-aware on them, which
    are either all rows' statistics or their folds (a list). ``shrinkage`` is ``"auto"`` (chosen
    on the folds by :func:`~fxfactorize.core.shrinkage.choose_shrinkage`) or a fixed ``α``.
    The result's ``shrinkage`` (and ``detail``) say which ``α`` was used."""
    folds = list(statistics) if isinstance(statistics, Sequence) else None
    stats = sum_statistics(folds) if folds else statistics
    alpha, why = (0.0, None) if shrinkage == "auto" else (float(shrinkage), None)
    method = get_method(record.method)
    if stats is not None and shrinkage == "auto" and method.is_pair:
        weight, bias = grouped_weight(module)
        choice = choose_shrinkage(weight, bias, record.rank // layer.groups, folds or [stats])
        alpha, why = choice.alpha, choice.reason
    try:
        result = method.solve(module, layer, record.rank, stats, shrinkage=alpha)
    except ValueError as error:
        raise ValueError(
            f"cannot factorize graph node {record.node!r} ({record.target}): {error}"
        ) from error
    if _channels_last(module):  # the format `model.to(memory_format=...)` gave every conv
        result.module.to(memory_format=torch.channels_last)
    if stats is not None and method.is_pair:
        result.shrinkage = alpha
        result.shrinkage_note = why
    log.debug("solved %s at rank %d: nmse %.3g", record.target, record.rank, result.nmse)
    return result


def _channels_last(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 4
        and not weight.is_contiguous()
        and weight.is_contiguous(memory_format=torch.channels_last)
    )


def solve_layers(
    layers: Mapping[str, tuple[nn.Module, LayerShape]],
    plan: Plan,
    moments: Mapping[str, Statistics | Sequence[Statistics]] | None = None,
    progress: bool = True,
    shrinkage: float | str = 0.0,
    group: Group | None = None,
) -> tuple[dict[str, Solved], dict[str, str]]:
    """Solve each factorized record of ``plan``, its module and geometry taken from ``layers``
    (``{target: (module, LayerShape)}``) and its statistics (or their folds) from ``moments``;
    see :func:`solve_layer`. A module object planned under several targets is solved
    once: the later targets get the same :class:`Solved` and appear in the second result,
    ``{target: the target it shares with}``. With a ``group``, each layer is solved on its
    owner rank and every rank gets every result (see :func:`~fxfactorize.passes.distributed.solve_owned`).
    """
    first_target: dict[int, str] = {}
    shared_with: dict[str, str] = {}
    jobs = {}
    for record in plan.factorized:
        module, layer = layers[record.target]
        if id(module) in first_target:
            shared_with[record.target] = first_target[id(module)]
            continue
        first_target[id(module)] = record.target
        stats = None if moments is None else moments.get(record.target)
        jobs[record.target] = functools.partial(
            solve_layer, record, module, layer, stats, shrinkage
        )
    solved = solve_owned(group, jobs, layers, progress)
    for record in plan.factorized:  # in plan order, shared targets included
        solved[record.target] = solved[shared_with.get(record.target, record.target)]
    solved = {record.target: solved[record.target] for record in plan.factorized}
    return solved, shared_with


def solved_records(
    plan: Plan, solved: Mapping[str, Solved], shared_with: Mapping[str, str] | None = None
) -> list[LayerRecord]:
    """``plan``'s records, each solved one completed with its nmse, detail and realised params
    (and ``shared_with`` where its module is another record's)."""
    shared_with = shared_with or {}
    records = []
    for record in plan.layers:
        result = solved.get(record.target)
        if result is not None:
            record = dataclasses.replace(
                record,
                nmse=result.nmse,
                nmse_source=result.nmse_source,
                detail=result.detail or record.detail,
                params_after=sum(p.numel() for p in result.module.parameters()),
                shared_with=shared_with.get(record.target),
                shrinkage=result.shrinkage,
            )
        records.append(record)
    return records
