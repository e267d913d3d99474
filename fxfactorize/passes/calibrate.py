"""Pass 5, calibrate: input second moments of chosen layers, streamed over calibration batches.

An ``fx.Interpreter`` runs each batch through the graph and, at every ``call_module`` node whose
target is asked for, adds the layer's input rows (Linear: the last axis; Conv2d: the patches under
the kernel) to an :class:`~fxfactorize.core.moments.InputMoments`. Memory is ``O(D²)`` per layer
whatever the number of batches; the statistics are sums, so results of several runs add up.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxfactorize.calling import check_example_inputs, evaluation_mode, normalize_inputs
from fxfactorize.core.composer_api import accumulate_rows
from fxfactorize.core.moments import InputMoments
from fxfactorize.core.patches import conv_patch_rows
from fxfactorize.core.shrinkage import sum_statistics
from fxfactorize.errors import CalibrationError
from fxfactorize.layers import LayerShape, conv_arguments, describe_module, layer_kind

__all__ = [
    "FOLDS",
    "MomentCollector",
    "add_rows",
    "layer_rows",
    "rows_key",
    "calibrate",
    "calibration_batches",
    "calibration_warnings",
    "run_calibration",
]

log = logging.getLogger("fxfactorize")


class _NonFiniteInput(ValueError):
    """Raised inside the interpreter; re-raised as a plain ``ValueError`` naming the node."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target  # kept apart: fx may append its own context to the message


#: Calibration statistics are kept in this many disjoint folds, to validate the shrinkage on.
FOLDS = 2


def add_rows(
    folds: list,
    x: torch.Tensor,
    rows_of: Callable[[torch.Tensor], Iterable[torch.Tensor]],
    original: torch.Tensor | None = None,
    call: int = 0,
    with_original: bool = True,
) -> None:
    """Add a layer's input ``x`` (paired with ``original`` when given) to the folds of
    statistics: sample ``i`` of the leading axis goes to fold ``(i + call) % len(folds)``;
    ``rows_of`` turns a tensor into the layer's input rows; ``with_original=False`` leaves the
    paired statistics' ``original`` part to the caller. Folds split samples, never the rows
    of one sample (the two halves of an image are not two draws of the same distribution), and
    they interleave samples: contiguous halves follow the data's order (often grouped by source
    or class), and cross-validating across such groups over-shrinks toward data-free (measured:
    EfficientNet-Lite1 on crops grouped by photo, benchmarks/real_models.py).

    >>> folds = [InputMoments.zeros(2), InputMoments.zeros(2)]
    >>> add_rows(folds, torch.ones(5, 2), lambda t: [t], call=1)
    >>> [fold.count for fold in folds]
    [2, 3]
    """
    count = len(folds)
    if x.dim() <= 1:  # one sample: the whole input is one draw
        _accumulate(folds[call % count], x, rows_of, original, with_original)
        return
    for index in range(min(count, x.shape[0])):
        fold = folds[(call + index) % count]
        paired = None if original is None else original[index::count]
        _accumulate(fold, x[index::count], rows_of, paired, with_original)


def _accumulate(
    fold: Any,
    x: torch.Tensor,
    rows_of: Callable[[torch.Tensor], Iterable[torch.Tensor]],
    original: torch.Tensor | None,
    with_original: bool = True,
) -> None:
    if original is None:
        for rows in rows_of(x):
            accumulate_rows(fold, rows)
        return
    for rows, original_rows in zip(rows_of(x), rows_of(original), strict=True):
        fold.update(rows, original_rows, with_original)


def layer_rows(
    module: nn.Module, layer: LayerShape
) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The function from a layer's input to its input rows (Linear: the last axis; Conv: the
    patches under the kernel, a few images at a time)."""
    if layer.kind == "linear":
        return lambda x: [x.reshape(-1, layer.in_features)]
    arguments = conv_arguments(module)
    return lambda x: list(conv_patch_rows(x, layer.kernel, **arguments))


def rows_key(module: nn.Module, layer: LayerShape) -> tuple:
    """Equal for two layers that turn the same input into the same rows (and statistics).

    >>> rows_key(nn.Linear(4, 2), describe_module(nn.Linear(4, 2))) == rows_key(
    ...     nn.Linear(4, 8), describe_module(nn.Linear(4, 8)))
    True
    """
    if layer.kind == "linear":
        return (layer.kind, layer.in_features)
    arguments = tuple(sorted((name, repr(value)) for name, value in conv_arguments(module).items()))
    return (layer.kind, layer.in_features, layer.groups, layer.kernel, arguments)


def _fed_alike(gm: fx.GraphModule, layers: Mapping[str, tuple[nn.Module, LayerShape]]) -> dict:
    """``{target: an earlier target}`` for layers called once, on the value of the same graph
    node and with the same :func:`rows_key` (attention's query, key and value): their
    statistics are equal, so they are summed once."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in layers:
            calls.setdefault(node.target, []).append(node)
    first: dict[tuple, str] = {}
    alike: dict[str, str] = {}
    for target, nodes in calls.items():
        if len(nodes) != 1 or not nodes[0].args or not isinstance(nodes[0].args[0], fx.Node):
            continue
        key = (nodes[0].args[0], rows_key(*layers[target]))
        if key in first:
            alike[target] = first[key]
        else:
            first[key] = target
    return alike


class MomentCollector(fx.Interpreter):
    """Runs a GraphModule and accumulates the inputs of the layers in ``targets`` into ``moments``
    (``folds`` holds them in :data:`FOLDS` disjoint parts, see :func:`add_rows`).

    NaN or Inf at a layer's input raises an error naming the layer by ``qualify(target)`` (its
    name in the model when ``gm`` is a region of it).
    """

    def __init__(
        self, gm: fx.GraphModule, targets: Iterable[str], qualify: Callable[[str], str] = str
    ) -> None:
        super().__init__(gm)
        self._folds: dict[str, list[InputMoments]] = {}
        self._calls: dict[str, int] = {}
        self._layers: dict[str, tuple[nn.Module, LayerShape]] = {}
        self._qualify = qualify
        for target in targets:
            module = gm.get_submodule(target)
            if layer_kind(module) is None:  # fail early on an unsupported layer
                raise TypeError(
                    f"cannot calibrate a {type(module).__name__}; only Linear and Conv1d/2d/3d layers"
                )
            self._layers[target] = (module, describe_module(module))
        self._alike = _fed_alike(gm, self._layers)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        found = self._layers.get(target)
        if (
            found is not None
            and target not in self._alike
            and args
            and isinstance(args[0], torch.Tensor)
        ):
            self._add(target, *found, args[0])
        return super().call_module(target, args, kwargs)

    def _add(self, target: str, module: nn.Module, layer: LayerShape, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise _NonFiniteInput(self._qualify(target))
        if target not in self._folds:
            self._folds[target] = [
                InputMoments.zeros(layer.fan_in, layer.groups, device=x.device)
                for _ in range(FOLDS)
            ]
        call = self._calls.get(target, 0)
        self._calls[target] = call + 1
        add_rows(self._folds[target], x, layer_rows(module, layer), call=call)

    @property
    def folds(self) -> dict[str, list[InputMoments]]:
        """The statistics of each target reached, in :data:`FOLDS` folds."""
        return {
            target: self._folds[source] if source == target else copy.deepcopy(self._folds[source])
            for target, source in self._summed_as().items()
        }

    @property
    def calls(self) -> dict[str, int]:
        """How many calls of each target were collected (a call's fold depends on its index)."""
        return {target: self._calls[source] for target, source in self._summed_as().items()}

    def _summed_as(self) -> dict[str, str]:
        """``{target reached: the target whose summation holds its statistics}``."""
        sources = {target: self._alike.get(target, target) for target in self._layers}
        return {target: source for target, source in sources.items() if source in self._folds}

    @property
    def moments(self) -> dict[str, InputMoments]:
        """All rows' statistics per target (the folds summed)."""
        return {
            target: sum_statistics(self._folds[source])
            for target, source in self._summed_as().items()
        }


def _node_of(gm: fx.GraphModule, target: str) -> str:
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == target:
            return node.name
    return target


def run_calibration(
    batches: Iterable[Any],
    run_batch: Callable[[Any], None],
    *,
    name_of: Callable[[str], str],
    progress: bool = True,
) -> int:
    """Run ``run_batch`` on every batch (no grad); return how many ran. Errors name the batch:
    a batch that is empty or does not fit is a :class:`CalibrationError`, NaN or Inf reaching a
    collected layer a ``ValueError`` naming it (``name_of(target)``).

    >>> run_calibration([torch.ones(2, 3)], lambda batch: None, name_of=str, progress=False)
    1
    """
    seen = 0
    with torch.no_grad():
        for index, batch in enumerate(
            tqdm(calibration_batches(batches), desc="calibrate", unit="batch", disable=not progress)
        ):
            try:
                check_example_inputs(batch, "the batch")
                run_batch(batch)
            except _NonFiniteInput as error:
                raise ValueError(
                    f"calibration batch {index} gives NaN or Inf at the input of "
                    f"{name_of(error.target)}"
                ) from None
            except Exception as error:
                cause = error.__cause__ or error
                raise CalibrationError(index, f"{type(cause).__name__}: {cause}") from error
            seen += 1
    if seen == 0:
        raise ValueError("calibration has no batches")
    return seen


def calibrate(
    gm: fx.GraphModule,
    targets: Iterable[str],
    batches: Iterable[Any],
    *,
    progress: bool = True,
) -> dict[str, InputMoments]:
    """Input statistics of the Linear/Conv1d/2d/3d submodules ``targets`` of ``gm`` over ``batches``.

    Args:
        gm: a traced model (not changed; run in eval mode under ``torch.no_grad``).
        targets: qualified names of ``call_module`` targets (e.g. ``plan.factorized`` targets).
        batches: an iterable (a list, a ``DataLoader``) whose items are each a tensor, a tuple of
            positional inputs or a dict of keyword inputs. Items of a ``DataLoader`` that yields
            ``(inputs, labels)`` pairs must be mapped to the inputs first.
        progress: show a tqdm bar over the batches.

    Returns:
        ``{target: InputMoments}`` for each target that the batches reached, in float64.

    Raises:
        CalibrationError: a batch could not be run through the model (names the batch index).
        ValueError: a layer's input contains NaN or Inf (names the graph node), or no batch.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> stats = calibrate(gm, ["0", "2"], [torch.randn(5, 4), torch.randn(7, 4)], progress=False)
    >>> stats["0"].count, stats["2"].dim
    (12, 3)
    """
    collector = MomentCollector(gm, targets)

    def run_batch(batch: Any) -> None:
        collector.run(*normalize_inputs(gm, batch))

    with evaluation_mode(gm):
        seen = run_calibration(
            batches,
            run_batch,
            name_of=lambda target: f"graph node {_node_of(gm, target)!r} ({target})",
            progress=progress,
        )
    moments = collector.moments
    log.debug("calibrated %d layer(s) over %d batch(es)", len(moments), seen)
    return moments


def calibration_batches(batches: Any) -> Iterable[Any]:
    """``batches`` as an iterable of batches: a lone tensor / dict is one batch.

    >>> len(list(calibration_batches(torch.ones(2, 3))))
    1
    """
    if isinstance(batches, (torch.Tensor, Mapping)):
        return [batches]
    if not isinstance(batches, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (each a tensor, a tuple of positional "
            f"inputs or a dict of keyword inputs); got {type(batches).__name__}"
        )
    return batches


def calibration_warnings(moments: Mapping[str, InputMoments] | None, plan: Any) -> list[str]:
    """What a user must know about the statistics of ``plan``'s factorized layers: fewer rows than
    inputs (the data-aware solve is then exact on the rows and underdetermined elsewhere, so its
    calibration nmse says little), or inputs with no variance at all.

    >>> from fxfactorize.report import LayerRecord, Plan
    >>> plan = Plan([LayerRecord("fc", "fc", "Linear", 4, 4, (), 1, 16, 20, rank=1)], None)
    >>> moments = {"fc": InputMoments.zeros(4)}
    >>> moments["fc"].update(torch.ones(2, 4))
    >>> calibration_warnings(moments, plan)  # doctest: +NORMALIZE_WHITESPACE
    ['layer fc: calibration gave only 2 input row(s) for 4 input features, so the data-aware solve is underdetermined: its nmse on the calibration data (reported) says little about other inputs; give more calibration rows than input features']
    """
    notes = []
    for record in plan.factorized:
        stats = None if moments is None else moments.get(record.target)
        if stats is None:
            continue
        if stats.count < stats.dim:
            notes.append(
                f"layer {record.target}: calibration gave only {stats.count} input row(s) for "
                f"{stats.dim} input features, so the data-aware solve is underdetermined: its "
                "nmse on the calibration data (reported) says little about other inputs; give "
                "more calibration rows than input features"
            )
        elif float(stats.covariance().diagonal(dim1=-2, dim2=-1).sum()) <= 0.0:
            notes.append(
                f"layer {record.target}: its calibration inputs do not vary (all rows equal), so "
                "the data-aware solve learns nothing about other inputs"
            )
    return notes
