"""`transform` and `plan`: the pipeline's passes composed, and nothing else."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from torch import fx, nn

from fxfactorize.config import FactorizeConfig
from fxfactorize.errors import TraceError
from fxfactorize.optimizers import as_optimizer_list, update_optimizers
from fxfactorize.passes.calibrate import calibrate, calibration_batches, calibration_warnings
from fxfactorize.passes.cost import annotate_costs
from fxfactorize.passes.functional import convert_functional_layers
from fxfactorize.passes.plan import candidate_targets, plan_graph
from fxfactorize.passes.regions import calibratable_targets, plan_regions, transform_regions
from fxfactorize.passes.rewrite import has_submodule, install, rewrite
from fxfactorize.passes.shapes import check_example_inputs, propagate_shapes
from fxfactorize.passes.solve import solve_plan, solved_records
from fxfactorize.passes.trace import trace
from fxfactorize.report import REPORT_META, Plan, Report, publish
from fxfactorize.sharing import tied_layers

__all__ = ["plan", "transform"]

log = logging.getLogger("fxfactorize")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _analyse(
    model: nn.Module, example_inputs: Any, config: FactorizeConfig, tied: dict[str, str]
) -> tuple[fx.GraphModule, Plan]:
    gm = trace(model, config.leaf_modules)
    if config.functional:
        convert_functional_layers(gm)
    annotate_costs(propagate_shapes(gm, example_inputs))
    return gm, plan_graph(gm, config, tied=tied)


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

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    >>> p = plan(model, torch.randn(4, 512))
    >>> [(r.target, r.rank) for r in p.layers]
    [('0', 128), ('2', None)]
    """
    _check_model(model)
    config = FactorizeConfig.build(config, **overrides)
    check_example_inputs(example_inputs)
    try:
        return _analyse(model, example_inputs, config, tied_layers(model))[1]
    except TraceError:
        if config.on_untraceable == "raise":
            raise
    return plan_regions(model, example_inputs, config)


def transform(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration: Any = None,
    config: FactorizeConfig | None = None,
    optimizers: Any = None,
    inplace: bool = False,
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
    optimizers = None if optimizers is None else as_optimizer_list(optimizers)
    batches = None if calibration is None else calibration_batches(calibration)
    working = model if inplace else copy.deepcopy(model)
    tied = tied_layers(working)
    try:
        gm, the_plan = _analyse(working, example_inputs, config, tied)
    except TraceError:  # the root does not trace: transform its largest traceable submodules
        if config.on_untraceable == "raise":
            raise
        return transform_regions(
            working, example_inputs, config, started, batches, optimizers, original=model
        )
    moments = None
    if batches is not None:
        gm, the_plan, moments = _calibrate(gm, the_plan, batches, config, tied)
    solved = solve_plan(gm, the_plan, moments, progress=config.progress)
    replacements = {target: result.module for target, result in solved.items()}
    originals = {t: gm.get_submodule(t) for t in replacements}
    rewrite(gm, replacements)  # gm is the pass's own object: the caller's model is not touched yet
    warnings = the_plan.warnings + calibration_warnings(moments, the_plan)
    report = Report(solved_records(the_plan, solved), config, 0.0, warnings)
    if optimizers is not None:
        replaced = {t: model.get_submodule(t) for t in replacements if has_submodule(model, t)}
        update_optimizers(optimizers, model, gm, replaced)
    if inplace:
        install(model, {originals[t]: module for t, module in replacements.items()})
    report.seconds = time.perf_counter() - started
    gm.meta[REPORT_META] = report
    publish(report)
    return gm


def _calibrate(
    gm: fx.GraphModule, the_plan: Plan, batches: Any, config: FactorizeConfig, tied: dict
) -> tuple[fx.GraphModule, Plan, dict]:
    """Statistics of the planned layers (of every candidate for tolerance/budget, which then
    re-plan on them)."""
    replan = config.tolerance is not None or config.budget is not None
    if replan:  # these policies predict errors from the statistics: calibrate every candidate
        targets = candidate_targets(gm, config, tied)
    else:
        targets = [record.target for record in the_plan.factorized]
    targets = calibratable_targets(gm, targets)
    moments = calibrate(gm, targets, batches, progress=config.progress)
    if replan:
        the_plan = plan_graph(gm, config, moments=moments, tied=tied)
    return gm, the_plan, moments
