"""Error-propagating calibration (``propagate_error=True``): solve the layers in graph order.

Layer ``l`` is solved on the inputs ``x′`` it receives once the layers before it are factorized,
against the original layer's output ``W x + b`` on the original inputs ``x`` (the anchored
objective of AA-SVD / SAES-SVD, closed form from the paired sums of
:class:`~fxfactorize.core.moments.PairedMoments`), so each layer corrects the error its
predecessors left instead of compounding it.

Layers are grouped in *waves*: a layer's wave is one more than the latest wave among the planned
layers it depends on (through the graph's data flow; regions, whose order in the model's code is
unknown to the tracer, follow one another). A wave's layers do not feed each other, so they are
calibrated together.

Each region's graph runs over every calibration batch on two sides, as it was and with the solved
layers in place (:class:`_DualGraph`): it advances node by node to the inputs of the next wave,
the wave is solved, and it goes on from there, so every node runs once per batch and side whatever
the number of waves. The price is memory: the values alive at the current point of the graph are
held for every batch, on both sides. A region's inputs come from running the model up to the
region's call, as it was and with the earlier regions' solved layers in place: the original side
from one pass over the batches, the factorized side from one run per batch, each in a thread of
its own paused at every region's last call (:class:`PausedRuns`), or, when the regions are not
reached in the order they are solved in, from re-running the batches for each region.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxfactorize.core.moments import InputMoments, PairedMoments
from fxfactorize.core.shrinkage import sum_statistics
from fxfactorize.methods import Solved
from fxfactorize.passes.calibrate import (
    FOLDS,
    add_rows,
    layer_rows,
    rows_key,
)
from fxfactorize.passes.distributed import Group, reduce_folds, solve_owned, step
from fxfactorize.passes.plan import LayerEntry
from fxfactorize.passes.region_inputs import PausedRuns, compressed_inputs, original_inputs
from fxfactorize.passes.regions import Region
from fxfactorize.passes.runner import running
from fxfactorize.passes.solve import solve_layer
from fxfactorize.report import LayerRecord, Plan

__all__ = ["layer_waves", "solve_sequentially"]

log = logging.getLogger("fxfactorize")


def layer_waves(
    regions: list[Region], entries: Sequence[LayerEntry], targets: set[str]
) -> list[list[str]]:
    """The planned ``targets`` grouped in waves (see the module docstring), in order.

    >>> import torch
    >>> from fxfactorize.config import FactorizeConfig
    >>> from fxfactorize.passes.plan import layer_entries
    >>> from fxfactorize.passes.pipeline import analyse
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    >>> region = analyse(Region("", fx.symbolic_trace(model), torch.ones(1, 4)), FactorizeConfig())
    >>> layer_waves([region], layer_entries(region.graph, FactorizeConfig()), {"0", "2"})
    [['0'], ['2']]
    """
    wave_of: dict[str, int] = {}
    offset = 0
    for region in regions:
        local = {
            e.local: e.target
            for e in entries
            if e.target in targets and region.qualify(e.local) == e.target
        }
        if not local:
            continue
        if region.layer:
            wave_of.update({target: offset + 1 for target in local.values()})
            offset += 1
            continue
        level: dict[fx.Node, int] = {}
        for node in region.graph.graph.nodes:
            depth = max((level[arg] for arg in node.all_input_nodes), default=0)
            if node.op == "call_module" and node.target in local:
                depth += 1
                target = local[node.target]
                wave_of[target] = max(wave_of.get(target, 0), offset + depth)
            level[node] = depth
        offset = max([offset, *wave_of.values()])
    waves: dict[int, list[str]] = {}
    for target, wave in wave_of.items():
        waves.setdefault(wave, []).append(target)
    return [sorted(waves[wave]) for wave in sorted(waves)]


class _Side(fx.Interpreter):
    """One call of a region graph, run node by node on demand; layers in ``replaced`` (local
    target → solved module) run as solved."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple, replaced: dict[str, nn.Module]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.replaced = replaced
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        self.env = dict(zip(placeholders, inputs, strict=True))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.replaced.get(target)
        if module is not None:
            return module(*args, **kwargs)
        return super().call_module(target, args, kwargs)


class _DualGraph:
    """A region graph over every call of it in the calibration batches, as it was (``original``)
    and with the solved layers in place (``compressed``), advanced node by node."""

    def __init__(self, gm: fx.GraphModule, original: list[tuple], compressed: list[tuple]) -> None:
        self.replaced: dict[str, nn.Module] = {}
        self.original = [_Side(gm, inputs, {}) for inputs in original]
        self.compressed = [_Side(gm, inputs, self.replaced) for inputs in compressed]
        self.nodes = [node for node in gm.graph.nodes if node.op != "output"]
        self.done = {node for node in self.nodes if node.op == "placeholder"}

    def inputs_of(
        self, targets: Iterable[str]
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``{target: [(x, x′) per call]}``: the first argument of each call of the layers
        ``targets`` on both sides, every node they depend on run first."""
        wanted = set(targets)
        layers = [n for n in self.nodes if n.op == "call_module" and n.target in wanted]
        needed: set[fx.Node] = set()
        stack = [arg for node in layers for arg in node.all_input_nodes]
        while stack:
            node = stack.pop()
            if node not in needed and node not in self.done:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        for node in self.nodes:  # graph order is a topological order
            if node in needed:
                for side in (*self.original, *self.compressed):
                    side.env[node] = side.run_node(node)
                self.done.add(node)
        found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for node in layers:
            source = node.args[0] if node.args else next(iter(node.kwargs.values()))
            for before, after in zip(self.original, self.compressed, strict=True):
                found.setdefault(node.target, []).append((before.env[source], after.env[source]))
        self._free()
        return found

    def _free(self) -> None:
        """Drop the values that no node still to run needs."""
        if not self.original:
            return
        for node in list(self.original[0].env):
            if node.users and all(user in self.done for user in node.users):
                for side in (*self.original, *self.compressed):
                    side.env.pop(node, None)


def solve_sequentially(
    model: nn.Module,
    regions: list[Region],
    entries: Sequence[LayerEntry],
    plan: Plan,
    batches: Iterable[Any],
    shrinkage: float | str,
    progress: bool = True,
    group: Group | None = None,
    original_folds: Mapping[str, list[InputMoments]] | None = None,
) -> tuple[dict[str, Solved], dict[str, str], dict[str, PairedMoments]]:
    """Solve ``plan``'s factorized layers wave by wave on paired statistics over ``batches``.

    Returns ``({target: Solved}, {target: the target it shares its module with},
    {target: PairedMoments})``; ``model`` and the region graphs are left as they were. With a
    ``group``, each wave's statistics are reduced over the ranks before it is solved (each
    layer by its owner rank), so every rank runs the next wave with the same solved layers.
    ``original_folds`` are the folds of the original inputs' statistics over the same ``batches``
    where they are already known (reduced over the ranks; the planning pass collects them):
    their part of the paired statistics is not summed again (a third of its products).
    """
    original_folds = original_folds or {}
    by_target = {entry.target: entry for entry in entries}
    records: dict[str, LayerRecord] = {}
    shared_with: dict[str, str] = {}
    owner: dict[int, str] = {}
    for record in plan.factorized:
        module = by_target[record.target].site.module
        if id(module) in owner:  # one module under several names: solved once
            shared_with[record.target] = owner[id(module)]
        else:
            owner[id(module)] = record.target
            records[record.target] = record
    waves = layer_waves(regions, entries, set(records))
    solved: dict[str, Solved] = {}
    statistics: dict[str, PairedMoments] = {}
    replaced: dict[nn.Module, nn.Module] = {}
    bar = tqdm(total=len(records), desc="calibrate+solve", unit="layer", disable=not progress)
    geometry = {
        target: (by_target[target].site.module, by_target[target].site.layer) for target in records
    }

    def empty(target: str) -> list[PairedMoments]:
        module, layer = geometry[target]
        device = next(iter(module.parameters())).device
        return [PairedMoments.zeros(layer.fan_in, layer.groups, device) for _ in range(FOLDS)]

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        root, run = stack.enter_context(running(model, regions))
        stack.enter_context(bar)
        with step(group, "propagate_error: original inputs"):
            originals, seen = original_inputs(regions, run, batches)
        local_of = {
            region.name: {
                target: by_target[target].local
                for target in records
                if region.qualify(by_target[target].local) == target
            }
            for region in regions
        }
        paused = None
        if seen:  # regions of an untraceable model: one forward pass per batch, paused
            watched = [region for region in regions if local_of[region.name]]
            paused = PausedRuns(run, seen, watched, originals, replaced)
            stack.callback(paused.close)
        for region in regions:
            local = local_of[region.name]
            if not local:
                continue
            with step(group, f"propagate_error: inputs of region {region.name or '(root)'}"):
                original = originals[region.name]
                compressed = None if paused is None else paused.inputs_of(region, root)
                if compressed is None and paused is not None:
                    log.debug(
                        "propagate_error: region %s is not reached next; re-running "
                        "the batches for it and the regions after it",
                        region.name,
                    )
                    paused.close()
                    paused = None
                if compressed is None:
                    compressed = compressed_inputs(region, original, root, run, replaced, batches)
                graph = _DualGraph(
                    region.graph, [call for calls in original for call in calls], compressed
                )
            for number, wave in enumerate(waves):
                wave = [target for target in wave if target in local]
                if not wave:
                    continue
                with step(group, f"propagate_error: calibration of wave {number}"):
                    pairs = graph.inputs_of(local[target] for target in wave)
                    found = _wave_folds(
                        {target: by_target[target] for target in wave},
                        {target: pairs.get(local[target], []) for target in wave},
                        set(original_folds),
                    )
                calls = {target: len(pairs.get(local[target], [])) for target in wave}
                folds = reduce_folds(group, found, calls, empty, keep_folds=shrinkage == "auto")
                for target in wave:
                    if target in original_folds:
                        _fill_originals(target, folds[target], original_folds[target])
                jobs = {
                    target: functools.partial(
                        solve_layer, records[target], *geometry[target], folds[target], shrinkage
                    )
                    for target in wave
                }
                results = solve_owned(group, jobs, geometry, progress=False)
                for target in wave:
                    solved[target] = results[target]
                    statistics[target] = sum_statistics(folds[target])
                    replaced[by_target[target].site.module] = solved[target].module
                    graph.replaced[local[target]] = solved[target].module
                    bar.update()
    for target, first in shared_with.items():
        solved[target] = solved[first]
    log.debug("propagate_error: %d layer(s) solved in %d wave(s)", len(records), len(waves))
    return solved, shared_with, statistics


def _fill_originals(target: str, folds: list[PairedMoments], originals: list[InputMoments]) -> None:
    """Put the known statistics of the original inputs in ``folds`` (one fold: their sum)."""
    known = originals if len(folds) == len(originals) else [sum_statistics(originals)]
    for fold, original in zip(folds, known, strict=True):
        if original.count != fold.count:  # the same batches give the same rows: never expected
            raise RuntimeError(
                f"layer {target}: the planning pass saw {original.count} input rows in a fold "
                f"and the error-propagating pass {fold.count}; is the model deterministic?"
            )
        fold.original = original


def _wave_folds(
    entries: dict[str, LayerEntry],
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    known: set[str],
) -> dict[str, list[PairedMoments]]:
    """The paired statistics of a wave's layers; layers fed the very same values with the same
    :func:`~fxfactorize.passes.calibrate.rows_key` (attention's query, key and value) share
    one summation (copied: each layer's statistics are its own to reduce and solve on). The
    ``original`` part of the layers in ``known`` is left empty (see :func:`_fill_originals`)."""
    found: dict[str, list[PairedMoments]] = {}
    first: dict[tuple, str] = {}
    for target, entry in entries.items():
        calls = pairs[target]
        key = (
            tuple((id(x), id(x_prime)) for x, x_prime in calls),
            rows_key(entry.site.module, entry.site.layer),
        )
        if calls and key in first:
            found[target] = copy.deepcopy(found[first[key]])
        else:
            first[key] = target
            found[target] = _paired_folds(target, entry, calls, target not in known)
    return found


def _paired_folds(
    target: str,
    entry: LayerEntry,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    with_original: bool = True,
) -> list[PairedMoments]:
    """The paired statistics of one layer, in :data:`FOLDS` folds (see
    :func:`~fxfactorize.passes.calibrate.add_rows`)."""
    module, layer = entry.site.module, entry.site.layer
    if not pairs:
        raise ValueError(f"no calibration batch reaches layer {target}")
    device = pairs[0][0].device
    folds = [PairedMoments.zeros(layer.fan_in, layer.groups, device=device) for _ in range(FOLDS)]
    for call, (x, x_prime) in enumerate(pairs):
        if not torch.isfinite(x_prime).all():
            where = "model" if not torch.isfinite(x).all() else "partly factorized model"
            raise ValueError(
                f"calibration batch {call} gives NaN or Inf at the input of layer {target} "
                f"(graph node {entry.node!r}) in the {where}"
            )
        if x.shape != x_prime.shape:
            raise ValueError(
                f"layer {target} receives inputs of shape {tuple(x_prime.shape)} in the "
                f"factorized model but {tuple(x.shape)} in the original"
            )
        add_rows(folds, x_prime, layer_rows(module, layer), x, call, with_original)
    return folds
