"""The batches of a healing run and the forward passes on them, kept per batch where they are
revisited: the teacher's outputs (the teacher is frozen) and the student's frozen frontier (see
:mod:`fxfactorize.healing.prefix`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fxfactorize.calling import call_model, check_example_inputs
from fxfactorize.healing.local import capture
from fxfactorize.healing.prefix import FrozenSplit
from fxfactorize.passes.calibrate import calibration_batches

__all__ = ["Batches", "Runs"]


class Batches:
    """The batches of an argument, one per step, cycled.

    A list or tuple (or a lone tensor / dict: one batch) is indexed and a one-shot iterator (a
    generator) is read into a list once (at most ``limit`` items): each batch then has an index
    under which its results may be kept. Any other iterable (a ``DataLoader``) is streamed,
    started again when it runs out, and nothing is kept per batch (its items may change between
    passes, e.g. when shuffled); with ``peek`` its first batch is read at once (an empty one
    fails before any work).

    >>> batches = Batches((torch.full((1,), i) for i in range(2)), "batches")
    >>> batches.indexed, [index for index, _ in map(batches.take, range(3))]
    (True, [0, 1, 0])
    """

    def __init__(
        self, batches: Any, name: str, limit: int | None = None, peek: bool = False
    ) -> None:
        if not isinstance(batches, (torch.Tensor, Mapping, Iterable)):
            raise TypeError(
                f"{name} must be a tensor (one batch) or an iterable of batches (each a tensor, a "
                "tuple of positional inputs or a dict of keyword inputs); got "
                f"{type(batches).__name__}"
            )
        self.name = name
        items = calibration_batches(batches)
        self._stream: Iterable[Any] | None = None
        self._iterator: Iterator[Any] | None = None
        if isinstance(items, (list, tuple)):
            self.items: list[Any] | None = list(items)
        elif iter(items) is items:
            self.items = list(items if limit is None else itertools.islice(items, limit))
        else:
            self._stream, self.items = items, None
            self._pending = [self._next(first=True)] if peek else []  # fails early if empty
        if self.items is not None:
            if not self.items:
                raise ValueError(f"{name} is empty: give at least one batch")
            for index, batch in enumerate(self.items):
                check_example_inputs(batch, f"{name}[{index}]")

    @property
    def indexed(self) -> bool:
        """Whether batches have stable indices (results may be kept per batch)."""
        return self.items is not None

    def _next(self, first: bool = False) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._stream)
        try:
            return next(self._iterator)
        except StopIteration:
            if not first:
                self._iterator = iter(self._stream)
                return self._next(first=True)
        raise ValueError(f"{self.name} is empty: give at least one batch")

    def take(self, step: int) -> tuple[int | None, Any]:
        """``(index or None, batch)`` for ``step``."""
        if self.items is not None:
            index = step % len(self.items)
            return index, self.items[index]
        batch = self._pending.pop() if self._pending else self._next()
        check_example_inputs(batch, f"{self.name} (item {step})")
        return None, batch

    def __iter__(self) -> Iterator[Any]:
        """One pass over all batches."""
        if self.items is not None:
            yield from self.items
            return
        for index, batch in enumerate(self._stream):
            check_example_inputs(batch, f"{self.name}[{index}]")
            yield batch


class Runs:
    """Forward passes of both models on a batch; with ``keep``, the teacher's outputs (and those
    of its ``teacher_layers``) and the student's frozen frontier (when ``split`` is given) are
    kept under the batch's index (batches are revisited).

    >>> runs = Runs(nn.Linear(3, 2), nn.Linear(3, 2), split=None, keep=True)
    >>> x = torch.ones(1, 3)
    >>> output, _ = runs.teacher(0, x)
    >>> runs.teacher(0, x)[0] is output  # the teacher ran once for batch 0
    True
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        split: FrozenSplit | None,
        keep: bool,
        teacher_layers: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.student_model, self.teacher_model = student, teacher
        self.split, self.keep = split, keep
        self.teacher_layers: dict[str, nn.Module] = dict(teacher_layers or {})
        self._frontier: dict[int, tuple[Any, ...]] = {}
        self._teacher: dict[int, tuple[Any, dict[str, list[Any]]]] = {}

    def student(self, index: int | None, batch: Any) -> Any:
        """The student's output on ``batch`` (with grad unless the caller turns it off)."""
        if self.split is None:
            return call_model(self.student_model, batch)
        frontier = self._frontier.get(index) if index is not None else None
        if frontier is None:
            frontier = self.split.frontier(batch)
            if self.keep and index is not None:
                self._frontier[index] = frontier
        return self.split.run(frontier)

    def teacher(self, index: int | None, batch: Any) -> tuple[Any, dict[str, list[Any]]]:
        """The teacher's output on ``batch`` and the outputs of ``teacher_layers``."""
        found = self._teacher.get(index) if index is not None else None
        if found is not None and (found[1] or not self.teacher_layers):
            return found
        with torch.no_grad(), capture(self.teacher_layers, "outputs") as layers:
            output = call_model(self.teacher_model, batch)
        if self.keep and index is not None:
            self._teacher[index] = (output, layers)
        return output, layers

    def forget_layers(self) -> None:
        """Stop capturing teacher layer outputs and drop those kept."""
        self.teacher_layers = {}
        for _, layers in self._teacher.values():
            layers.clear()
