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
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from fxfactorize.calling import call_model, evaluation_mode
from fxfactorize.config import FactorizeConfig
from fxfactorize.errors import TraceError
from fxfactorize.layers import PLAIN_LAYERS
from fxfactorize.passes.trace import DEFAULT_LEAF_MODULES, FactorizeTracer, trace
from fxfactorize.report import UntracedModule, report_of

__all__ = ["Region", "find_regions", "regions_of", "report_of", "run_model"]

log = logging.getLogger("fxfactorize")

_TORCH_LEAVES = FactorizeTracer()  # only its is_leaf_module is used: torch.fx's own leaf rule


@dataclasses.dataclass
class Region:
    """A traced part of the model: ``name`` (qualified; ``""`` is the whole model), its
    GraphModule and the inputs the model called it with (the example inputs for the whole model).

    ``layer`` is true when the region is a bare Linear/Conv (traced through a one-call wrapper;
    the factorized layer itself replaces it).

    >>> region = Region("body", fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2))), {})
    >>> region.qualify("0"), Region("", region.graph, {}).qualify("0")
    ('body.0', '0')
    """

    name: str
    graph: fx.GraphModule
    inputs: Any
    layer: bool = False

    def qualify(self, local: str) -> str:
        """The model's name for ``local``, a target or node name of this region's graph."""
        if self.layer:  # the wrapper's one layer is the region itself
            return self.name
        return f"{self.name}.{local}" if self.name else local


class _OneLayer(nn.Module):
    """Wrapper that lets a bare layer be traced as a one-node graph."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.layer(input)


run_model = call_model  # the old name of fxfactorize.calling.call_model


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
            call_model(model, example_inputs)
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


def regions_of(
    model: nn.Module, example_inputs: Any, config: FactorizeConfig
) -> tuple[list[Region], list[UntracedModule] | None]:
    """The model as one region (``""``) when its root traces, else (``on_untraceable="descend"``)
    its largest traceable submodules and the modules that did not trace (``None`` for a whole
    model). ``on_untraceable="raise"`` raises the :class:`~fxfactorize.errors.TraceError`.

    >>> [r.name for r in regions_of(nn.Sequential(nn.Linear(4, 4)), torch.ones(1, 4), FactorizeConfig())[0]]
    ['']
    """
    try:
        return [Region("", trace(model, config.leaf_modules), example_inputs)], None
    except TraceError:
        if config.on_untraceable == "raise":
            raise
    regions, untraced = find_regions(model, example_inputs, config)
    root = [region for region in regions if region.name == ""]
    return (root, None) if root else (regions, untraced)  # traced whole with constant inputs
