"""Error-propagating calibration (``propagate_error=True``): solve the layers in graph order.

Layer ``l`` is solved on the inputs ``x′`` it receives once the layers before it are factorized,
against the original layer's output ``W x + b`` on the original inputs ``x`` (the anchored
objective of AA-SVD / SAES-SVD, closed form from the paired sums of
:class:`~fxfactorize.core.moments.PairedMoments`), so each layer corrects the error its
predecessors left instead of compounding it.

Layers are grouped in *waves*: a layer's wave is one more than the latest wave among the planned
layers it depends on (through the graph's data flow; regions, whose order in the model's code
is unknown to the tracer, follow one another). A wave's layers do not feed each other, so they
are calibrated together: per batch, the model runs once as it was and once with every layer of
the earlier waves factorized, each run stopping as soon as the wave's layers have been reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxfactorize.core.moments import PairedMoments
from fxfactorize.core.patches import conv_patch_rows
from fxfactorize.layers import LayerShape, conv_arguments
from fxfactorize.methods import Solved
from fxfactorize.passes.calibrate import FOLDS, _NonFiniteInput, add_rows, run_calibration
from fxfactorize.passes.plan import LayerEntry
from fxfactorize.passes.regions import Region
from fxfactorize.passes.rewrite import install
from fxfactorize.passes.runner import running
from fxfactorize.passes.solve import solve_layer
from fxfactorize.report import LayerRecord, Plan

__all__ = ["layer_waves", "solve_sequentially"]

log = logging.getLogger("fxfactorize")


class _WaveReached(Exception):
    """Raised by a hook once every layer of the wave has seen its inputs: the rest of the
    forward pass is not needed."""


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


def _rows(module: nn.Module, layer: LayerShape, x: torch.Tensor) -> list[torch.Tensor]:
    if layer.kind == "linear":
        return [x.reshape(-1, layer.in_features)]
    return list(conv_patch_rows(x, layer.kernel, **conv_arguments(module)))


class _Capture:
    """Forward pre-hooks that record the first argument of each module of ``modules``, call by
    call, and count the calls of those of ``counted``; with ``expected`` (calls per captured
    module) the forward pass stops once every captured module has been called that often."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        expected: dict[str, int] | None,
        counted: dict[str, nn.Module] | None = None,
    ) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {target: [] for target in modules}
        self.calls: dict[str, int] = {}
        self.expected = expected
        watched = {**(counted or {}), **modules}
        self._handles = [
            module.register_forward_pre_hook(self._hook(target, target in modules))
            for target, module in watched.items()
        ]

    def _hook(self, target: str, keep: bool) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.calls[target] = self.calls.get(target, 0) + 1
            if keep and args and isinstance(args[0], torch.Tensor):
                if not torch.isfinite(args[0]).all():
                    raise _NonFiniteInput(target)
                self.inputs[target].append(args[0].detach())
            if self.expected is not None and all(
                len(self.inputs[t]) >= n for t, n in self.expected.items()
            ):
                raise _WaveReached

        return hook

    def run(self, run: Callable[[Any], Any], batch: Any) -> None:
        try:
            run(batch)
        except _WaveReached:
            pass
        finally:
            for handle in self._handles:
                handle.remove()


def solve_sequentially(
    model: nn.Module,
    regions: list[Region],
    entries: Sequence[LayerEntry],
    plan: Plan,
    batches: Iterable[Any],
    shrinkage: float | str,
    progress: bool = True,
) -> tuple[dict[str, Solved], dict[str, str], dict[str, PairedMoments]]:
    """Solve ``plan``'s factorized layers wave by wave on paired statistics over ``batches``.

    Returns ``({target: Solved}, {target: the target it shares its module with},
    {target: PairedMoments})``; ``model`` and the region graphs are left as they were.
    """
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
    calls: dict[int, dict[str, int]] = {}  # per batch: how often each planned layer is called
    bar = tqdm(total=len(records), desc="calibrate+solve", unit="layer", disable=not progress)
    with running(model, regions) as (root, run), bar:
        for wave in waves:
            folds = _paired_folds(wave, records, by_target, run, root, replaced, batches, calls)
            for target in wave:
                entry = by_target[target]
                solved[target] = solve_layer(
                    records[target], entry.site.module, entry.site.layer, folds[target], shrinkage
                )
                statistics[target] = folds[target][0] + folds[target][1]
                replaced[entry.site.module] = solved[target].module
                bar.update()
    for target, first in shared_with.items():
        solved[target] = solved[first]
    log.debug("propagate_error: %d layer(s) solved in %d wave(s)", len(records), len(waves))
    return solved, shared_with, statistics


def _paired_folds(
    wave: list[str],
    planned: Iterable[str],
    by_target: dict[str, LayerEntry],
    run: Callable[[Any], Any],
    root: nn.Module,
    replaced: dict[nn.Module, nn.Module],
    batches: Iterable[Any],
    calls: dict[int, dict[str, int]],
) -> dict[str, list[PairedMoments]]:
    """The wave's paired statistics in :data:`FOLDS` folds: each batch runs through the model as
    it was (``x``) and with the ``replaced`` layers in place (``x′``). The first pass over a
    batch counts the calls of every ``planned`` layer, so later passes stop early."""
    modules = {target: by_target[target].site.module for target in wave}
    census = {target: by_target[target].site.module for target in planned}
    folds: dict[str, list[PairedMoments]] = {}
    seen: dict[str, int] = dict.fromkeys(wave, 0)
    index = -1

    def run_batch(batch: Any) -> None:
        nonlocal index
        index += 1
        counts = calls.get(index)
        expected = None if counts is None else {t: counts.get(t, 0) for t in wave}
        original = _Capture(modules, expected, counted=census if counts is None else None)
        original.run(run, batch)
        if counts is None:
            calls[index] = original.calls
            expected = {t: len(original.inputs[t]) for t in wave}
        undo = install(root, replaced)
        try:
            compressed = _Capture(modules, expected)
            compressed.run(run, batch)
        finally:
            undo()
        for target in wave:
            _accumulate(target, by_target[target], original, compressed, folds, seen)

    run_calibration(
        batches,
        run_batch,
        name_of=lambda target: f"graph node {by_target[target].node!r} ({target})",
        progress=False,
    )
    missing = [target for target in wave if target not in folds]
    if missing:
        raise ValueError(f"no calibration batch reaches layer(s) {missing}")
    return folds


def _accumulate(
    target: str,
    entry: LayerEntry,
    original: _Capture,
    compressed: _Capture,
    folds: dict[str, list[PairedMoments]],
    seen: dict[str, int],
) -> None:
    module, layer = entry.site.module, entry.site.layer
    for x, x_prime in zip(original.inputs[target], compressed.inputs[target], strict=False):
        if x.shape != x_prime.shape:
            raise ValueError(
                f"layer {target} receives inputs of shape {tuple(x_prime.shape)} in the "
                f"factorized model but {tuple(x.shape)} in the original"
            )
        if target not in folds:
            folds[target] = [
                PairedMoments.zeros(layer.fan_in, layer.groups, device=x.device)
                for _ in range(FOLDS)
            ]
        for rows, original_rows in zip(
            _rows(module, layer, x_prime), _rows(module, layer, x), strict=True
        ):
            add_rows(folds[target], rows, original_rows, call=seen[target])
        seen[target] += 1
