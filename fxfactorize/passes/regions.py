"""Partial tracing: when the model does not trace whole, transform its largest traceable parts.

``find_regions`` walks the module tree from the root: a module that torch.fx traces is a region
(its children are not visited); one that does not is recorded with torch.fx's reason and its
children are tried in turn. A bare Linear/Conv child of an untraceable module is a region too.
The inputs of every region come from running the *whole* model once on ``example_inputs`` with
forward pre-hooks, so each region is shaped (and later calibrated) exactly as the model calls it;
inputs the model passes as ``None`` are traced as constants (``concrete_args``) so optional
branches such as ``if mask is not None`` follow the path the model takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from fxfactorize.config import FactorizeConfig
from fxfactorize.core.moments import InputMoments
from fxfactorize.errors import CalibrationError, TraceError
from fxfactorize.layers import PLAIN_LAYERS, layer_kind
from fxfactorize.methods import Solved
from fxfactorize.optimizers import update_optimizers
from fxfactorize.passes.calibrate import (
    MomentCollector,
    calibration_batches,
    calibration_warnings,
)
from fxfactorize.passes.cost import annotate_costs
from fxfactorize.passes.functional import convert_functional_layers
from fxfactorize.passes.plan import plan_graph
from fxfactorize.passes.rewrite import has_submodule, install, replace_submodule, rewrite
from fxfactorize.passes.shapes import (
    check_example_inputs,
    evaluation_mode,
    normalize_inputs,
    propagate_shapes,
)
from fxfactorize.passes.solve import solve_plan, solved_records
from fxfactorize.passes.trace import DEFAULT_LEAF_MODULES, FactorizeTracer, trace
from fxfactorize.report import (
    LayerRecord,
    PartialPlan,
    PartialReport,
    Plan,
    UntracedModule,
    attach_report,
    publish,
    report_of,
)
from fxfactorize.sharing import tied_layers

__all__ = [
    "Region",
    "calibratable_targets",
    "calibrate_regions",
    "find_regions",
    "plan_regions",
    "report_of",
    "transform_regions",
]

log = logging.getLogger("fxfactorize")

_TORCH_LEAVES = FactorizeTracer()  # only its is_leaf_module is used: torch.fx's own leaf rule


@dataclasses.dataclass
class Region:
    """A traced part of the model: ``name`` (qualified), its GraphModule and how the model called it.

    ``layer`` is true when the region is a bare Linear/Conv (traced through a one-call wrapper; the
    factorized layer itself replaces it).
    """

    name: str
    graph: fx.GraphModule
    inputs: dict[str, Any]
    layer: bool = False


class _OneLayer(nn.Module):
    """Wrapper that lets a bare layer be traced as a one-node graph."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.layer(input)


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    >>> run_model(nn.Linear(3, 2), {"input": torch.ones(1, 3)}).shape
    torch.Size([1, 2])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def capture_calls(model: nn.Module, example_inputs: Any) -> dict[str, tuple[tuple, dict]]:
    """``{qualified name: (args, kwargs)}`` of the first call of every submodule (and ``""``, the
    model) while ``model`` runs once on ``example_inputs`` (eval mode, no grad).

    >>> calls = capture_calls(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.ones(4, 3))
    >>> sorted(calls), calls["0"][0][0].shape
    (['', '0', '1'], torch.Size([4, 3]))
    """
    calls: dict[str, tuple[tuple, dict]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (args, dict(kwargs)))

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name), with_kwargs=True)
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad(), evaluation_mode(model):
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _bound_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _relative_leaves(config: FactorizeConfig, prefix: str) -> tuple:
    """``config.leaf_modules`` as seen from the submodule ``prefix`` (names made relative)."""
    leaves = []
    for leaf in config.leaf_modules:
        if isinstance(leaf, str):
            if not prefix:
                leaves.append(leaf)
            elif leaf.startswith(prefix + "."):
                leaves.append(leaf[len(prefix) + 1 :])
        else:
            leaves.append(leaf)
    return tuple(leaves)


def _is_leaf(module: nn.Module, name: str, config: FactorizeConfig) -> bool:
    types = tuple(
        leaf for leaf in (*DEFAULT_LEAF_MODULES, *config.leaf_modules) if isinstance(leaf, type)
    )
    return isinstance(module, types) or name in config.leaf_modules


def _has_weights(module: nn.Module) -> bool:
    return any(parameter.dim() >= 2 for parameter in module.parameters())


def _outputs_match(gm: fx.GraphModule, module: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether the traced ``gm`` computes what ``module`` does on the captured ``inputs``."""
    placeholders = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    try:
        with torch.no_grad(), evaluation_mode(module):
            expected = module(**inputs)
            got = gm(**{key: inputs[key] for key in placeholders if key in inputs})
    except Exception:  # any failure means the trace took a path the model does not take
        return False
    expected_leaves, expected_spec = tree_flatten(expected)
    got_leaves, got_spec = tree_flatten(got)
    if expected_spec != got_spec:
        return False
    return all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(expected_leaves, got_leaves, strict=True)
    )


def _trace_region(
    module: nn.Module, name: str, inputs: dict[str, Any], config: FactorizeConfig
) -> fx.GraphModule:
    """Trace ``module``; if the graph does not reproduce the call the model made (typically an
    ``if x is not None`` taken on a proxy while the model passes ``None``), trace again with the
    ``None`` inputs as constants. torch.fx then guards them (a non-``None`` value raises)."""
    leaves = _relative_leaves(config, name)
    gm = trace(module, leaves)
    constants = {key: None for key, value in inputs.items() if value is None}
    if not constants or _outputs_match(gm, module, inputs):
        return gm
    gm = trace(module, leaves, concrete_args=constants)
    for node in gm.graph.nodes:  # torch.fx renames constant inputs ("mask_1"); keep the keyword
        if node.op == "placeholder" and node.target not in inputs:
            original = node.target.rpartition("_")[0]
            if original in constants:
                node.target = original
    gm.recompile()
    return gm


def find_regions(
    model: nn.Module, example_inputs: Any, config: FactorizeConfig
) -> tuple[list[Region], list[UntracedModule]]:
    """The largest traceable submodules of ``model`` and the modules that did not trace.

    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    ...     def forward(self, x):
    ...         return self.body(x) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it
    >>> regions, untraced = find_regions(Gate(), torch.ones(2, 4), FactorizeConfig())
    >>> [r.name for r in regions], [(u.name, u.module_class) for u in untraced]
    (['body'], [('', 'Gate')])
    """
    calls = capture_calls(model, example_inputs)
    regions: list[Region] = []
    untraced: list[UntracedModule] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen or not _has_weights(module):
            return
        seen.add(id(module))
        if name and _is_leaf(module, name, config):
            return  # the user (or the default policy) keeps it whole
        if name not in calls:  # a ModuleList/ModuleDict, or a module the inputs do not reach
            if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                reason = "not called by example_inputs"
                untraced.append(UntracedModule(name, type(module).__name__, reason))
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)
            return
        layer = isinstance(module, PLAIN_LAYERS)
        if name and not layer and _TORCH_LEAVES.is_leaf_module(module, name):
            return  # a torch.nn layer with nothing to factorize (Embedding, LayerNorm, ...)
        inputs = _bound_inputs(module, *calls[name])
        if layer:
            gm = trace(_OneLayer(module))
            regions.append(Region(name, gm, {"input": inputs[next(iter(inputs))]}, layer=True))
            return
        try:
            gm = _trace_region(module, name, inputs, config)
        except TraceError as error:
            untraced.append(UntracedModule(name, type(module).__name__, error.reason))
            log.debug(
                "cannot trace %s (%s): %s", name or "the model", type(module).__name__, error.reason
            )
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)
            return
        regions.append(Region(name, gm, inputs))

    visit(model, "")
    return regions, untraced


def _analyse_region(
    region: Region, config: FactorizeConfig, tied: dict[str, str] | None = None
) -> Plan:
    """The region's plan; ``tied`` names the model's tied layers by their qualified names."""
    gm = region.graph
    if config.functional:
        convert_functional_layers(gm)
    placeholders = {node.target for node in gm.graph.nodes if node.op == "placeholder"}
    inputs = {key: value for key, value in region.inputs.items() if key in placeholders}
    annotate_costs(propagate_shapes(gm, inputs))
    return plan_graph(gm, config, tied=_relative_ties(tied or {}, region))


def _relative_ties(tied: dict[str, str], region: Region) -> dict[str, str]:
    """``tied`` with names made relative to ``region``'s graph."""
    if region.layer:  # the one-layer wrapper calls it "layer"
        return {"layer": tied[region.name]} if region.name in tied else {}
    prefix = f"{region.name}."
    return {name[len(prefix) :]: reason for name, reason in tied.items() if name.startswith(prefix)}


def _check_not_whole(regions: list[Region]) -> None:
    if any(region.name == "" for region in regions):
        raise ValueError("the model traces whole: use fxfactorize.transform, not partial tracing")


def _qualify_target(target: str, region: Region) -> str:
    return region.name if region.layer else f"{region.name}.{target}"


def _qualify(record: LayerRecord, region: Region) -> LayerRecord:
    if region.layer:  # the wrapper's one layer is the region itself
        return dataclasses.replace(record, node=region.name, target=region.name)
    return dataclasses.replace(
        record, node=f"{region.name}.{record.node}", target=f"{region.name}.{record.target}"
    )


def plan_regions(model: nn.Module, example_inputs: Any, config: FactorizeConfig) -> Plan:
    """:func:`~fxfactorize.plan` for a model whose root does not trace (``model`` is unchanged).

    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(512, 512)
    ...     def forward(self, x):
    ...         return self.fc(x) if x.sum() > 0 else x
    >>> p = plan_regions(Gate(), torch.ones(2, 512), FactorizeConfig())
    >>> p.regions, [(r.target, r.rank) for r in p.layers]
    (['fc'], [('fc', 128)])
    """
    regions, untraced = find_regions(model, example_inputs, config)
    tied = tied_layers(model)
    records, warnings = [], []
    for region in regions:
        region_plan = _analyse_region(region, config, tied)
        records += [_qualify(record, region) for record in region_plan.layers]
        warnings += region_plan.warnings
    return PartialPlan(records, config, [region.name for region in regions], untraced, warnings)


def calibratable_targets(gm: fx.GraphModule, targets: Iterable[str]) -> list[str]:
    """The ``targets`` the calibration pass takes (Linear, Conv1d/2d/3d); the rest (for example
    tensorized Linears) are solved data-free.

    >>> from fxfactorize.passes.cost import annotate_costs
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(512, 512), nn.Unflatten(1, (512, 1)),
    ...                                      nn.Conv1d(512, 512, 1)))
    >>> p = plan_graph(annotate_costs(propagate_shapes(gm, torch.ones(2, 512))), FactorizeConfig())
    >>> calibratable_targets(gm, [r.target for r in p.factorized])
    ['0', '2']
    """
    return [target for target in targets if layer_kind(gm.get_submodule(target)) is not None]


class _Collecting(nn.Module):
    """Stands in for a region while the whole model runs calibration batches: runs the region's
    graph through a :class:`MomentCollector`, which records its layers' inputs."""

    def __init__(self, gm: fx.GraphModule, collector: MomentCollector) -> None:
        super().__init__()
        self.gm, self.collector = gm, collector

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(self.gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return self.collector.run(*normalize_inputs(self.gm, dict(bound.arguments)))


def calibrate_regions(
    model: nn.Module, regions: list[Region], plans: list[Plan], batches: Any, progress: bool
) -> list[dict[str, InputMoments]]:
    """Input moments of each region's planned layers, collected while the *whole* ``model`` runs
    on ``batches`` (each a tensor, a tuple or a dict of keyword inputs); ``model`` is restored.

    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(512, 512)
    ...     def forward(self, x):
    ...         return self.fc(x) if x.sum() > 0 else x
    >>> model = Gate()
    >>> regions, _ = find_regions(model, torch.ones(2, 512), FactorizeConfig())
    >>> plans = [_analyse_region(r, FactorizeConfig()) for r in regions]
    >>> batches = [torch.rand(8, 512), -torch.rand(3, 512)]  # the second skips fc
    >>> calibrate_regions(model, regions, plans, batches, progress=False)[0]["layer"].count
    8
    """
    _check_not_whole(regions)
    collectors = [
        MomentCollector(
            region.graph, calibratable_targets(region.graph, [r.target for r in plan.factorized])
        )
        for region, plan in zip(regions, plans, strict=True)
    ]
    originals = {region.name: model.get_submodule(region.name) for region in regions}
    for region, collector in zip(regions, collectors, strict=True):
        replace_submodule(model, region.name, _Collecting(region.graph, collector))
    seen = 0
    try:
        with torch.no_grad(), evaluation_mode(model):
            batches = calibration_batches(batches)
            for index, batch in enumerate(
                tqdm(batches, desc="calibrate", unit="batch", disable=not progress)
            ):
                try:
                    check_example_inputs(batch, "the batch")
                    run_model(model, batch)
                except Exception as error:
                    cause = error.__cause__ or error
                    raise CalibrationError(index, f"{type(cause).__name__}: {cause}") from error
                seen += 1
    finally:
        for name, module in originals.items():
            replace_submodule(model, name, module)
    if seen == 0:
        raise ValueError("calibration has no batches")
    return [collector.moments for collector in collectors]


def transform_regions(
    model: nn.Module,
    example_inputs: Any,
    config: FactorizeConfig,
    started: float | None = None,
    calibration: Any = None,
    optimizers: Any = None,
    original: nn.Module | None = None,
) -> nn.Module:
    """Factorize the traceable regions of ``model`` in place and return it with its report.

    With ``calibration``, statistics come from running the whole model on those batches; with
    ``optimizers`` (over ``original``'s parameters, ``original`` defaulting to ``model``), their
    param groups are updated as :func:`~fxfactorize.transform` does. Every region is solved before
    any is installed, so an error leaves ``model`` as it was. A layer module shared by several
    regions (or names) gets one replacement; its later records name the first (``shared_with``).
    The report (a :class:`~fxfactorize.report.PartialReport`) is ``model.meta["fxfactorize"]``;
    :func:`~fxfactorize.report.report_of` finds it on any result of ``transform``.

    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(512, 512)
    ...     def forward(self, x):
    ...         return self.fc(x) if x.sum() > 0 else x
    >>> model = transform_regions(Gate(), torch.ones(2, 512), FactorizeConfig(progress=False))
    >>> type(model.fc).__name__, model.meta["fxfactorize"].regions
    ('FactorizedLinear', ['fc'])
    """
    started = time.perf_counter() if started is None else started
    original = model if original is None else original
    tied = tied_layers(model)
    regions, untraced = find_regions(model, example_inputs, config)
    _check_not_whole(regions)
    plans = [_analyse_region(region, config, tied) for region in regions]
    moments: list[Any] = [None] * len(regions)
    if calibration is not None:
        moments = calibrate_regions(model, regions, plans, calibration, config.progress)
    records: list[LayerRecord] = []
    first_solved: dict[int, tuple[str, Solved]] = {}  # a layer shared by regions is solved once
    installs: dict[nn.Module, nn.Module] = {}
    replaced: dict[str, nn.Module] = {}
    for region, the_plan, stats in zip(regions, plans, moments, strict=True):
        gm = region.graph
        try:
            solved = solve_plan(gm, _unsolved(the_plan, gm, first_solved), stats, config.progress)
        except ValueError as error:
            raise ValueError(f"region {region.name!r}: {error}") from error
        shared_with = {}
        for record in the_plan.factorized:
            layer, name = gm.get_submodule(record.target), _qualify_target(record.target, region)
            if id(layer) in first_solved:
                shared_with[record.target], solved[record.target] = first_solved[id(layer)]
            else:
                first_solved[id(layer)] = (name, solved[record.target])
            if has_submodule(original, name):
                replaced[name] = original.get_submodule(name)
        for record in solved_records(the_plan, solved):
            record.shared_with = shared_with.get(record.target)
            records.append(_qualify(record, region))
        if solved:  # a region with nothing factorized keeps its original module
            region_module = model.get_submodule(region.name)
            rewrite(gm, {target: result.module for target, result in solved.items()})
            installs[region_module] = gm.layer if region.layer else gm
    warnings = [w for the_plan in plans for w in the_plan.warnings]
    warnings += [w for p, m in zip(plans, moments, strict=True) for w in calibration_warnings(m, p)]
    report = PartialReport(
        records,
        config,
        seconds=0.0,
        regions=[region.name for region in regions],
        untraced=untraced,
        warnings=warnings,
    )
    undo = install(model, installs)
    try:
        if optimizers is not None:
            update_optimizers(optimizers, original, model, replaced)
    except Exception:
        undo()  # all or nothing
        raise
    report.seconds = time.perf_counter() - started
    attach_report(model, report)
    publish(report, f" (partial tracing: {len(regions)} regions)")
    return model


def _unsolved(the_plan: Plan, gm: fx.GraphModule, first_solved: dict[int, Any]) -> Plan:
    """``the_plan`` without the layers whose module an earlier region already solved."""
    records = [
        dataclasses.replace(record, rank=None, reason="solved in an earlier region")
        if record.factorized and id(gm.get_submodule(record.target)) in first_solved
        else record
        for record in the_plan.layers
    ]
    return Plan(records, the_plan.config)
