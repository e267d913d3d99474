"""Pass 4, plan: a rank or a reason to skip, for every Linear/Conv layer. Changes no weights."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import fx

from fxfactorize.config import FactorizeConfig, resolve_latent_size
from fxfactorize.core.moments import InputMoments
from fxfactorize.costmodels import CostModel, LayerSite, get_cost_model
from fxfactorize.methods import get_method
from fxfactorize.passes.cost import LAYER_META, LayerShape
from fxfactorize.policies import (
    BudgetItem,
    allocate_budget,
    candidate_ranks,
    module_error_curve,
    rank_for_tolerance,
    rank_step,
)
from fxfactorize.report import LayerRecord, Plan

__all__ = ["candidate_targets", "method_for", "plan_graph"]

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


def method_for(layer: LayerShape, config: FactorizeConfig) -> str:
    """The method for ``layer``: ``config.method`` for Linear nodes; convs keep ``'lowrank'``.

    >>> method_for(LayerShape("conv2d", 8, 8, (3, 3), 1, 1, False), FactorizeConfig(method="tt"))
    'lowrank'
    """
    return config.method if layer.kind == "linear" else "lowrank"


def _skip_reason(layer: LayerShape, config: FactorizeConfig) -> str | None:
    """Why ``layer`` is not considered at all (disabled, too narrow, unsupported), or ``None``."""
    if layer.kind == "linear":
        enabled, min_size, names = (
            config.linears,
            config.min_features,
            ("linears", "min_features"),
        )
    else:
        enabled, min_size, names = (
            config.convs,
            config.min_channels,
            ("convs", "min_channels"),
        )
    if not enabled:
        return f"{names[0]}=False"
    refused = get_method(method_for(layer, config)).accepts(layer)
    if refused:
        return refused
    if layer.groups > 1 and layer.in_features == layer.groups and layer.out_per_group == 1:
        return (
            f"depthwise conv (groups={layer.groups}): one input and one output channel per group, "
            "so no per-group pair is cheaper"
        )
    smallest = min(layer.in_features, layer.out_features)
    if smallest < min_size:
        return f"min(in, out)={smallest} < {names[1]}={min_size}"
    return None


def _fixed_rank(layer: LayerShape, config: FactorizeConfig) -> int:
    """The rank ``latent_features`` / ``latent_channels`` gives ``layer`` (Composer's policy)."""
    latent = config.latent_features if layer.kind == "linear" else config.latent_channels
    return resolve_latent_size(latent, layer.in_features, layer.out_features)


def _decide(
    layer: LayerShape, config: FactorizeConfig, rank: int | None = None
) -> tuple[int | None, str | None]:
    """The rank for ``layer`` (``rank`` if given, else the fixed policy's), or ``None`` and why not."""
    reason = _skip_reason(layer, config)
    if reason:
        return None, reason
    method = get_method(method_for(layer, config))
    rank = _fixed_rank(layer, config) if rank is None else rank
    if layer.groups > 1:  # each group gets rank // groups latent channels (at least one)
        rank = max(1, rank // layer.groups) * layer.groups
    if layer.latent is not None and rank >= layer.latent:
        return None, f"already factorized at rank {layer.latent}"
    macs_after, _ = method.cost(layer, rank)
    if macs_after >= layer.macs:
        return None, f"rank {rank} does not reduce MACs ({layer.macs} → {macs_after})"
    return rank, None


def _site(gm: fx.GraphModule, node: fx.Node, layer: LayerShape) -> LayerSite:
    """Where ``node``'s layer runs: module, input shape, dtype and device, for the cost model."""
    module = gm.get_submodule(node.target)
    source = node.args[0] if node.args else None
    meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    shape = tuple(meta.shape) if getattr(meta, "shape", None) is not None else None
    weight = next(module.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = str(weight.device) if weight is not None else "cpu"
    return LayerSite(layer, module, shape, dtype, device)


def _too_slow(site: LayerSite, rank: int, cost_model: CostModel) -> str | None:
    """The reason a pair at ``rank`` is not worth it by the cost model, or ``None``."""
    before, after = cost_model.cost(site, None), cost_model.cost(site, rank)
    if site.layer.latent is not None and after <= before:
        return None  # lowering an existing pair's rank: the margin guards against the original only
    if cost_model.pays(site, rank):
        return None
    noise = getattr(cost_model, "noise", 0.0)
    if noise and after <= (1.0 - cost_model.margin) * before:  # pays as measured, not robustly
        return (
            f"{cost_model.name} cost model: rank {rank} is predicted {1 - after / before:.0%} "
            f"cheaper ({before:.3g} → {after:.3g} {cost_model.unit}), but within the noise band "
            f"of the {cost_model.margin:.0%} margin (measured numbers ±{noise:.0%}): kept dense"
        )
    return (
        f"{cost_model.name} cost model: rank {rank} is not cheaper by "
        f"{cost_model.margin:.0%} ({before:.3g} → {after:.3g} {cost_model.unit})"
    )


def _round_rank(site: LayerSite, rank: int, config: FactorizeConfig, cost_model: CostModel) -> int:
    """``rank`` rounded up to a multiple of ``rank_multiple`` when that is predicted no costlier."""
    multiple = config.rank_multiple
    rounded = min(math.ceil(rank / multiple) * multiple, site.layer.max_rank)
    if rounded > rank and cost_model.cost(site, rounded) <= cost_model.cost(site, rank):
        return rounded
    return rank


def _error_curve(
    target: str, site: LayerSite, node: fx.Node, moments: Mapping[str, InputMoments] | None
) -> torch.Tensor:
    """The layer's predicted nmse per rank; ``ValueError`` naming the node for non-finite weights."""
    if not all(torch.isfinite(p).all() for p in site.module.parameters()):
        raise ValueError(
            f"graph node {node.name!r} ({target}) has NaN or Inf weights: cannot predict its errors"
        )
    return module_error_curve(site.module, None if moments is None else moments.get(target))


def _policy_ranks(
    gm: fx.GraphModule,
    entries: list[tuple[str, LayerSite, str | None]],
    config: FactorizeConfig,
    cost_model: CostModel,
    moments: Mapping[str, InputMoments] | None,
) -> tuple[dict[str, int | None], dict[str, str]]:
    """The rank the tolerance or budget policy gives each considered layer (``None``: keep it),
    and why each kept layer is kept."""
    nodes = {target: node for target, (node, _) in _layer_nodes(gm).items()}
    considered = [
        (target, site)
        for target, site, reason in entries
        if reason is None and method_for(site.layer, config) == "lowrank"
    ]
    curves = {
        target: _error_curve(target, site, nodes[target], moments) for target, site in considered
    }
    if config.tolerance is not None:
        ranks = {
            target: rank_for_tolerance(curves[target], config.tolerance) for target, _ in considered
        }
        return ranks, {}
    items, reasons = [], {}
    for target, site in considered:
        errors = curves[target]
        ranks = candidate_ranks(
            site.layer.max_rank,
            lambda rank, site=site: cost_model.pays(site, rank),
            config.rank_multiple,
        )
        items.append(
            BudgetItem(
                target,
                ranks,
                [float(errors[min(rank, errors.numel() - 1)]) for rank in ranks],
                [cost_model.cost(site, rank) for rank in ranks],
                cost_model.cost(site, None),
            )
        )
        step = rank_step(site.layer.max_rank, config.rank_multiple)
        why = _too_slow(site, step, cost_model) if step < site.layer.max_rank else None
        reasons[target] = (
            f"budget={config.budget}: kept; no rank on its grid pays: {why}"
            if not ranks
            else f"budget={config.budget}: kept (the budget allows the original)"
        )
    total = sum(cost_model.cost(site, None) for _, site, _ in entries)
    fixed = total - sum(item.original_cost for item in items)  # layers outside the allocation
    return allocate_budget(items, config.budget * total - fixed), reasons


def _budget_warning(
    records: list[LayerRecord],
    sites: Mapping[str, LayerSite],
    config: FactorizeConfig,
    cost_model: CostModel,
) -> str | None:
    """What to tell the user when the planned layers cost more than ``config.budget`` allows."""
    if config.budget is None:
        return None
    before = sum(cost_model.cost(sites[r.target], None) for r in records)
    after = sum(
        cost_model.cost(sites[r.target], r.rank if r.method == "lowrank" else None) for r in records
    )
    if before <= 0 or after <= config.budget * before * (1 + 1e-9):
        return None
    return (
        f"budget={config.budget} cannot be met: the cheapest plan costs {after / before:.4g}× the "
        f"original ({cost_model.name} cost model); the smallest candidate ranks are used"
    )


def candidate_targets(
    gm: fx.GraphModule, config: FactorizeConfig, tied: Mapping[str, str] | None = None
) -> list[str]:
    """Targets of the layers ``config`` considers at all (before any rank or cost decision).

    Calibration-aware policies (``tolerance``/``budget``) calibrate these before planning.
    """
    tied = tied or {}
    return [
        str(target)
        for target, (_, layer) in _layer_nodes(gm).items()
        if target not in tied and _skip_reason(layer, config) is None
    ]


def plan_graph(
    gm: fx.GraphModule,
    config: FactorizeConfig,
    *,
    moments: Mapping[str, InputMoments] | None = None,
    tied: Mapping[str, str] | None = None,
) -> Plan:
    """Decide, for each annotated Linear/Conv node of ``gm``, the rank or why it is skipped.

    Needs the ``cost`` pass's annotations. Pure: ``gm`` is not changed. The rank comes from
    ``config``'s policy (fixed ``latent_*``, ``tolerance`` or ``budget``); ``moments``
    (``{target: InputMoments}``) makes the tolerance/budget error predictions data-aware. A layer
    is kept when ``config.cost_model`` does not predict the pair cheaper, and so is a layer named
    in ``tied`` (``{target: reason}``, see :func:`fxfactorize.sharing.tied_layers`): replacing it
    would untie a parameter it shares with another module. A budget that cannot be met is
    listed in the plan's ``warnings``.

    >>> import torch
    >>> from torch import nn
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> from fxfactorize.passes.cost import annotate_costs
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 10)))
    >>> gm = annotate_costs(propagate_shapes(gm, torch.ones(2, 512)))
    >>> [record.rank for record in plan_graph(gm, FactorizeConfig()).layers]
    [128, None]
    """
    get_method(config.method)  # an unknown method is an error even if no Linear uses it
    cost_model = get_cost_model(config.cost_model)
    layers = _layer_nodes(gm)
    tied = tied or {}
    entries = [
        (target, _site(gm, node, layer), tied.get(target) or _skip_reason(layer, config))
        for target, (node, layer) in layers.items()
    ]
    policy: dict[str, int | None] = {}
    kept: dict[str, str] = {}
    if config.tolerance is not None or config.budget is not None:
        policy, kept = _policy_ranks(gm, entries, config, cost_model, moments)
    records = []
    for target, site, _ in entries:
        node, layer = layers[target]
        if policy.get(target, 0) is None:
            rank, reason = None, kept[target]
        elif target in tied:
            rank, reason = None, tied[target]
        else:
            rank, reason = _decide(layer, config, policy.get(target))
        lowrank = method_for(layer, config) == "lowrank"  # cost models/policies model a pair
        if lowrank and rank is not None and not (config.budget is not None and target in policy):
            rank = _round_rank(site, rank, config, cost_model)
            reason = _too_slow(site, rank, cost_model)
            rank = None if reason else rank
        method = get_method(method_for(layer, config))
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
            method=method.name,
        )
        if rank is not None:
            record.macs_after, record.params_after = method.cost(layer, rank)
            if hasattr(method, "detail"):
                record.detail = method.detail(layer, rank)
        records.append(record)
    sites = {target: site for target, site, _ in entries}
    warning = _budget_warning(records, sites, config, cost_model)
    return Plan(records, config, [warning] if warning else [])
