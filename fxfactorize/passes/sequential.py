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
region's call, as it was and with the earlier regions' solved layers in place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxfactorize.calling import normalize_inputs
from fxfactorize.core.moments import InputMoments, PairedMoments
from fxfactorize.core.shrinkage import sum_statistics
from fxfactorize.methods import Solved
from fxfactorize.passes.calibrate import (
    FOLDS,
    add_rows,
    layer_rows,
    rows_key,
    run_calibration,
)
from fxfactorize.passes.distributed import Group, reduce_folds, solve_owned, step
from fxfactorize.passes.plan import LayerEntry
from fxfactorize.passes.regions import Region
from fxfactorize.passes.rewrite import install
from fxfactorize.passes.runner import running
from fxfactorize.passes.solve import solve_layer
from fxfactorize.report import LayerRecord, Plan

__all__ = ["layer_waves", "solve_sequentially"]

log = logging.getLogger("fxfactorize")


class _WaveReached(Exception):
    """Raised by a hook once a region has been called as often as expected: the rest of the
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


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class _RegionCall:
    """Forward pre-hook capturing the positional inputs of every call of a region graph (or a
    bare layer), and stopping the model once it has been called ``expected`` times."""

    def __init__(self, module: nn.Module, expected: int | None) -> None:
        self.calls: list[tuple] = []
        self.expected = expected
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.calls.append(tuple(args))
        if self.expected is not None and len(self.calls) >= self.expected:
            raise _WaveReached

    def remove(self) -> None:
        self._handle.remove()

    def run(self, run: Callable[[Any], Any], batch: Any) -> list[tuple]:
        try:
            run(batch)
        except _WaveReached:
            pass
        finally:
            self.remove()
        return self.calls


def _watched(region: Region) -> nn.Module:
    """The module whose calls feed ``region``'s graph: the graph itself, or a bare layer."""
    return region.graph.get_submodule("layer") if region.layer else region.graph


def _original_inputs(
    regions: list[Region], run: Callable[[Any], Any], batches: Iterable[Any]
) -> tuple[dict[str, list[list[tuple]]], list[Any]]:
    """``({region name: [calls of each batch]}, the batches)``: the inputs of every call of every
    region in the model as it was, from one pass over ``batches``; the whole model is its own
    region."""
    seen: list[Any] = []
    if regions[0].name == "":
        gm = regions[0].graph
        inputs: list[list[tuple]] = []
        run_calibration(
            batches,
            lambda batch: inputs.append([normalize_inputs(gm, batch)]),
            name_of=str,
            progress=False,
        )
        return {"": inputs}, seen
    found: dict[str, list[list[tuple]]] = {region.name: [] for region in regions}

    def run_batch(batch: Any) -> None:
        hooks = {region.name: _RegionCall(_watched(region), None) for region in regions}
        try:
            run(batch)
        finally:
            for hook in hooks.values():
                hook.remove()
        for name, hook in hooks.items():
            found[name].append(hook.calls)
        seen.append(batch)

    run_calibration(batches, run_batch, name_of=str, progress=False)
    return found, seen


def _compressed_inputs(
    region: Region,
    original: list[list[tuple]],
    root: nn.Module,
    run: Callable[[Any], Any],
    solved: dict[nn.Module, nn.Module],
    batches: Iterable[Any],
) -> list[tuple]:
    """The inputs of every call of ``region`` with the ``solved`` layers in place."""
    if region.name == "":  # the batches themselves; copies, so in-place ops stay on one side
        return [tuple(_copy(value) for value in calls[0]) for calls in original]
    return _rerun_inputs(region, original, root, run, solved, batches)


def _rerun_inputs(
    region: Region,
    original: list[list[tuple]],
    root: nn.Module,
    run: Callable[[Any], Any],
    solved: dict[nn.Module, nn.Module],
    batches: Iterable[Any],
) -> list[tuple]:
    """The inputs of every call of ``region`` with the ``solved`` layers in place, each batch's
    run started afresh and stopped at the region's last call (as many as in the original model)."""
    compressed: list[tuple] = []
    index = -1

    def run_batch(batch: Any) -> None:
        nonlocal index
        index += 1
        expected = len(original[index])
        if expected == 0:
            return
        calls = _RegionCall(_watched(region), expected).run(run, batch)
        if len(calls) != expected:
            raise ValueError(
                f"region {region.name} is called {expected} time(s) in the original model and "
                f"{len(calls)} in the factorized one"
            )
        compressed.extend(calls)

    undo = install(root, solved)
    try:
        run_calibration(batches, run_batch, name_of=str, progress=False)
    finally:
        undo()
    return compressed


class _Aborted(BaseException):
    """Raised in a paused run that is no longer needed, to unwind its thread."""


class _PausedRun:
    """One calibration batch run through the model in a thread of its own, paused at the last
    call of each watched region until :meth:`advance` lets it go on. Only one thread runs at a
    time (the caller waits while a run advances), so nothing depends on the scheduler."""

    def __init__(
        self,
        run: Callable[[Any], Any],
        batch: Any,
        expected: dict[int, int],
        current: threading.local,
    ) -> None:
        self.expected = expected  # id(watched module) -> its calls in the original model
        self.calls: dict[int, list[tuple]] = {}
        self.paused_at: int | None = None
        self.redirect: dict[int, nn.Module] = {}  # a bare layer's call to finish as solved
        self.finished = False
        self.error: BaseException | None = None
        self._abort = False
        self._go = threading.Semaphore(0)
        self._stopped = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._body, args=(run, batch, current), daemon=True)

    def _body(self, run: Callable[[Any], Any], batch: Any, current: threading.local) -> None:
        current.run = self
        self._go.acquire()
        try:
            if not self._abort:
                with torch.no_grad():  # grad mode is per thread
                    run(batch)
        except _Aborted:
            pass
        except BaseException as error:  # the caller re-runs the batch, which reports it
            self.error = error
        finally:
            self.finished, self.paused_at = True, None
            self._stopped.release()

    def advance(self) -> None:
        """Let the run go on until it pauses at a watched region's last call, or ends."""
        if self.finished:
            return
        if self._thread.ident is None:
            self._thread.start()
        self.paused_at = None
        self._go.release()
        self._stopped.acquire()

    def pause(self, watched: int) -> None:
        """Called in the run's own thread: wait here until advanced (or closed)."""
        self.paused_at = watched
        self._stopped.release()
        self._go.acquire()
        if self._abort:
            raise _Aborted

    def close(self) -> None:
        if self._thread.is_alive():
            self._abort = True
            self._go.release()
            self._thread.join()


class _PausedRuns:
    """Every calibration batch run through the factorized model once, each in a thread, paused at
    each region's last call in turn: the inputs of all regions cost one forward pass in all.
    Re-running the model from its start for each region (:func:`_rerun_inputs`) costs one per
    region: 48 of 201 s of a MiniLM-L6 transform (30 regions, 128 sentences, 2-core CPU).

    :meth:`inputs_of` returns ``None`` when a run does not reach the region next (regions
    called in another order than they are solved in, or a different number of times, or an
    error): the caller then re-runs the batches, which also reports the error.
    """

    def __init__(
        self,
        run: Callable[[Any], Any],
        batches: list[Any],
        regions: list[Region],
        originals: dict[str, list[list[tuple]]],
        replaced: dict[nn.Module, nn.Module],
    ) -> None:
        self.replaced = replaced
        self._current = threading.local()
        self.runs = [
            _PausedRun(
                run,
                batch,
                {id(_watched(r)): len(originals[r.name][index]) for r in regions},
                self._current,
            )
            for index, batch in enumerate(batches)
        ]
        self._handles = []
        for region in regions:
            watched = _watched(region)
            self._handles.append(watched.register_forward_pre_hook(self._before))
            if region.layer:  # its paused call is in the original layer: finish it as solved
                self._handles.append(watched.register_forward_hook(self._after))

    def _before(self, module: nn.Module, args: tuple) -> None:
        paused = getattr(self._current, "run", None)
        if paused is None:  # a call from the solver's own thread
            return
        calls = paused.calls.setdefault(id(module), [])
        calls.append(tuple(_copy(value) for value in args))  # the run goes on with its own
        if len(calls) == paused.expected.get(id(module), 0):
            paused.pause(id(module))
            solved = self.replaced.get(module)
            if solved is not None:
                paused.redirect[id(module)] = solved

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        paused = getattr(self._current, "run", None)
        solved = None if paused is None else paused.redirect.pop(id(module), None)
        return output if solved is None else solved(*args)

    def inputs_of(self, region: Region, root: nn.Module) -> list[tuple] | None:
        """Every call of ``region`` in every batch, the solved layers in place; ``None`` if a run
        does not reach it next."""
        watched = id(_watched(region))
        found: list[tuple] = []
        undo = install(root, self.replaced)
        try:
            for paused in self.runs:
                if paused.expected[watched] == 0:
                    continue
                if paused.paused_at != watched:
                    paused.advance()
                if paused.paused_at != watched:
                    return None
                found.extend(paused.calls.pop(watched))
        finally:
            undo()
        return found

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for paused in self.runs:
            paused.close()


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
            originals, seen = _original_inputs(regions, run, batches)
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
            paused = _PausedRuns(run, seen, watched, originals, replaced)
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
                    compressed = _compressed_inputs(region, original, root, run, replaced, batches)
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
