"""Keep optimizers in step with :func:`fxfactorize.transform`'s result."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxfactorize.surgery import replace_params_in_optimizer, update_params_in_optimizer

__all__ = ["as_optimizer_list", "update_optimizers"]


def as_optimizer_list(optimizers: Any) -> list[torch.optim.Optimizer]:
    """``optimizers`` (one optimizer or an iterable of them) as a list; ``TypeError`` otherwise.

    >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    >>> as_optimizer_list(opt) == [opt]
    True
    >>> as_optimizer_list("adam")
    Traceback (most recent call last):
    ...
    TypeError: optimizers must be a torch.optim.Optimizer or a list of them; got str
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    if isinstance(optimizers, (str, bytes)) or not isinstance(optimizers, Iterable):
        items = [optimizers]
    else:
        items = list(optimizers)
    for item in items:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError(
                f"optimizers must be a torch.optim.Optimizer or a list of them; got {type(item).__name__}"
            )
    return items


def update_optimizers(
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    model: nn.Module,
    result: nn.Module,
    replaced: Mapping[str, nn.Module],
) -> None:
    """Make ``optimizers`` (over ``model``'s parameters) train ``result`` instead.

    ``replaced`` maps each replaced submodule's qualified name to the module it was before; its
    parameters leave the optimizer and those of ``result``'s module at that name join their param
    group. Every other parameter of ``model`` is swapped for ``result``'s parameter of the same
    name when they differ (``result`` is a copy). Parameters an optimizer does not hold are left out.

    >>> from fxfactorize.modules.factorized import FactorizedLinear
    >>> model = nn.Sequential(nn.Linear(8, 8)); result = nn.Sequential(FactorizedLinear(8, 8, latent_features=2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> update_optimizers(opt, model, result, {"0": model[0]})
    >>> len(opt.param_groups[0]["params"])
    3
    """
    optimizers = as_optimizer_list(optimizers)
    saved = [([list(g["params"]) for g in o.param_groups], dict(o.state)) for o in optimizers]
    try:
        for optimizer in optimizers:
            _update_one(optimizer, model, result, replaced)
    except Exception:
        for optimizer, (params, state) in zip(optimizers, saved, strict=True):
            for group, held in zip(optimizer.param_groups, params, strict=True):
                group["params"] = held
            optimizer.state.clear()
            optimizer.state.update(state)
        raise


def _update_one(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    result: nn.Module,
    replaced: Mapping[str, nn.Module],
) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    prefixes = tuple(f"{target}." for target in replaced)
    old, new = [], []
    for name, param in model.named_parameters():
        if name.startswith(prefixes) or id(param) not in held:
            continue
        try:
            twin = result.get_parameter(name)
        except AttributeError:
            continue
        if twin is not param:
            old.append(param)
            new.append(twin)
    replace_params_in_optimizer(old, new, optimizer)
    done: set[int] = set()
    for target, before in replaced.items():
        if id(before) in done:  # a shared module: its parameters are swapped once
            continue
        done.add(id(before))
        removed = [p for p in before.parameters() if id(p) in held]
        if removed:
            update_params_in_optimizer(
                removed, list(result.get_submodule(target).parameters()), optimizer
            )
