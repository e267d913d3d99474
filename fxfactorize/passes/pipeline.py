"""The pipeline: analyse → calibrate → (re)plan → solve → rewrite, one set of steps for a model
whose root traces whole (one :class:`Region`, named ``""``) and for the traced regions of one whose
root does not (:mod:`fxfactorize.passes.regions` finds them; this module runs them together).

Layers are named as in the model throughout (``body.0``), so one plan, one budget and one set of
calibration statistics cover every region, and a layer module shared by regions is solved once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import nn

from fxfactorize.calling import call_model, evaluation_mode, normalize_inputs
from fxfactorize.config import FactorizeConfig
from fxfactorize.core.moments import InputMoments
from fxfactorize.core.shrinkage import sum_statistics
from fxfactorize.layers import layer_kind
from fxfactorize.methods import Solved
from fxfactorize.passes.calibrate import (
    FOLDS,
    MomentCollector,
    calibration_warnings,
    run_calibration,
)
from fxfactorize.passes.cost import annotate_costs
from fxfactorize.passes.distributed import (
    Group,
    agree,
    first_index,
    reduce_folds,
    reduce_sums,
    step,
)
from fxfactorize.passes.functional import convert_functional_layers
from fxfactorize.passes.plan import LayerEntry, candidate_targets, layer_entries, plan_layers
from fxfactorize.passes.regions import Region
from fxfactorize.passes.rewrite import install, rewrite
from fxfactorize.passes.runner import StandIn
from fxfactorize.passes.sensitivity import error_weights, output_gain_sums
from fxfactorize.passes.sequential import solve_sequentially
from fxfactorize.passes.shapes import propagate_shapes
from fxfactorize.passes.solve import solve_layers, solved_records
from fxfactorize.report import LayerRecord, Plan

__all__ = ["Collected", "Outcome", "analyse", "calibrate_regions", "plan_regions", "run_pipeline"]


def analyse(region: Region, config: FactorizeConfig) -> Region:
    """Functional layers made modules, shapes propagated and costs annotated on the region's graph."""
    gm = region.graph
    if config.functional:
        convert_functional_layers(gm)
    inputs = region.inputs
    if region.name and isinstance(inputs, dict):  # the call's bound arguments: keep the traced ones
        placeholders = {node.target for node in gm.graph.nodes if node.op == "placeholder"}
        inputs = {key: value for key, value in inputs.items() if key in placeholders}
    annotate_costs(propagate_shapes(gm, inputs))
    return region


def plan_regions(
    regions: list[Region],
    config: FactorizeConfig,
    tied: dict[str, str],
    moments: dict[str, InputMoments] | None = None,
) -> tuple[Plan, list[LayerEntry]]:
    """Analyse every region, then one plan for the layers of all of them, and their entries."""
    for region in regions:
        analyse(region, config)
    entries = [
        entry
        for region in regions
        for entry in layer_entries(region.graph, config, tied, region.qualify)
    ]
    return plan_layers(entries, config, moments=moments), entries


@dataclasses.dataclass
class Collected:
    """What calibration collected: ``folds`` (``{target: statistics per fold}``), ``calls``
    (``{target: calls collected}``) and the number of ``batches`` run."""

    folds: dict[str, list[InputMoments]]
    calls: dict[str, int]
    batches: int


def calibrate_regions(
    model: nn.Module,
    regions: list[Region],
    entries: list[LayerEntry],
    targets: Iterable[str],
    batches: Iterable[Any],
    progress: bool = True,
) -> Collected:
    """Input moments of the Linear/Conv layers ``targets`` (model names), in
    :data:`~fxfactorize.passes.calibrate.FOLDS` disjoint folds, collected while the model runs
    ``batches``: the whole model's graph, or the model itself with each region standing in
    through its graph. ``model`` is restored.
    """
    wanted = set(targets)
    local = {region.name: [] for region in regions}
    for entry in entries:
        region = _region_of(entry, regions)
        if entry.target in wanted and layer_kind(region.graph.get_submodule(entry.local)):
            local[region.name].append(entry.local)
    collectors = {r.name: MomentCollector(r.graph, local[r.name], r.qualify) for r in regions}
    names = {entry.target: f"graph node {entry.node!r} ({entry.target})" for entry in entries}
    if regions[0].name == "":  # the root traced whole
        gm, collector = regions[0].graph, collectors[""]
        with evaluation_mode(gm):
            seen = run_calibration(
                batches,
                lambda batch: collector.run(*normalize_inputs(gm, batch)),
                name_of=names.get,
                progress=progress,
            )
    else:
        stand_ins = {
            model.get_submodule(r.name): StandIn(r.graph, collectors[r.name].run) for r in regions
        }
        undo = install(model, stand_ins)
        try:
            with evaluation_mode(model):
                seen = run_calibration(
                    batches,
                    lambda batch: call_model(model, batch),
                    name_of=names.get,
                    progress=progress,
                )
        finally:
            undo()
    return Collected(
        {
            region.qualify(target): folds
            for region in regions
            for target, folds in collectors[region.name].folds.items()
        },
        {
            region.qualify(target): calls
            for region in regions
            for target, calls in collectors[region.name].calls.items()
        },
        seen,
    )


def _region_of(entry: LayerEntry, regions: list[Region]) -> Region:
    for region in regions:
        if region.qualify(entry.local) == entry.target:
            return region
    raise KeyError(entry.target)


@dataclasses.dataclass
class Outcome:
    """What the pipeline did: the final ``plan``, the solved ``records``, ``warnings``, and the
    replacements to install: ``layers`` (original layer → its pair) and ``regions`` (original
    region module → its rewritten graph; empty when the root traced whole)."""

    plan: Plan
    records: list[LayerRecord]
    warnings: list[str]
    layers: dict[nn.Module, nn.Module]
    regions: dict[nn.Module, nn.Module]
    solved: dict[str, Solved]


def run_pipeline(
    model: nn.Module,
    regions: list[Region],
    config: FactorizeConfig,
    batches: Iterable[Any] | None,
    tied: dict[str, str],
    group: Group | None = None,
) -> Outcome:
    """Analyse, calibrate (when ``batches`` is given), plan, solve and rewrite ``regions`` of
    ``model``. The region graphs are rewritten; ``model`` itself is not changed.

    With ``batches``: the tolerance/budget policies replan on every candidate's statistics (and,
    with ``config.sensitivity``, on each layer's measured effect on the output); the layers are
    then solved independently on them or, with ``config.propagate_error``, in graph order (see
    :mod:`fxfactorize.passes.sequential`).

    With a ``group`` (see :mod:`fxfactorize.passes.distributed`), ``batches`` are this rank's:
    statistics are reduced over the ranks, rank 0's plan is every rank's, each layer is solved
    by its owner rank, and the outcome is the same on every rank."""
    if group is not None and group.rank != 0:
        config = config.replace(progress=False)  # one progress bar, on rank 0
    with step(group, "planning"):
        the_plan, entries = plan_regions(regions, config, tied)
    the_plan = _agreed(group, the_plan)
    layers = {entry.target: (entry.site.module, entry.site.layer) for entry in entries}
    if batches is None:
        solved, shared_with = solve_layers(layers, the_plan, None, config.progress, group=group)
        moments = None
    else:
        if config.propagate_error and not isinstance(batches, (list, tuple)):
            batches = list(batches)  # the error-propagating solve runs them once per wave
        the_plan, folds = _calibrated_plan(
            model, regions, entries, the_plan, config, batches, group
        )
        if config.propagate_error and the_plan.factorized:
            solved, shared_with, paired = solve_sequentially(
                model,
                regions,
                entries,
                the_plan,
                batches,
                config.shrinkage,
                config.progress,
                group=group,
                original_folds=folds,
            )
            moments = {target: stats.inputs for target, stats in paired.items()}
        else:
            solved, shared_with = solve_layers(
                layers, the_plan, folds, config.progress, config.shrinkage, group=group
            )
            moments = {target: sum_statistics(parts) for target, parts in folds.items()}
    records = solved_records(the_plan, solved, shared_with)
    warnings = the_plan.warnings + _calibration_notes(moments, the_plan, solved, shared_with)
    replaced_layers = {layers[target][0]: result.module for target, result in solved.items()}
    return Outcome(
        the_plan,
        records,
        warnings,
        replaced_layers,
        _rewrite(model, regions, entries, solved),
        solved,
    )


def _calibration_notes(
    moments: dict[str, InputMoments] | None,
    the_plan: Plan,
    solved: dict[str, Solved],
    shared_with: dict[str, str],
) -> list[str]:
    """The calibration warnings, each layer's shrinkage note added to its warning (one per layer)."""
    notes = {
        target: result.shrinkage_note
        for target, result in solved.items()
        if result.shrinkage_note and target not in shared_with
    }
    merged = []
    for text in calibration_warnings(moments, the_plan):
        target = next((t for t in notes if text.startswith(f"layer {t}:")), None)
        if target is not None:
            text += f"; shrinkage could not be validated ({notes.pop(target)}), so it was solved data-free"
        merged.append(text)
    merged += [
        f"layer {target}: shrinkage could not be validated ({note}), so it was solved data-free"
        for target, note in notes.items()
    ]
    return merged


def _calibrated_plan(
    model: nn.Module,
    regions: list[Region],
    entries: list[LayerEntry],
    the_plan: Plan,
    config: FactorizeConfig,
    batches: Iterable[Any],
    group: Group | None = None,
) -> tuple[Plan, dict[str, list[InputMoments]]]:
    """The plan made with the calibration statistics (tolerance/budget policies predict errors
    from those of every candidate) and the folds of the statistics collected for it (reduced
    over the ranks of ``group``). With ``propagate_error`` and a fixed-rank policy nothing
    needs collecting here."""
    replan = config.tolerance is not None or config.budget is not None
    if not replan and config.propagate_error and the_plan.factorized:
        return the_plan, {}  # the sequential solve collects what it needs (and checks the batches)
    targets = (
        candidate_targets(entries, config)
        if replan
        else [record.target for record in the_plan.factorized]
    )
    with step(group, "calibration"):
        collected = calibrate_regions(model, regions, entries, targets, batches, config.progress)
    by_target = {entry.target: entry for entry in entries}

    def empty(target: str) -> list[InputMoments]:
        layer, module = by_target[target].site.layer, by_target[target].site.module
        device = next(iter(module.parameters())).device
        return [InputMoments.zeros(layer.fan_in, layer.groups, device) for _ in range(FOLDS)]

    folds = reduce_folds(
        group, collected.folds, collected.calls, empty, keep_folds=config.shrinkage == "auto"
    )
    if not replan:
        return the_plan, folds
    moments = {target: sum_statistics(parts) for target, parts in folds.items()}
    weights = None
    if config.sensitivity:
        first = first_index(group, collected.batches)
        with step(group, "sensitivity"):
            sums = output_gain_sums(model, regions, entries, moments, batches, first)
        sums = reduce_sums(group, sums)
        gains = {target: total / count if count else 0.0 for target, (total, count) in sums.items()}
        modules = {entry.target: entry.site.module for entry in entries if entry.target in moments}
        weights = error_weights(gains, modules, moments)
    with step(group, "planning"):
        the_plan = plan_layers(entries, config, moments=moments, weights=weights)
    return _agreed(group, the_plan), folds


def _agreed(group: Group | None, the_plan: Plan) -> Plan:
    """Rank 0's plan on every rank: a cost model that measures the machine (``"latency"``) may
    decide otherwise on another rank's machine, and the ranks must factorize alike."""
    if group is None:
        return the_plan
    layers, warnings = agree(group, (the_plan.layers, the_plan.warnings))
    return Plan(layers, the_plan.config, warnings)


def _rewrite(
    model: nn.Module, regions: list[Region], entries: list[LayerEntry], solved: dict[str, Solved]
) -> dict[nn.Module, nn.Module]:
    """Rewrite each region's graph with its solved layers; ``{region module: what replaces it}``
    for the regions of a model whose root did not trace."""
    replacements: dict[str, dict[str, nn.Module]] = {region.name: {} for region in regions}
    for entry in entries:
        if entry.target in solved:
            owner = _region_of(entry, regions).name
            replacements[owner][entry.local] = solved[entry.target].module
    installs = {}
    for region in regions:
        if not replacements[
            region.name
        ]:  # a region with nothing factorized keeps its original module
            continue
        rewrite(region.graph, replacements[region.name])
        if region.name:
            new = region.graph.layer if region.layer else region.graph
            installs[model.get_submodule(region.name)] = new
    return installs
