"""Module surgery: replace submodules by class and keep optimizers in step (Composer's helpers).

Same names, arguments and behaviour as ``composer.utils.module_surgery``: replacements are made
in place, and an optimizer given along has the replaced modules' parameters swapped for the new
ones in the same parameter group.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "ReplacementFunction",
    "count_module_instances",
    "replace_module_classes",
    "replace_params_in_optimizer",
    "update_params_in_optimizer",
]

ReplacementFunction = Callable[[nn.Module, int], nn.Module | None]
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def _one_optimizer(optimizers: Optimizers | None) -> torch.optim.Optimizer | None:
    if optimizers is None:
        return None
    if isinstance(optimizers, torch.optim.Optimizer):
        return optimizers
    optimizers = list(optimizers)
    if len(optimizers) > 1:
        raise NotImplementedError("surgery with more than one optimizer is not supported")
    return optimizers[0] if optimizers else None


def count_module_instances(
    module: nn.Module, module_class: type[nn.Module] | tuple[type[nn.Module], ...]
) -> int:
    """How many submodules of ``module`` (itself included) are instances of ``module_class``.

    >>> module = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 64), nn.ReLU())
    >>> count_module_instances(module, nn.Linear), count_module_instances(module, (nn.Linear, nn.ReLU))
    (2, 3)
    """
    return sum(isinstance(child, module_class) for child in module.modules())


def replace_module_classes(
    module: nn.Module,
    policies: Mapping[type[nn.Module], ReplacementFunction],
    optimizers: Optimizers | None = None,
    recurse_on_replacements: bool = False,
    indices: dict[type[nn.Module], int] | None = None,
) -> dict[nn.Module, nn.Module]:
    """Replace, in place, each submodule whose class has a policy by what the policy returns.

    A policy is called as ``policy(child, index)`` (``index``: how many instances of that class
    were seen so far) and returns the replacement or ``None`` to keep the child. Policies are
    tried in mapping order. With ``recurse_on_replacements`` the policies are applied again to
    each replacement. A module reachable under several names (two parents, or an alias such as
    ``self.b = self.a``) is offered to the policies once and its replacement set under every name,
    so sharing is kept. Parameters of replaced modules are swapped for the new ones in
    ``optimizers`` (see :func:`update_params_in_optimizer`). Returns ``{old: new}`` for every
    replacement made, intermediate ones included. ``module`` itself is never replaced.

    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    >>> done = replace_module_classes(model, {nn.Linear: lambda m, i: nn.Linear(16, 8)})
    >>> model[0].out_features, len(done)
    (8, 1)
    """
    if indices is None:
        indices = collections.defaultdict(int)
    replaced: dict[nn.Module, nn.Module] = {}
    _replace_children(module, policies, recurse_on_replacements, indices, replaced, {})
    optimizer = _one_optimizer(optimizers)
    if optimizer is not None and replaced:
        old_params = itertools.chain.from_iterable(old.parameters() for old in replaced)
        new_params = itertools.chain.from_iterable(new.parameters() for new in replaced.values())
        update_params_in_optimizer(old_params, new_params, optimizer)
    return replaced


def _replace_children(
    module: nn.Module,
    policies: Mapping[type[nn.Module], ReplacementFunction],
    recurse: bool,
    indices: dict[type[nn.Module], int],
    replaced: dict[nn.Module, nn.Module],
    outcome: dict[int, nn.Module],
) -> None:
    """Apply ``policies`` below ``module``. ``outcome`` maps each visited child (by id) to what
    it became, so a child reachable under several names gets one replacement, set under each."""
    for name, child in list(
        module._modules.items()
    ):  # _modules keeps aliases; named_children drops them
        if child is None:
            continue
        if id(child) in outcome:
            if outcome[id(child)] is not child:
                setattr(module, name, outcome[id(child)])
            continue
        current = child
        for policy_class, policy in policies.items():
            if not isinstance(current, policy_class):
                continue
            index = indices[policy_class]
            indices[policy_class] = index + 1
            new = policy(current, index)
            if new is None:
                continue
            replaced[current] = new
            current = new
            if not recurse:
                break
        outcome[id(child)] = current
        if current is not child:
            setattr(module, name, current)
        if current is child or recurse:
            _replace_children(current, policies, recurse, indices, replaced, outcome)


def update_params_in_optimizer(
    old_params: Iterable[nn.Parameter],
    new_params: Iterable[nn.Parameter],
    optimizers: Optimizers,
) -> None:
    """Remove ``old_params`` from the optimizer and add ``new_params`` to the same param group.

    Parameters present in both are left as they are. The removed ones must all sit in one param
    group (``RuntimeError`` otherwise, or if one is missing); their optimizer state is dropped.
    More than one optimizer is a ``NotImplementedError``.

    >>> old, new = nn.Linear(2, 2), nn.Linear(2, 3)
    >>> opt = torch.optim.SGD(old.parameters(), lr=0.1)
    >>> update_params_in_optimizer(old.parameters(), new.parameters(), opt)
    >>> [p.shape for p in opt.param_groups[0]["params"]]
    [torch.Size([3, 2]), torch.Size([3])]
    """
    optimizer = _one_optimizer(optimizers)
    if optimizer is None:
        return
    old_list, new_list = list(old_params), list(new_params)
    old_ids, new_ids = {id(p) for p in old_list}, {id(p) for p in new_list}
    removed = [p for p in old_list if id(p) not in new_ids]
    added = [p for p in new_list if id(p) not in old_ids]
    if not removed and not added:
        return
    group_index = None
    for param in removed:
        where = [
            i for i, g in enumerate(optimizer.param_groups) if any(q is param for q in g["params"])
        ]
        if not where:
            raise RuntimeError(f"parameter of shape {tuple(param.shape)} is not in the optimizer")
        if group_index is not None and where[0] != group_index:
            raise RuntimeError("the removed parameters are split across several param groups")
        group_index = where[0]
    group = optimizer.param_groups[0 if group_index is None else group_index]
    removed_ids = {id(p) for p in removed}
    group["params"] = [p for p in group["params"] if id(p) not in removed_ids] + added
    for param in removed:
        optimizer.state.pop(param, None)


def replace_params_in_optimizer(
    old_params: Iterable[nn.Parameter],
    new_params: Iterable[nn.Parameter],
    optimizers: Optimizers,
) -> None:
    """Swap each old parameter for the new one at the same position, keeping its param group.

    ``RuntimeError`` if the two have different lengths or an old parameter is not in the
    optimizer; more than one optimizer is a ``NotImplementedError``. State of old parameters is
    dropped.

    >>> old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> opt = torch.optim.SGD([{"params": [old.weight]}, {"params": [old.bias], "lr": 0.5}], lr=0.1)
    >>> replace_params_in_optimizer(old.parameters(), new.parameters(), opt)
    >>> opt.param_groups[1]["params"][0] is new.bias
    True
    """
    optimizer = _one_optimizer(optimizers)
    if optimizer is None:
        return
    old_list, new_list = list(old_params), list(new_params)
    if len(old_list) != len(new_list):
        raise RuntimeError(
            f"old_params has {len(old_list)} parameters but new_params has {len(new_list)}"
        )
    for old, new in zip(old_list, new_list, strict=True):
        for group in optimizer.param_groups:
            positions = [i for i, p in enumerate(group["params"]) if p is old]
            if positions:
                group["params"][positions[0]] = new
                optimizer.state.pop(old, None)
                break
        else:
            raise RuntimeError(f"parameter of shape {tuple(old.shape)} is not in the optimizer")
