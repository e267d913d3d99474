"""Pass 1b, functional layers: ``F.linear`` / ``F.conv*`` / ``matmul`` calls on parameters → modules.

Graphs captured from functional code (hand-written functional models, Dynamo/``torch.export``-style
graphs) apply a weight held as a parameter with a ``call_function`` node. Each such call whose
weight (and bias) is a ``get_attr`` parameter becomes a ``call_module`` of an ordinary
``nn.Linear`` / ``nn.Conv*d`` holding that parameter, so the later passes plan and factorize it like
any layer. A parameter used by anything else is left alone (factorizing it would not remove it).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["convert_functional_layers"]

log = logging.getLogger("fxfactorize")

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_LINEARS = {F.linear, torch._C._nn.linear}
_MATMULS = {torch.matmul, operator.matmul}


def _arguments(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))  # trailing args may be defaulted
    values.update(node.kwargs)
    return values


def _parameter(gm: fx.GraphModule, value: Any) -> nn.Parameter | None:
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    found = _fetch(gm, value.target)
    return found if isinstance(found, nn.Parameter) else None


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, field = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, field, None)


def _build(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module, tuple] | None:
    """``(input node, module, key)`` for a convertible call, else ``None``."""
    if node.op != "call_function":
        return None
    if node.target in _LINEARS:
        args = _arguments(node, ("input", "weight", "bias"), {"bias": None})
        weight, bias = _parameter(gm, args["weight"]), args["bias"]
        if weight is None or weight.dim() != 2:
            return None
        if bias is not None and _parameter(gm, bias) is None:
            return None
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        module.weight = weight
        if bias is not None:
            module.bias = _parameter(gm, bias)
        key = ("linear", args["weight"].target, getattr(bias, "target", None))
        return args["input"], module, key
    if node.target in _MATMULS and len(node.args) == 2 and not node.kwargs:
        source, weight_node = node.args
        weight = _parameter(gm, weight_node)
        if weight is None or weight.dim() != 2:  # x @ W with W [in, out] is Linear with W.T
            return None
        module = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
        module.weight = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
        return source, module, ("matmul", weight_node.target)
    if node.target in _CONVS:
        args = _arguments(node, _CONV_ARGS, _CONV_DEFAULTS)
        weight, bias = _parameter(gm, args["weight"]), args["bias"]
        settings = [args[name] for name in ("stride", "padding", "dilation", "groups")]
        if weight is None or any(isinstance(v, fx.Node) for v in settings):
            return None
        if bias is not None and _parameter(gm, bias) is None:
            return None
        stride, padding, dilation, groups = settings
        module = _CONVS[node.target](
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
        module.weight = weight
        if bias is not None:
            module.bias = _parameter(gm, bias)
        key = (node.target.__name__, args["weight"].target, getattr(bias, "target", None))
        return args["input"], module, (*key, *map(str, settings))
    return None


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    name, suffix = base.replace(".", "_"), 1
    candidate = name
    while hasattr(gm, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate


def _targets(added: dict[tuple, str]) -> set[str]:
    return {target for key in added for target in key[1:3] if isinstance(target, str)}


def convert_functional_layers(gm: fx.GraphModule) -> list[str]:
    """Turn functional linear/conv/matmul calls on parameters into module calls, in place.

    Returns the names of the modules added to ``gm``; parameters no longer used by the graph are
    removed from ``gm`` (they now live in the new modules).

    >>> class Functional(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(8, 4))
    ...         self.v = nn.Parameter(torch.randn(4, 8))
    ...     def forward(self, x):
    ...         return F.linear(x, self.w) + x @ self.v
    >>> gm = fx.symbolic_trace(Functional())
    >>> convert_functional_layers(gm), [n.op for n in gm.graph.nodes]
    (['w_linear', 'v_matmul'], ['placeholder', 'call_module', 'call_module', 'call_function', 'output'])
    >>> sorted(name for name, _ in gm.named_parameters())
    ['v_matmul.weight', 'w_linear.weight']
    """
    found = [(node, _build(gm, node)) for node in gm.graph.nodes]
    found = [(node, built) for node, built in found if built is not None]
    converted_weights = {built[2][1] for _, built in found}
    # a parameter also read by nodes that are not converted calls must stay where it is
    blocked = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in converted_weights:
            converted = {n for n, _ in found}
            if any(user not in converted for user in node.users):
                blocked.add(node.target)
    added: dict[tuple, str] = {}
    for node, (source, module, key) in found:
        if key[1] in blocked:
            log.debug("functional %s on %s kept: the parameter has other uses", key[0], key[1])
            continue
        if key not in added:
            added[key] = _fresh_name(gm, f"{key[1]}_{key[0]}")
            gm.add_submodule(added[key], module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(added[key], (source,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):  # only our orphans: dead-code elimination would drop asserts
        if node.op == "get_attr" and not node.users and node.target in _targets(added):
            gm.graph.erase_node(node)
    still_used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for key in added:
        for target in key[1:3]:
            if target is not None and target not in still_used and _fetch(gm, target) is not None:
                owner, _, field = target.rpartition(".")
                delattr(gm.get_submodule(owner) if owner else gm, field)
    gm.recompile()
    if added:
        log.debug("functional layers turned into modules: %s", ", ".join(added.values()))
    return list(added.values())
