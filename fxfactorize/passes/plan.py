"""Pass 4, plan: a rank or a reason to skip, for every Linear/Conv layer. Changes no weights."""

from __future__ import annotations

from torch import fx

from fxfactorize.config import FactorizeConfig, resolve_latent_size
from fxfactorize.methods import get_method
from fxfactorize.passes.cost import LAYER_META, LayerShape
from fxfactorize.report import LayerRecord, Plan

__all__ = ["plan_graph"]

_OP_NAMES = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}


def _layer_nodes(gm: fx.GraphModule) -> dict[str, tuple[fx.Node, LayerShape]]:
    """One entry per module target; a module called at several nodes adds up its positions."""
    layers: dict[str, tuple[fx.Node, LayerShape]] = {}
    for node in gm.graph.nodes:
        layer = node.meta.get(LAYER_META)
        if layer is None:
            continue
        if node.target in layers:
            first, seen = layers[node.target]
            merged = LayerShape(**{**seen.__dict__, "positions": seen.positions + layer.positions})
            layers[node.target] = (first, merged)
        else:
            layers[node.target] = (node, layer)
    return layers


def _decide(layer: LayerShape, config: FactorizeConfig) -> tuple[int | None, str | None]:
    """The rank for ``layer``, or ``None`` and the reason it stays as it is."""
    if layer.kind == "linear":
        enabled, min_size, latent, names = (
            config.linears,
            config.min_features,
            config.latent_features,
            ("linears", "min_features"),
        )
    else:
        enabled, min_size, latent, names = (
            config.convs,
            config.min_channels,
            config.latent_channels,
            ("convs", "min_channels"),
        )
    if not enabled:
        return None, f"{names[0]}=False"
    method = get_method(config.method)
    refused = method.accepts(layer)
    if refused:
        return None, refused
    if layer.groups > 1 and layer.in_features == layer.groups and layer.out_per_group == 1:
        return None, (
            f"depthwise conv (groups={layer.groups}): one input and one output channel per group, "
            "so no per-group pair is cheaper"
        )
    smallest = min(layer.in_features, layer.out_features)
    if smallest < min_size:
        return None, f"min(in, out)={smallest} < {names[1]}={min_size}"
    rank = resolve_latent_size(latent, layer.in_features, layer.out_features)
    if layer.groups > 1:  # each group gets rank // groups latent channels (at least one)
        rank = max(1, rank // layer.groups) * layer.groups
    if layer.latent is not None and rank >= layer.latent:
        return None, f"already factorized at rank {layer.latent}"
    macs_after, _ = method.cost(layer, rank)
    if macs_after >= layer.macs:
        return None, f"rank {rank} does not reduce MACs ({layer.macs} → {macs_after})"
    return rank, None


def plan_graph(gm: fx.GraphModule, config: FactorizeConfig) -> Plan:
    """Decide, for each annotated Linear/Conv node of ``gm``, the rank or why it is skipped.

    Needs the ``cost`` pass's annotations. Pure: ``gm`` is not changed.

    >>> import torch
    >>> from torch import nn
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> from fxfactorize.passes.cost import annotate_costs
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 10)))
    >>> gm = annotate_costs(propagate_shapes(gm, torch.ones(2, 512)))
    >>> [record.rank for record in plan_graph(gm, FactorizeConfig()).layers]
    [128, None]
    """
    method = get_method(config.method)
    records = []
    for target, (node, layer) in _layer_nodes(gm).items():
        rank, reason = _decide(layer, config)
        record = LayerRecord(
            node=node.name,
            target=str(target),
            op=_OP_NAMES.get(layer.kind, layer.kind),
            in_features=layer.in_features,
            out_features=layer.out_features,
            kernel=layer.kernel,
            groups=layer.groups,
            macs_before=layer.macs,
            params_before=layer.params,
            rank=rank,
            reason=reason,
            method=config.method,
        )
        if rank is not None:
            record.macs_after, record.params_after = method.cost(layer, rank)
        records.append(record)
    return Plan(records, config)
