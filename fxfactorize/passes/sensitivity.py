"""How much the model's output moves when one layer's output does (``sensitivity=True``).

A layer's own nmse says nothing about what its error does downstream: a layer before a
normalisation, or whose output is mostly discarded, can err a lot for free, and one feeding the
output directly cannot. For each layer the *gain* ``g_l = E‖J_lᵀ v‖² / n_l`` is measured on the
calibration batches: ``J_l`` is the Jacobian of the model's output with respect to the layer's
output (``n_l`` elements), ``v`` a Gaussian probe of the output, so ``g_l`` is the mean squared
output change per unit of squared error at one of the layer's output elements. One backward pass
per batch gives every layer's gain at once (a zero tensor added to each layer's output collects
its gradient). An error that spreads over the layer's output like a probe then costs the model's
output about ``g_l`` times its squared size; the rank policies weigh each layer's predicted error
energy by its gain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fxfactorize.core.moments import InputMoments
from fxfactorize.layers import grouped_weight
from fxfactorize.passes.calibrate import run_calibration
from fxfactorize.passes.plan import LayerEntry
from fxfactorize.passes.regions import Region
from fxfactorize.passes.runner import running

__all__ = ["error_weights", "output_gain_sums", "output_gains", "output_variance_energy"]

log = logging.getLogger("fxfactorize")


def output_gains(
    model: nn.Module,
    regions: list[Region],
    entries: Sequence[LayerEntry],
    targets: Iterable[str],
    batches: Iterable[Any],
) -> dict[str, float]:
    """``{target: g_l}`` (see the module docstring) over ``batches``; a layer that does not reach
    the output gets 0. ``model`` is not changed (no parameter gradient is kept)."""
    sums = output_gain_sums(model, regions, entries, targets, batches)
    return {target: squared / count if count else 0.0 for target, (squared, count) in sums.items()}


def output_gain_sums(
    model: nn.Module,
    regions: list[Region],
    entries: Sequence[LayerEntry],
    targets: Iterable[str],
    batches: Iterable[Any],
    first_batch: int = 0,
) -> dict[str, tuple[float, float]]:
    """``{target: (Σ ‖J_lᵀ v‖², n_l summed)}`` over ``batches``: the sums whose ratio is
    :func:`output_gains`' ``g_l`` (sums add up across processes). Batch ``i``'s probe is drawn
    from seed ``first_batch + i``, its index in the union of all processes' batches."""
    by_target = {entry.target: entry for entry in entries}
    modules: dict[int, tuple[nn.Module, list[str]]] = {}
    for target in targets:
        module = by_target[target].site.module
        modules.setdefault(id(module), (module, []))[1].append(target)
    squared = dict.fromkeys(modules, 0.0)
    elements = dict.fromkeys(modules, 0)
    probes: list[tuple[int, torch.Tensor]] = []

    def hook_for(key: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            probe = torch.zeros_like(output, requires_grad=True)
            probes.append((key, probe))
            return output + probe

        return hook

    index = first_batch - 1

    def run_batch(batch: Any) -> None:
        nonlocal index
        index += 1
        probes.clear()
        with torch.enable_grad():
            output = run(batch)
            leaves = [
                leaf
                for leaf in tree_flatten(output)[0]
                if isinstance(leaf, torch.Tensor)
                and leaf.is_floating_point()
                and leaf.requires_grad
            ]
            if not leaves or not probes:
                return
            generator = torch.Generator().manual_seed(index)  # the same probes on every run
            objective = sum(
                (torch.randn(leaf.shape, generator=generator).to(leaf) * leaf).sum()
                for leaf in leaves
            )
            grads = torch.autograd.grad(objective, [p for _, p in probes], allow_unused=True)
        for (key, probe), grad in zip(probes, grads, strict=True):
            elements[key] += probe.numel()
            if grad is not None:
                squared[key] += float(grad.detach().to(torch.float64).pow(2).sum())

    with running(model, regions) as (_, run):
        handles = [
            module.register_forward_hook(hook_for(key)) for key, (module, _) in modules.items()
        ]
        try:
            run_calibration(batches, run_batch, name_of=str, progress=False)
        finally:
            for handle in handles:
                handle.remove()
    sums = {}
    for key, (_, names) in modules.items():
        sums.update(dict.fromkeys(names, (squared[key], float(elements[key]))))
    return sums


def output_variance_energy(module: nn.Module, moments: InputMoments) -> float:
    """``Σ_n ‖W (x_n − μ)‖²`` of a Linear/Conv over the rows of ``moments``: the scale by which
    its nmse becomes a squared error.

    >>> m = InputMoments.zeros(2); m.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    >>> output_variance_energy(nn.Linear(2, 1, bias=False).requires_grad_(False).eval(), m) >= 0
    True
    """
    weight = grouped_weight(module)[0].detach().to(torch.float64)
    cov = moments.covariance()
    return float(torch.einsum("gmd,gde,gme->", weight, cov, weight))


def error_weights(
    gains: dict[str, float], modules: dict[str, nn.Module], moments: dict[str, InputMoments]
) -> dict[str, float]:
    """Per layer, what one unit of its nmse costs the model's output: ``g_l`` times its output
    variance energy, normalised so that the weights' geometric mean is 1 (a tolerance keeps its
    scale). Layers without statistics get weight 1."""
    raw = {
        target: gains.get(target, 0.0) * output_variance_energy(modules[target], moments[target])
        for target in modules
        if target in moments
    }
    positive = [value for value in raw.values() if value > 0]
    if not positive:
        return dict.fromkeys(modules, 1.0)
    scale = float(torch.tensor(positive, dtype=torch.float64).log().mean().exp())
    tiny = (
        min(positive) / scale * 1e-3
    )  # a layer that never reaches the output still costs a little
    weights = {target: max(value / scale, tiny) for target, value in raw.items()}
    return {target: weights.get(target, 1.0) for target in modules}
