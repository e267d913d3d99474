"""`transform` and `plan`: the pipeline's passes composed, and nothing else."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from torch import fx, nn

from fxfactorize.calling import check_example_inputs
from fxfactorize.config import FactorizeConfig
from fxfactorize.healing import heal as distil
from fxfactorize.layers import layer_kind
from fxfactorize.optimizers import as_optimizer_list, update_optimizers
from fxfactorize.passes.calibrate import calibration_batches
from fxfactorize.passes.distributed import process_group as group_of
from fxfactorize.passes.latency import (
    latency_of,
    small_gain_warning,
    time_original,
    wants_prediction,
)
from fxfactorize.passes.pipeline import Outcome, plan_regions, run_pipeline
from fxfactorize.passes.regions import Region, regions_of
from fxfactorize.passes.rewrite import has_submodule, install
from fxfactorize.report import (
    PartialPlan,
    PartialReport,
    Plan,
    Report,
    UntracedModule,
    attach_report,
    publish,
)
from fxfactorize.sharing import tied_layers

__all__ = ["plan", "transform"]

log = logging.getLogger("fxfactorize")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _time_layers(model: nn.Module, example_inputs: Any, config: FactorizeConfig) -> Any:
    """The original model's timing (whole and per Linear/Conv layer), or ``None`` if
    ``config`` does not want the latency predicted (see :mod:`fxfactorize.passes.latency`)."""
    if not wants_prediction(config, model):
        return None
    targets = [name for name, module in model.named_modules() if layer_kind(module)]
    return time_original(model, example_inputs, targets)


def plan(
    model: nn.Module,
    example_inputs: Any,
    *,
    config: FactorizeConfig | None = None,
    **overrides: Any,
) -> Plan:
    """What :func:`transform` would do to ``model``, without solving anything.

    ``print(plan(...))`` shows, per Linear/Conv layer, its shape, the chosen rank and the MACs and
    parameters before/after, or the reason it is left alone. ``model`` is not changed.
    Unless the device profile is pinned, the original model is timed on ``example_inputs`` (a
    few forward passes) and ``plan.latency`` predicts the whole model's latency ratio as planned
    (see :class:`~fxfactorize.FactorizeConfig`'s ``predict_latency``).

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    >>> p = plan(model, torch.randn(4, 512))
    >>> [(r.target, r.rank) for r in p.layers]
    [('0', 128), ('2', None)]
    """
    _check_model(model)
    config = FactorizeConfig.build(config, **overrides)
    check_example_inputs(example_inputs)
    timing = _time_layers(model, example_inputs, config)
    regions, untraced = regions_of(model, example_inputs, config)
    the_plan, _ = plan_regions(regions, config, tied_layers(model))
    if untraced is not None:
        names = [region.name for region in regions]
        the_plan = PartialPlan(the_plan.layers, config, names, untraced, the_plan.warnings)
    if timing is not None:
        _predict(the_plan, timing)
    return the_plan


def transform(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration: Any = None,
    config: FactorizeConfig | None = None,
    optimizers: Any = None,
    inplace: bool = False,
    heal: int | dict[str, Any] = 0,
    process_group: Any = None,
    **overrides: Any,
) -> fx.GraphModule | nn.Module:
    """Factorize the Linear/Conv layers of ``model`` where that reduces the work.

    ``model`` is traced with torch.fx, shapes are propagated with ``example_inputs`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs), each layer is planned (see
    :func:`plan`), solved (truncated SVD of the weight), and swapped for a factorized pair. The
    returned ``GraphModule`` carries a :class:`~fxfactorize.report.Report` as
    ``gm.meta["fxfactorize"]``.

    If the model does not trace whole (data-dependent control flow, asserts on shapes, ...) and
    ``on_untraceable="descend"`` (the default), its largest traceable submodules are transformed
    instead and the result is the (copied) model itself, with those submodules replaced by
    GraphModules and the report — a :class:`~fxfactorize.report.PartialReport` listing the traced
    regions and why the rest did not trace — in ``result.meta["fxfactorize"]``;
    :func:`~fxfactorize.report_of` reads either. ``on_untraceable="raise"`` raises the
    :class:`~fxfactorize.errors.TraceError` instead.

    Args:
        model: the model; deep-copied first unless ``inplace=True``.
        example_inputs: inputs for one forward pass, used for shapes and MAC counts.
        calibration: batches for data-aware solving: an iterable (list, ``DataLoader``) whose
            items are each a tensor, a tuple of positional inputs or a dict of keyword inputs
            (a lone tensor is one batch). Each planned layer is then solved to minimise its
            output error on these inputs (see :func:`fxfactorize.passes.calibrate.calibrate`),
            and the report's nmse is exact on them (``nmse_source == "calibration"``).
        config: a :class:`FactorizeConfig`; ``**overrides`` replace its fields.
        optimizers: an optimizer (or a list of them) over ``model``'s parameters; its param
            groups are updated to train the returned module: replaced layers' parameters are
            swapped for the factorized ones (same group), and with ``inplace=False`` every
            other parameter for its copy in the returned module. State of removed parameters
            is dropped.
        inplace: factorize ``model``'s own modules instead of a copy.
        heal: steps of :func:`fxfactorize.heal` (distillation toward ``model``) on the
            ``calibration`` batches once the layers are solved, or a dict of its keyword
            arguments (``{"steps": 200, "lr": 1e-4}``); ``0`` (default) does not heal. The
            :class:`~fxfactorize.healing.HealReport` is the report's ``heal``.
        process_group: the ``torch.distributed`` process group to run in (default: the world
            group, when one is initialised). Every rank passes its own ``calibration`` batches
            and gets the same plan and bitwise-identical weights: those of one process
            calibrated on all ranks' batches (rank 0's first), up to float64 summation order.
            Rank 0's plan is every rank's. ``distributed=False`` (a config field) opts out.

    Every argument is checked and every layer solved before anything is installed: on any error
    the caller's model and optimizers are as they were. A module reachable under several names
    gets one replacement, set under each name; a layer whose parameter is tied to another module
    (an output layer sharing an embedding's weight) is left alone, its reason in the report.
    What a user must know about the result (a budget that cannot be met, too little calibration
    data) is in the report's ``warnings`` and raised as a
    :class:`~fxfactorize.errors.FactorizeWarning`.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    >>> gm = transform(model, torch.randn(4, 512), progress=False)
    >>> type(gm.get_submodule("0")).__name__, gm(torch.randn(4, 512)).shape
    ('FactorizedLinear', torch.Size([4, 10]))
    """
    _check_model(model)
    config = FactorizeConfig.build(config, **overrides)
    started = time.perf_counter()
    check_example_inputs(example_inputs)
    group = group_of(config.distributed, process_group)
    heal_options = _heal_options(heal, calibration)
    optimizers = None if optimizers is None else as_optimizer_list(optimizers)
    batches = None if calibration is None else calibration_batches(calibration)
    if heal_options and config.propagate_error and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # calibrated, then healed on: read them once
    timing = _time_layers(model, example_inputs, config)  # before anything changes it
    teacher = copy.deepcopy(model) if heal_options and inplace else model
    working = model if inplace else copy.deepcopy(model)
    regions, untraced = regions_of(working, example_inputs, config)
    outcome = run_pipeline(working, regions, config, batches, tied_layers(working), group)
    result = regions[0].graph if untraced is None else working
    report = _report(outcome, config, regions, untraced)
    if timing is not None:
        _predict(report, timing)
    if batches is not None:
        report.calibration = "propagate_error" if config.propagate_error else "independent"
    replaced = {t: model.get_submodule(t) for t in outcome.solved if has_submodule(model, t)}
    undo = install(working, outcome.regions)  # a partial result: its regions become graphs
    try:
        if optimizers is not None:
            update_optimizers(optimizers, model, result, replaced)
    except Exception:
        undo()  # all or nothing
        raise
    if inplace and untraced is None:
        install(model, outcome.layers)
    if heal_options:
        report.heal = _heal(result, teacher, batches, outcome, heal_options, config, group)
    report.seconds = time.perf_counter() - started
    attach_report(result, report)
    publish(report, "" if untraced is None else f" (partial tracing: {len(regions)} regions)")
    return result


def _predict(result: Plan | Report, timing: Any) -> None:
    """Attach the whole model's predicted latency to ``result``, warning if the gain is small."""
    result.latency = latency_of(timing, result.layers)
    warning = small_gain_warning(result.latency, result.layers)
    if warning is not None:
        result.warnings.append(warning)


def _heal_options(heal: Any, calibration: Any) -> dict[str, Any]:
    """``heal=`` as keyword arguments of :func:`fxfactorize.heal` (empty: no healing)."""
    if isinstance(heal, bool) or not isinstance(heal, (int, dict)):
        raise TypeError(
            f"heal must be a number of steps or a dict of heal() arguments; got {heal!r}"
        )
    options = dict(heal) if isinstance(heal, dict) else {"steps": heal}
    if options.get("steps", 100) < 0:
        raise ValueError(f"heal steps must be >= 0; got {options['steps']}")
    if options.get("steps", 100) == 0:
        return {}
    if calibration is None:
        raise ValueError("heal= needs calibration= batches to distil on")
    return options


def _heal(
    result: nn.Module,
    teacher: nn.Module,
    batches: Any,
    outcome: Outcome,
    options: dict[str, Any],
    config: FactorizeConfig,
    group: Any = None,
) -> Any:
    """Distil ``result`` toward ``teacher`` (see :func:`fxfactorize.heal`), end to end unless
    ``local_steps`` is given: each calibrated layer already is the closed-form optimum of the
    local objective, and Adam steps from an optimum only wander (measured on a 3-layer MLP:
    held-out nmse 0.453 after 100 end-to-end steps, 0.476 with 20 of them local)."""
    if not outcome.solved:
        return None
    options = {"local_steps": 0, **options}
    if group is not None:
        options.setdefault("process_group", group.handle)
    else:
        options.setdefault("distributed", False)
    return distil(result, teacher, batches, **{"progress": config.progress, **options})


def _report(
    outcome: Outcome,
    config: FactorizeConfig,
    regions: list[Region],
    untraced: list[UntracedModule] | None,
) -> Report:
    if untraced is None:
        return Report(outcome.records, config, 0.0, outcome.warnings)
    names = [region.name for region in regions]
    return PartialReport(outcome.records, config, 0.0, names, untraced, outcome.warnings)
