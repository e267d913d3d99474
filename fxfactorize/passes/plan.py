"""Pass 4, plan: a rank or a reason to skip, for every Linear/Conv layer. Changes no weights."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import fx, nn

from fxfactorize.config import FactorizeConfig, resolve_latent_size
from fxfactorize.core.moments import InputMoments
from fxfactorize.costmodels import CostModel, LayerSite, RooflineCostModel, get_cost_model
from fxfactorize.layers import OP_NAMES, LayerShape
from fxfactorize.methods import AUTO_METHOD, CONV_STRUCTURES, DEFAULT_METHOD, get_method
from fxfactorize.passes.auto import (
    Candidate,
    auto_applies,
    choose_at_cost,
    choose_for_tolerance,
    conv_candidates,
    pareto,
    structure_cost,
)
from fxfactorize.passes.cost import LAYER_META
from fxfactorize.policies import (
    BudgetItem,
    allocate_budget,
    candidate_ranks,
    module_error_curve,
    rank_for_tolerance,
    rank_step,
)
from fxfactorize.report import LayerRecord, Plan

__all__ = [
    "LayerEntry",
    "candidate_targets",
    "layer_entries",
    "method_for",
    "plan_graph",
    "plan_layers",
]


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
    """The method for ``layer``: ``config.method`` if it handles the layer's kind, else the
    default (a tensorized format takes Linear nodes; convs keep the rank-r pair). Under
    ``"auto"`` it is the pair, the base the planner compares the other structures with.

    >>> method_for(LayerShape("conv2d", 8, 8, (3, 3), 1, 1, False), FactorizeConfig(method="tt"))
    'lowrank'
    """
    if config.method == AUTO_METHOD:
        return DEFAULT_METHOD
    chosen = get_method(config.method)
    return chosen.name if layer.kind in chosen.kinds else DEFAULT_METHOD


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


def _site(
    gm: fx.GraphModule, node: fx.Node, layer: LayerShape, config: FactorizeConfig
) -> LayerSite:
    """Where ``node``'s layer runs: module, input shape, dtype, device and how to build its pair,
    for the cost model."""
    module = gm.get_submodule(node.target)
    method = get_method(method_for(layer, config))
    has_bias = getattr(module, "bias", None) is not None

    def build(rank: int) -> nn.Module:
        return method.rebuild(module, layer, {"rank": rank, "bias": has_bias})

    source = node.args[0] if node.args else None
    meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    shape = tuple(meta.shape) if getattr(meta, "shape", None) is not None else None
    weight = next(module.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = str(weight.device) if weight is not None else "cpu"
    return LayerSite(layer, module, shape, dtype, device, build if method.is_pair else None)


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


def _check_finite(entry: LayerEntry) -> None:
    """``ValueError`` naming the node when the layer's weights are not finite."""
    if not all(torch.isfinite(p).all() for p in entry.site.module.parameters()):
        raise ValueError(
            f"graph node {entry.node!r} ({entry.target}) has NaN or Inf weights: cannot predict "
            "its errors"
        )


def _error_curve(entry: LayerEntry, moments: Mapping[str, InputMoments] | None) -> torch.Tensor:
    """The layer's predicted nmse per rank; ``ValueError`` naming the node for non-finite weights."""
    _check_finite(entry)
    return module_error_curve(
        entry.site.module, None if moments is None else moments.get(entry.target)
    )


def _candidates(
    entry: LayerEntry,
    config: FactorizeConfig,
    cost_model: CostModel,
    moments: Mapping[str, InputMoments] | None,
    weights: Mapping[str, float] | None,
) -> list[Candidate]:
    """Every (structure, rank) of an ``"auto"`` conv that pays (see :mod:`fxfactorize.passes.auto`)."""
    _check_finite(entry)
    return conv_candidates(
        entry.site,
        entry.site.module,
        cost_model,
        None if moments is None else moments.get(entry.target),
        (weights or {}).get(entry.target, 1.0),
        config.rank_multiple,
    )


def _auto_policy(
    entries: list[LayerEntry],
    config: FactorizeConfig,
    cost_model: CostModel,
    moments: Mapping[str, InputMoments] | None,
    weights: Mapping[str, float] | None,
) -> tuple[dict[str, tuple[str, int] | None], list[BudgetItem], dict[str, str]]:
    """Under ``"auto"``: the tolerance policy's choice per conv, or (budget) one
    :class:`BudgetItem` per conv whose options are its Pareto frontier of (structure, rank)."""
    chosen: dict[str, tuple[str, int] | None] = {}
    items, reasons = [], {}
    for entry in entries:
        frontier = pareto(_candidates(entry, config, cost_model, moments, weights))
        if config.tolerance is not None:
            pick = choose_for_tolerance(frontier, config.tolerance)
            chosen[entry.target] = None if pick is None else (pick.method, pick.rank)
            continue
        original = cost_model.cost(entry.site, None)
        options = [(c.method, c.rank) for c in frontier]
        errors, costs = [c.error for c in frontier], [c.cost for c in frontier]
        items.append(BudgetItem(entry.target, options, errors, costs, original))
        reasons[entry.target] = (
            f"budget={config.budget}: kept (the budget allows the original)"
            if frontier
            else f"budget={config.budget}: kept; no structure and rank pays"
        )
    return chosen, items, reasons


def _policy_ranks(
    entries: list[LayerEntry],
    config: FactorizeConfig,
    cost_model: CostModel,
    moments: Mapping[str, InputMoments] | None,
    weights: Mapping[str, float] | None = None,
) -> tuple[dict[str, int | None], dict[str, str]]:
    """The rank the tolerance or budget policy gives each considered layer (``None``: keep it),
    and why each kept layer is kept. ``weights`` scale each layer's predicted nmse (what it
    costs the model's output, see :mod:`fxfactorize.passes.sensitivity`). Under ``"auto"`` a
    conv's value is ``(structure, rank)``."""
    automatic = [e for e in entries if e.skip is None and auto_applies(config.method, e.site)]
    considered = [
        entry
        for entry in entries
        if entry.skip is None
        and get_method(method_for(entry.site.layer, config)).is_pair
        and entry not in automatic
    ]
    chosen, auto_items, auto_reasons = _auto_policy(automatic, config, cost_model, moments, weights)
    weights = weights or {}
    curves = {
        entry.target: _error_curve(entry, moments) * weights.get(entry.target, 1.0)
        for entry in considered
    }
    if config.tolerance is not None:
        ranks = {
            e.target: rank_for_tolerance(curves[e.target], config.tolerance) for e in considered
        }
        return {**ranks, **chosen}, {}
    items, reasons = list(auto_items), dict(auto_reasons)
    for entry in considered:
        site, errors = entry.site, curves[entry.target]
        ranks = candidate_ranks(
            site.layer.max_rank,
            lambda rank, site=site: cost_model.pays(site, rank),
            config.rank_multiple,
        )
        items.append(
            BudgetItem(
                entry.target,
                ranks,
                [float(errors[min(rank, errors.numel() - 1)]) for rank in ranks],
                [cost_model.cost(site, rank) for rank in ranks],
                cost_model.cost(site, None),
            )
        )
        step = rank_step(site.layer.max_rank, config.rank_multiple)
        why = _too_slow(site, step, cost_model) if step < site.layer.max_rank else None
        reasons[entry.target] = (
            f"budget={config.budget}: kept; no rank on its grid pays: {why}"
            if not ranks
            else f"budget={config.budget}: kept (the budget allows the original)"
        )
    total = sum(cost_model.cost(entry.site, None) for entry in entries)
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
    after = sum(_planned_cost(sites[r.target], r, cost_model) for r in records)
    if before <= 0 or after <= config.budget * before * (1 + 1e-9):
        return None
    small = [
        r.target
        for r in records
        if r.rank is None and r.reason and re.search(r"< min_(channels|features)=", r.reason)
    ]
    hint = (
        f"; {len(small)} layer(s) below min_channels/min_features were not candidates "
        f"(e.g. {small[0]}): lower those to let them share the budget"
        if small
        else ""
    )
    return (
        f"budget={config.budget} cannot be met: the cheapest plan costs {after / before:.4g}× the "
        f"original ({cost_model.name} cost model); the smallest candidate ranks are used{hint}"
    )


def _planned_cost(site: LayerSite, record: LayerRecord, cost_model: CostModel) -> float:
    """What ``record``'s decision costs by ``cost_model`` (a method it cannot price: the original's)."""
    if record.rank is not None and record.method in CONV_STRUCTURES:
        return structure_cost(site, record.method, record.rank, cost_model)
    return cost_model.cost(site, record.rank if get_method(record.method).is_pair else None)


def _latency_ratio(site: LayerSite, record: LayerRecord, cost_model: CostModel) -> float | None:
    """``record``'s predicted seconds as planned ÷ as it is, by ``cost_model`` (in seconds);
    ``None`` for a layer left alone. A method the cost model cannot price (a tensorized format)
    gets its MAC ratio."""
    if record.rank is None:
        return None
    if record.method not in CONV_STRUCTURES and not get_method(record.method).is_pair:
        return record.macs_after / record.macs_before if record.macs_before else 1.0
    before = cost_model.cost(site, None)
    return _planned_cost(site, record, cost_model) / before if before > 0 else 1.0


@dataclasses.dataclass
class LayerEntry:
    """One Linear/Conv layer to plan: its name in the model (``target``, ``node``), its name in
    the graph it was traced in (``local``), where it runs, and why it is never factorized
    (``skip``: disabled, too narrow, tied, ... or ``None``)."""

    target: str
    node: str
    local: str
    site: LayerSite
    skip: str | None


def layer_entries(
    gm: fx.GraphModule,
    config: FactorizeConfig,
    tied: Mapping[str, str] | None = None,
    qualify: Callable[[str], str] = str,
) -> list[LayerEntry]:
    """The :class:`LayerEntry` of every annotated Linear/Conv of ``gm`` (one per module target),
    with targets and node names made model names by ``qualify`` (identity for a whole traced
    model); ``tied`` maps model names to the reason a layer must stay (see :func:`fxfactorize.sharing.tied_layers`).

    >>> import torch
    >>> from torch import nn
    >>> from fxfactorize.passes.cost import annotate_costs
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 10)))
    >>> gm = annotate_costs(propagate_shapes(gm, torch.ones(2, 512)))
    >>> [(e.target, e.skip) for e in layer_entries(gm, FactorizeConfig(), qualify=lambda t: f"body.{t}")]
    [('body.0', None), ('body.1', 'min(in, out)=10 < min_features=256')]
    """
    tied = tied or {}
    entries = []
    for local, (node, layer) in _layer_nodes(gm).items():
        target = qualify(str(local))
        skip = tied.get(target) or _skip_reason(layer, config)
        site = _site(gm, node, layer, config)
        entries.append(LayerEntry(target, qualify(node.name), str(local), site, skip))
    return entries


def candidate_targets(
    gm: fx.GraphModule | list[LayerEntry],
    config: FactorizeConfig,
    tied: Mapping[str, str] | None = None,
) -> list[str]:
    """Targets of the layers ``config`` considers at all (before any rank or cost decision), of a
    graph or of :func:`layer_entries`. Calibration-aware policies (``tolerance``/``budget``)
    calibrate these before planning.
    """
    entries = gm if isinstance(gm, list) else layer_entries(gm, config, tied)
    return [entry.target for entry in entries if entry.skip is None]


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
    listed in the plan's ``warnings``. (:func:`plan_layers` plans layers of several graphs at once.)

    >>> import torch
    >>> from torch import nn
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> from fxfactorize.passes.cost import annotate_costs
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 10)))
    >>> gm = annotate_costs(propagate_shapes(gm, torch.ones(2, 512)))
    >>> [record.rank for record in plan_graph(gm, FactorizeConfig()).layers]
    [128, None]
    """
    return plan_layers(layer_entries(gm, config, tied), config, moments=moments)


def plan_layers(
    entries: list[LayerEntry],
    config: FactorizeConfig,
    *,
    moments: Mapping[str, InputMoments] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Plan:
    """The plan of ``entries`` (from one graph or several): as :func:`plan_graph`, with a budget
    shared by all of them. ``moments`` are keyed by the entries' targets; ``weights`` (same
    keys) scale each layer's predicted nmse in the tolerance/budget policies.
    """
    if config.method != AUTO_METHOD:
        get_method(config.method)  # an unknown method is an error even if no Linear uses it
    cost_model = get_cost_model(config.cost_model)
    policy: dict[str, int | tuple[str, int] | None] = {}
    kept: dict[str, str] = {}
    if config.tolerance is not None or config.budget is not None:
        policy, kept = _policy_ranks(entries, config, cost_model, moments, weights)
    records = [
        _record(entry, config, cost_model, policy, kept, moments, weights) for entry in entries
    ]
    sites = {entry.target: entry.site for entry in entries}
    timing_model = cost_model if cost_model.unit == "s" else RooflineCostModel()
    for record in records:
        record.latency_ratio = _latency_ratio(sites[record.target], record, timing_model)
    warning = _budget_warning(records, sites, config, cost_model)
    return Plan(records, config, [warning] if warning else [])


def _record(
    entry: LayerEntry,
    config: FactorizeConfig,
    cost_model: CostModel,
    policy: Mapping[str, int | tuple[str, int] | None],
    kept: Mapping[str, str],
    moments: Mapping[str, InputMoments] | None = None,
    weights: Mapping[str, float] | None = None,
) -> LayerRecord:
    """The plan's decision for one layer (``kept``: why the policy keeps a layer it gave no rank)."""
    site, layer, target = entry.site, entry.site.layer, entry.target
    method = get_method(method_for(layer, config))
    decided = policy.get(target, 0)
    if entry.skip is not None:
        rank, reason = None, entry.skip
    elif decided is None:
        rank, reason = None, kept.get(target, "no structure and rank is predicted to pay")
    elif isinstance(decided, tuple):  # "auto": the policy chose the structure too
        method, rank, reason = get_method(decided[0]), decided[1], None
    else:
        rank, reason = _decide(layer, config, policy.get(target))
    budgeted = config.budget is not None and target in policy  # the allocation priced it already
    if method.is_pair and rank is not None and not budgeted and not isinstance(decided, tuple):
        rank = _round_rank(site, rank, config, cost_model)
        reason = _too_slow(site, rank, cost_model)
        rank = None if reason else rank
        if rank is not None and target not in policy and auto_applies(config.method, site):
            method, rank = _auto_at_cost(entry, rank, config, cost_model, moments, weights)
    record = LayerRecord(
        node=entry.node,
        target=target,
        op=OP_NAMES.get(layer.kind, layer.kind),
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
        record.detail = method.detail(layer, rank)
    return record


def _auto_at_cost(
    entry: LayerEntry,
    rank: int,
    config: FactorizeConfig,
    cost_model: CostModel,
    moments: Mapping[str, InputMoments] | None,
    weights: Mapping[str, float] | None,
):
    """Under ``"auto"`` with the fixed policy: the (method, rank) of lowest predicted error that
    costs no more than the pair at the fixed ``rank``."""
    allowed = cost_model.cost(entry.site, rank)
    candidates = _candidates(entry, config, cost_model, moments, weights)
    curve = _error_curve(entry, moments) * (weights or {}).get(entry.target, 1.0)
    own = Candidate(DEFAULT_METHOD, rank, allowed, float(curve[min(rank, curve.numel() - 1)]))
    pick = choose_at_cost([own, *candidates], allowed) or own
    return get_method(pick.method), pick.rank
