"""The local phase of healing: each factorized layer of the student learns to give the output of
the teacher's layer of the same name.

A layer sees the inputs it gets in the student (captured by forward hooks, detached, so nothing is
backpropagated through the network) and is fitted to what the teacher's layer gives on the
teacher's own inputs (the anchored objective): it learns to undo the error of the layers before
it too. The loss per layer is :func:`~fxfactorize.healing.losses.normalized_mse`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fxfactorize.healing.losses import normalized_mse
from fxfactorize.layers import FactorizedLayer, describe_module

__all__ = ["capture", "factorized_layers", "fit_layers", "teacher_layers"]

_Call = tuple[tuple[Any, ...], dict[str, Any]]


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLayer]:
    """The :class:`~fxfactorize.layers.FactorizedLayer` submodules of ``model`` by qualified name
    (a module reachable under several names once, under its first).

    >>> from fxfactorize.modules import FactorizedLinear
    >>> model = nn.Sequential(nn.Linear(8, 8), FactorizedLinear(8, 8, latent_features=2))
    >>> list(factorized_layers(model))
    ['1']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}


def _geometry(module: nn.Module) -> tuple | None:
    try:
        shape = describe_module(module)
    except (AttributeError, TypeError):
        return None
    if shape is None:
        return None
    return shape.kind, shape.in_features, shape.out_features, shape.kernel, shape.groups


def teacher_layers(layers: Mapping[str, nn.Module], teacher: nn.Module) -> dict[str, nn.Module]:
    """The teacher's submodule of the same qualified name for each of ``layers``; a ``ValueError``
    naming the layer if the teacher has none or it has another geometry (kind, input and output
    sizes, kernel, groups).

    >>> from fxfactorize.modules import FactorizedLinear
    >>> teacher = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    >>> student = {"1": FactorizedLinear(8, 8, latent_features=2)}
    >>> teacher_layers(student, teacher)
    Traceback (most recent call last):
    ...
    ValueError: student layer '1' is a linear 8→8 but the teacher's '1' is a linear 8→4; the local phase pairs layers by name (local_steps=0 skips it)
    """
    found = {}
    for name, layer in layers.items():
        try:
            other = teacher.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"student layer {name!r} has no counterpart in the teacher (no submodule of that "
                "name); the local phase pairs layers by name (local_steps=0 skips it)"
            ) from None
        mine, theirs = _geometry(layer), _geometry(other)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"student layer {name!r} is {_describe(mine)} but the teacher's {name!r} is "
                f"{_describe(theirs)}; the local phase pairs layers by name (local_steps=0 skips it)"
            )
        found[name] = other
    return found


def _describe(geometry: tuple) -> str:
    kind, fan_in, fan_out, kernel, groups = geometry
    text = f"a {kind} {fan_in}→{fan_out}"
    if kernel:
        text += f" kernel {tuple(kernel)}"
    return text + (f" groups {groups}" if groups != 1 else "")


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module], what: str) -> Iterator[dict[str, list[Any]]]:
    """Record, per name, each call's detached ``"inputs"`` (``(args, kwargs)``) or
    ``"outputs"`` of ``modules`` while the block runs.

    >>> fc = nn.Linear(3, 2)
    >>> with capture({"fc": fc}, "outputs") as seen:
    ...     _ = fc(torch.ones(1, 3))
    >>> len(seen["fc"]), seen["fc"][0].requires_grad
    (1, False)
    """
    seen: dict[str, list[Any]] = {name: [] for name in modules}

    def detach(value: Any) -> Any:
        return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen[name].append(detach((args, kwargs)) if what == "inputs" else detach(output))

        return hook

    handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def fit_layers(
    layers: Mapping[str, nn.Module],
    inputs: Mapping[str, list[_Call]],
    targets: Mapping[str, list[Any]],
) -> dict[str, float]:
    """Backpropagate, for each of ``layers``, its normalized mse between its output on each
    captured call's ``inputs`` and the matching teacher output in ``targets`` (averaged over its
    calls); return the loss per layer. Gradients accumulate; the caller steps the optimizer.

    >>> fc = nn.Linear(2, 2)
    >>> x = torch.randn(8, 2)
    >>> losses = fit_layers({"fc": fc}, {"fc": [((x,), {})]}, {"fc": [x]})
    >>> fc.weight.grad is not None, losses["fc"] >= 0
    (True, True)
    """
    losses = {}
    for name, layer in layers.items():
        calls, wanted = inputs.get(name, []), targets.get(name, [])
        if len(calls) != len(wanted) or not calls:
            raise ValueError(
                f"layer {name!r} ran {len(calls)} time(s) in the student but {len(wanted)} in "
                "the teacher on the same batch; the local phase needs both to run it alike "
                "(local_steps=0 skips it)"
            )
        total = None
        for (args, kwargs), target in zip(calls, wanted, strict=True):
            output = layer(*args, **kwargs)
            if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
                raise ValueError(f"layer {name!r}: the local phase needs tensor outputs")
            if output.shape != target.shape:
                raise ValueError(
                    f"layer {name!r} gives shape {tuple(output.shape)} in the student but "
                    f"{tuple(target.shape)} in the teacher (local_steps=0 skips the local phase)"
                )
            loss = normalized_mse(output, target)
            total = loss if total is None else total + loss
        total = total / len(calls)
        total.backward()
        losses[name] = float(total.detach())
    return losses
