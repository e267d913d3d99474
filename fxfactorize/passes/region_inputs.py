"""The inputs of every call of the model's regions, in the model as it was and with solved layers
in place, for the error-propagating solve (:mod:`fxfactorize.passes.sequential`).

The original side comes from one pass over the calibration batches. The factorized side comes
from one run per batch, each in a thread of its own paused at every region's last call while the
region's layers are solved (:class:`PausedRuns`); when the runs do not reach the regions in the
order they are solved in, from re-running the batches from the start for each region.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fxfactorize.calling import normalize_inputs
from fxfactorize.passes.calibrate import run_calibration
from fxfactorize.passes.regions import Region
from fxfactorize.passes.rewrite import install

__all__ = ["PausedRuns", "compressed_inputs", "copied", "original_inputs"]


class _WaveReached(Exception):
    """Raised by a hook once a region has been called as often as expected: the rest of the
    forward pass is not needed."""


def copied(value: Any) -> Any:
    """A tensor's clone (so in-place ops stay on one side); anything else as it is."""
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


def original_inputs(
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


def compressed_inputs(
    region: Region,
    original: list[list[tuple]],
    root: nn.Module,
    run: Callable[[Any], Any],
    solved: dict[nn.Module, nn.Module],
    batches: Iterable[Any],
) -> list[tuple]:
    """The inputs of every call of ``region`` with the ``solved`` layers in place: for the whole
    model, copies of the batches; for a region, each batch's run started afresh and stopped at
    the region's last call (as many as in the original model)."""
    if region.name == "":  # copies, so in-place ops stay on one side
        return [tuple(copied(value) for value in calls[0]) for calls in original]
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
        self.finished = False
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
        except BaseException:  # _Aborted, or an error: the caller re-runs the batch and reports it
            pass
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


class PausedRuns:
    """Every calibration batch run through the factorized model once, each in a thread, paused at
    each region's last call in turn: the inputs of all regions cost one forward pass in all.
    Re-running the model from its start for each region (:func:`compressed_inputs`) costs one per
    region: 48 of 201 s of a MiniLM-L6 transform (37 regions, 128 sentences, 2-core CPU).

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
        calls.append(tuple(copied(value) for value in args))  # the run goes on with its own
        if len(calls) == paused.expected.get(id(module), 0):
            paused.pause(id(module))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        # In a run, a solved layer is installed before the run goes on, so the original is
        # called only by the call that was paused in it: that call finishes as solved.
        solved = self.replaced.get(module) if getattr(self._current, "run", None) else None
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
