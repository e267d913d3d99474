"""`heal`: distil a factorized model (the student) toward the original (the teacher)."""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxfactorize.calling import call_model, evaluation_mode
from fxfactorize.errors import FactorizeWarning
from fxfactorize.healing.local import capture, factorized_layers, fit_layers, teacher_layers
from fxfactorize.healing.losses import resolve_loss
from fxfactorize.healing.prefix import split_frozen_prefix
from fxfactorize.healing.report import HealReport
from fxfactorize.healing.runs import Batches, Runs
from fxfactorize.passes.distributed import (
    Group,
    average_gradients,
    broadcast_parameters,
)
from fxfactorize.passes.distributed import process_group as group_of

__all__ = ["HealReport", "heal"]

log = logging.getLogger("fxfactorize")

TRAINABLE = ("factorized", "all")
#: Most local steps taken when ``local_steps`` is not given (half of ``steps`` up to this).
MAX_DEFAULT_LOCAL_STEPS = 50


def _check_arguments(
    student: Any, teacher: Any, steps: Any, lr: Any, local_steps: Any, trainable: Any
) -> None:
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module; got {type(value).__name__}")
    if student is teacher:
        raise ValueError(
            "student and teacher are the same module: heal trains a copy (e.g. what "
            "ff.transform returns) toward the original"
        )
    if not _is_count(steps):
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    if local_steps is not None and not (_is_count(local_steps) and local_steps <= steps):
        raise ValueError(
            f"local_steps must be None or an int in [0, steps={steps}]; got {local_steps!r}"
        )
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be 'factorized' or 'all'; got {trainable!r}")


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _trainable_parameters(
    student: nn.Module, layers: Mapping[str, nn.Module], trainable: str
) -> list[nn.Parameter]:
    if trainable == "all":
        return [p for p in student.parameters() if p.is_floating_point()]
    found: dict[int, nn.Parameter] = {}
    for layer in layers.values():
        for p in layer.parameters():
            found.setdefault(id(p), p)
    return list(found.values())


def _evaluate(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Any], loss_fn: Callable
) -> float:
    values = []
    with torch.no_grad():
        for batch in batches:
            value = loss_fn(call_model(student, batch), call_model(teacher, batch))
            values.append(float(value))
    if not values:
        raise ValueError("eval_batches is empty: give at least one batch")
    return sum(values) / len(values)


def _checked_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError(
            f"loss must return a scalar tensor; got {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
        )
    if not value.requires_grad:
        raise ValueError(
            "the loss does not depend on any trainable parameter of the student (is the "
            "student's output computed from its factorized layers?)"
        )
    return value.reshape(())


def _check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the {what} is {value} at step {step}; the student's parameters were restored "
            "(a lower lr may help)"
        )


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batches: Any,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    loss: str | Callable[[Any, Any], torch.Tensor] = "kl",
    local_steps: int | None = None,
    trainable: str = "factorized",
    eval_batches: Any = None,
    progress: bool = True,
    process_group: Any = None,
    distributed: bool = True,
) -> HealReport:
    """Train a factorized ``student`` (e.g. what :func:`fxfactorize.transform` returns) in place
    to compute what ``teacher`` (the original model) computes.

    Two phases share ``steps``, each step on the next of ``batches`` (cycled):

    1. **local** (``local_steps``; default ``min(steps // 2, 50)``; 0 skips it): each factorized
       layer (a :class:`~fxfactorize.layers.FactorizedLayer` submodule of the student) is fitted,
       on the inputs it gets in the student (detached: nothing is backpropagated through the
       network), to the output of the teacher's submodule of the same qualified name on the
       teacher's own inputs. Loss per layer: mse / variance of the teacher's output. Cheap: one
       forward pass without grad, then each layer alone.
    2. **end-to-end** (the other steps): ``loss`` between the student's and the teacher's outputs.

    Args:
        student: the model to train (changed in place).
        teacher: the reference; never changed (run in eval mode under ``torch.no_grad``).
        batches: what ``transform(calibration=...)`` takes: a tensor (one batch) or an iterable
            whose items are each a tensor, a tuple of positional inputs or a dict of keyword
            inputs, taken in turn, one per step, and cycled. A list or tuple is indexed; a
            generator is read once (at most ``steps`` items) into a list; another iterable (a
            ``DataLoader``) is streamed and started again when it runs out.
        steps: optimisation steps in all (Adam).
        lr: Adam's learning rate.
        loss: ``"kl"`` (``KL(softmax(teacher) ‖ softmax(student))`` over the last dim of each
            floating-point output leaf, summed over leaves), ``"mse"`` (mse / variance of the
            teacher's leaf, summed over leaves), or a callable ``loss(student_output,
            teacher_output)`` given the raw outputs (tensors, tuples, dicts, dataclasses, ...)
            that returns a scalar tensor. Leaves are matched by position in the output structure.
        local_steps: steps of the local phase (at most ``steps``). When not given and a
            factorized layer has no teacher module of its name (made from a functional call),
            the local phase is skipped with a logged warning.
        trainable: ``"factorized"`` (the factorized layers' parameters) or ``"all"`` (every
            floating-point parameter of the student). Other parameters stay bitwise unchanged.
        eval_batches: held-out batches (same forms as ``batches``, all of them used twice: before
            and after); the report then gives the mean ``loss`` on them (no grad).
        progress: show a tqdm progress bar (on rank 0 only, in a process group).
        process_group: the ``torch.distributed`` process group to train in (default: the world
            group, when one is initialised): each rank takes its own ``batches``, and at every
            step the gradients (and the loss) are averaged over the ranks, as
            ``DistributedDataParallel`` does, so all ranks end with identical weights. A rank
            that fails makes every rank raise a :class:`~fxfactorize.errors.DistributedError`
            naming it. ``distributed=False`` trains this process alone.

    Returns:
        A :class:`HealReport`.

    The student runs in eval mode (no dropout, BatchNorm statistics unchanged) while its
    parameters train; every module's training flag and every parameter's ``requires_grad`` is
    restored afterwards, and so are the trained parameters' ``.grad``.

    The teacher is frozen, and so is the part of a ``torch.fx.GraphModule`` student's graph that
    depends on no trainable parameter (with ``trainable="factorized"``, e.g. the layers before
    the first factorized one): that part runs without autograd, and when a list of
    fewer batches than ``steps`` is cycled, its results (the values where the trainable part
    begins) and the teacher's outputs are computed once per batch and kept (memory: one set per
    batch), so that each step runs only the trainable rest of the student. Random operations in
    the frozen part then draw once per batch. Any other student runs whole at each step.

    On an error, including a NaN/Inf loss (``FloatingPointError``), the trained parameters are
    restored.

    >>> import torch, fxfactorize as ff
    >>> _ = torch.manual_seed(0)
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    >>> data = [torch.randn(32, 64) for _ in range(5)]
    >>> student = ff.transform(teacher, data[0], latent_features=8, min_features=64,
    ...                        cost_model="macs", progress=False)
    >>> report = ff.heal(student, teacher, data[:4], steps=60, lr=1e-2, eval_batches=data[4:],
    ...                  progress=False)
    >>> before, after = report.eval_loss
    >>> after < before
    True
    """
    started = time.perf_counter()
    _check_arguments(student, teacher, steps, lr, local_steps, trainable)
    group = group_of(distributed, process_group)
    progress = progress and (group is None or group.rank == 0)
    loss_fn, objective = resolve_loss(loss)
    layers = factorized_layers(student)
    if not layers and trainable == "factorized":
        raise ValueError(
            "student has no factorized layer (no fxfactorize.layers.FactorizedLayer submodule), "
            "so trainable='factorized' has nothing to train; factorize it first or pass "
            "trainable='all'"
        )
    chosen = local_steps is None
    if local_steps is None:
        local_steps = min(steps // 2, MAX_DEFAULT_LOCAL_STEPS) if layers else 0
    elif local_steps > 0 and not layers:
        raise ValueError("local_steps > 0 needs a factorized layer in the student; it has none")
    params = _trainable_parameters(student, layers, trainable)
    trainable_ids = {id(p) for p in params}
    teacher_ids = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in trainable_ids & teacher_ids]
    if shared:
        raise ValueError(
            f"student parameters {shared[:5]} are also the teacher's: training them would change "
            "the teacher (transform(..., inplace=True) shares them; use a copy)"
        )
    try:
        targets = teacher_layers(layers, teacher) if local_steps else {}
    except ValueError as error:
        if not chosen or "has no counterpart" not in str(error):
            raise
        # a layer made from a functional call has no teacher module: heal end to end only
        log.warning("healing end to end only: %s", error)
        local_steps, targets = 0, {}
    train = Batches(batches, "batches", limit=max(steps, 1), peek=True)
    held_out = None if eval_batches is None else Batches(eval_batches, "eval_batches")
    split = None
    if isinstance(student, fx.GraphModule):
        split = split_frozen_prefix(student, trainable_ids)
    keep = train.indexed and len(train.items) < steps  # some batches are revisited
    runs = Runs(student, teacher, split, keep, teacher_layers=targets)
    log.info(
        "heal: %d local + %d end-to-end steps on %s batch(es), %d trainable parameters, "
        "frozen prefix of %d graph node(s), results kept per batch: %s",
        local_steps,
        steps - local_steps,
        len(train.items) if train.indexed else "streamed",
        sum(p.numel() for p in params),
        0 if split is None else split.prefix_nodes,
        keep,
    )

    flags = [(p, p.requires_grad) for p in student.parameters()]
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]  # the caller's, put back after: heal leaves no gradients
    report = HealReport(
        steps,
        local_steps,
        0.0,
        None,
        sum(p.numel() for p in params),
        objective=objective,
        trainable=trainable,
        prefix_nodes=0 if split is None else split.prefix_nodes,
    )
    bar = tqdm(total=steps, desc="heal", unit="step", disable=not progress)
    try:
        with evaluation_mode(student, teacher):
            before = None if held_out is None else _evaluate(student, teacher, held_out, loss_fn)
            for p in student.parameters():
                p.requires_grad_(id(p) in trainable_ids)
            broadcast_parameters(group, params)  # as DDP does: every rank starts from rank 0's
            _local_phase(runs, train, layers, local_steps, lr, report, bar, group)
            runs.forget_layers()
            _end_to_end_phase(
                runs, train, params, local_steps, steps, lr, loss_fn, report, bar, group
            )
            if held_out is not None:
                report.eval_loss = (before, _evaluate(student, teacher, held_out, loss_fn))
    except BaseException:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        raise
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
    report.seconds = time.perf_counter() - started
    if report.eval_loss is not None and report.eval_loss[1] > 1.01 * report.eval_loss[0]:
        report.warnings.append(
            f"healing raised the held-out loss ({report.eval_loss[0]:.4g} → "
            f"{report.eval_loss[1]:.4g}); try a lower lr, fewer steps or more batches"
        )
    for text in report.warnings:
        warnings.warn(text, FactorizeWarning, stacklevel=2)
    log.info("%s", report)
    return report


def _local_phase(
    runs: Runs,
    batches: Batches,
    layers: Mapping[str, nn.Module],
    local_steps: int,
    lr: float,
    report: HealReport,
    bar: Any,
    group: Group | None = None,
) -> None:
    if local_steps == 0:
        return
    params = {id(p): p for layer in layers.values() for p in layer.parameters()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    for step in range(local_steps):
        losses: dict[str, float] = {}
        error = None
        try:
            index, batch = batches.take(step)
            _, targets = runs.teacher(index, batch)
            with torch.no_grad(), capture(layers, "inputs") as inputs:
                runs.student(index, batch)
            optimizer.zero_grad(set_to_none=True)
            losses = fit_layers(layers, inputs, targets)
        except Exception as failure:
            error = failure
        mean = sum(losses.values()) / len(losses) if losses else math.nan
        mean = average_gradients(
            group, list(params.values()), mean, error, f"heal (local step {step})"
        )
        _check_finite(mean, "local loss", step)
        optimizer.step()
        for name, value in losses.items():
            report.local_loss[name] = (report.local_loss.get(name, (value, value))[0], value)
        bar.set_postfix_str(f"local nmse {mean:.4g}", refresh=False)
        bar.update()


def _end_to_end_phase(
    runs: Runs,
    batches: Batches,
    params: list[nn.Parameter],
    first_step: int,
    steps: int,
    lr: float,
    loss_fn: Callable,
    report: HealReport,
    bar: Any,
    group: Group | None = None,
) -> None:
    if first_step == steps:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(first_step, steps):
        number, error = math.nan, None
        try:
            index, batch = batches.take(step)
            target, _ = runs.teacher(index, batch)
            value = _checked_loss(loss_fn(runs.student(index, batch), target))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            number = float(value.detach())
        except Exception as failure:
            error = failure
        number = average_gradients(group, params, number, error, f"heal (step {step})")
        _check_finite(number, "end-to-end loss", step)
        optimizer.step()
        report.history.append(number)
        bar.set_postfix_str(f"loss {number:.4g}", refresh=False)
        bar.update()
    report.loss = (report.history[0], report.history[-1])
