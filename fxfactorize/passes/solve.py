"""Pass 6, solve: the replacement module of every planned layer, with the error it makes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from torch import fx
from tqdm.auto import tqdm

from fxfactorize.core.moments import InputMoments
from fxfactorize.methods import Solved, get_method
from fxfactorize.passes.cost import LAYER_META
from fxfactorize.report import LayerRecord, Plan

__all__ = ["solve_plan", "solved_records"]

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
        node.target: node.meta[LAYER_META] for node in gm.graph.nodes if LAYER_META in node.meta
    }
    solved: dict[str, Solved] = {}
    records = plan.factorized
    for record in tqdm(records, desc="solve", unit="layer", disable=not progress or not records):
        method = get_method(record.method)
        module = gm.get_submodule(record.target)
        stats = None if moments is None else moments.get(record.target)
        try:
            solved[record.target] = method.solve(module, layers[record.target], record.rank, stats)
        except ValueError as error:
            raise ValueError(
                f"cannot factorize graph node {record.node!r} ({record.target}): {error}"
            ) from error
        log.debug(
            "solved %s at rank %d: nmse %.3g",
            record.target,
            record.rank,
            solved[record.target].nmse,
        )
    return solved


def solved_records(plan: Plan, solved: Mapping[str, Solved]) -> list[LayerRecord]:
    """``plan``'s records, each solved one completed with its nmse, detail and realised params."""
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
            )
        records.append(record)
    return records
