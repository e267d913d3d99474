"""Bounds the equivalence checker holds spatial-SVD and Tucker-2 layers to, from the reference alone.

* **Data-free**: spatial SVD has an exact optimum (Eckart–Young on the ``[out·K_w, in·K_h]``
  layout), so ``‖W − Ŵ‖² ≤ Σ_{i>r} σ_i² + rounding``. Tucker-2 has none; the layer must be as
  close as the exact HOSVD at its ranks (quasi-optimal: within the sum of the two unfoldings'
  tails; HOOI only improves on it), within ``TENSOR_RTOL``. The bias must be kept.
* **Calibrated**: no closed-form optimum either; the layer's centered error on the calibration
  inputs must be at most that of the data-free solution at its ranks with the best bias (the
  solver starts there and only descends), within ``CALIBRATED_RTOL``.

Each layer's map is read from its children's raw weights; a child with a bias it should not
have, or a shape that does not fit the reference conv, is malformed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fxfactorize.core.lowrank import error_energy, refit_bias
from fxfactorize.core.moments import Statistics
from fxfactorize.core.structured import (
    spatial_factors,
    spatial_matrix,
    spatial_weight,
    tucker2_factors,
    tucker2_weight,
)
from fxfactorize.modules.structured import SpatialConv2d, Tucker2Conv, spatial_convs

__all__ = ["calibrated_bound", "data_free_bound", "structured_map"]

#: Relative slack on the HOSVD reference (float64 eigensolves of the unfoldings' Grams).
TENSOR_RTOL = 1e-6
#: Relative slack on the calibrated bound (the refinement's float64 arithmetic; rounding the
#: factors to float32 moves the error by far less on the layers measured).
CALIBRATED_RTOL = 1e-4
ROUNDING = 2.0


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def structured_map(
    layer: nn.Module, conv: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(Ŵ [out, in, *kernel], b̂ [out], substitute)`` of a structured layer standing for the plain
    ``conv``: ``ValueError`` when its children do not form that map. The substitute computes the
    map from the layer's parameters under ``conv``'s geometry (not the layer's own).

    >>> conv = nn.Conv2d(4, 6, 3, padding=1)
    >>> layer = SpatialConv2d(4, 6, (3, 3), rank=2, padding=1)
    >>> tuple(structured_map(layer, conv)[0].shape)
    (6, 4, 3, 3)
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.groups != 1:
        raise ValueError("a structured conv must stand for an ungrouped convolution")
    out, channels = conv.out_channels, conv.in_channels
    kernel = tuple(conv.kernel_size)
    geometry = {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "padding_mode")}
    children = [c for c in layer.children()]
    if any(getattr(c, "bias", None) is not None for c in children[:-1]):
        raise ValueError("an inner conv has a bias")
    bias = children[-1].bias
    b = torch.zeros(out, dtype=torch.float64) if bias is None else _f64(bias)
    if isinstance(layer, SpatialConv2d):
        first, second = layer.module0.weight, layer.module1.weight
        rank = first.shape[0]
        if len(kernel) != 2 or tuple(first.shape) != (rank, channels, kernel[0], 1):
            raise ValueError(f"module0 weight {tuple(first.shape)} does not fit the conv")
        if tuple(second.shape) != (out, rank, 1, kernel[1]):
            raise ValueError(f"module1 weight {tuple(second.shape)} does not fit the conv")
        vertical, horizontal = spatial_convs(1, 1, 1, kernel, device="meta", **geometry)
        weight = spatial_weight(_f64(first), _f64(second))

        def substitute(x: torch.Tensor) -> torch.Tensor:
            inner = vertical._conv_forward(x, first, None)
            return horizontal._conv_forward(inner, second, bias)

        return weight, b, substitute
    if isinstance(layer, Tucker2Conv):
        first, core, last = layer.module0.weight, layer.module1.weight, layer.module2.weight
        r2, r1 = core.shape[:2]
        ones = (1,) * len(kernel)
        if tuple(first.shape) != (r1, channels, *ones) or tuple(last.shape) != (out, r2, *ones):
            raise ValueError("a pointwise conv does not fit the conv or the core")
        if tuple(core.shape[2:]) != kernel:
            raise ValueError(f"core {tuple(core.shape)} does not have the conv's kernel")
        weight = tucker2_weight(_f64(first).flatten(1), _f64(core), _f64(last).flatten(1))
        pointwise = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[len(kernel)]

        def substitute(x: torch.Tensor) -> torch.Tensor:
            return pointwise(conv._conv_forward(pointwise(x, first), core, None), last, bias)

        return weight, b, substitute
    raise ValueError(f"{type(layer).__name__} is not a structured conv")


def _ranks(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, SpatialConv2d):
        return (layer.module0.weight.shape[0],)
    core = layer.module1.weight
    return (core.shape[1], core.shape[0])


def _reference_solution(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The data-free solution at ``layer``'s ranks, computed from the reference weight."""
    if isinstance(layer, SpatialConv2d):
        return spatial_weight(*spatial_factors(weight, _ranks(layer)[0]))
    return tucker2_weight(*tucker2_factors(weight, _ranks(layer), sweeps=0))


def data_free_bound(weight: torch.Tensor, layer: nn.Module, dtype: torch.dtype) -> float:
    """The squared weight error ``layer`` may have against the reference ``weight`` (float64).

    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> layer = SpatialConv2d(4, 6, (3, 3), rank=12)
    >>> data_free_bound(w, layer, torch.float64) >= 0
    True
    """
    eps = torch.finfo(dtype).eps
    energy = float(weight.pow(2).sum())
    if isinstance(layer, SpatialConv2d):
        s = torch.linalg.svdvals(spatial_matrix(weight))
        rank = _ranks(layer)[0]
        tail, spread = float((s[rank:] ** 2).sum()), float(s[0] * s[:rank].sum())
        return tail + 1e-12 * energy + (ROUNDING * eps) ** 2 * spread
    reached = float((weight - _reference_solution(weight, layer)).pow(2).sum())
    rounding = ROUNDING * 3 * eps * math.sqrt(energy)
    return (math.sqrt(reached * (1 + TENSOR_RTOL) + 1e-12 * energy) + rounding) ** 2


def calibrated_bound(
    weight: torch.Tensor, bias: torch.Tensor, layer: nn.Module, stats: Statistics
) -> float:
    """The error the data-free solution at ``layer``'s ranks, with the best bias, makes on
    ``stats`` (``Σ_n ‖W x_n + b − Ŵ x′_n − b̂‖²``), plus the relative slack and the rounding of
    the layer's factors to its dtype: ``(ROUNDING ε)²`` per factor and rank of the output energy
    ``Σ_n ‖W x_n + b‖²`` (as the pair's calibrated bound allows)."""
    w = weight.reshape(1, weight.shape[0], -1)
    approx = _reference_solution(weight, layer).reshape(w.shape)
    best_bias = refit_bias(w, bias, approx, stats)
    reached = error_energy(w, bias, approx, best_bias, stats) * (1 + CALIBRATED_RTOL)
    dtype = next(layer.parameters()).dtype
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)  # float32-summed moments
    output = error_energy(w, bias, torch.zeros_like(w), None, stats)
    factors = len(list(layer.children()))
    return reached + (ROUNDING * eps) ** 2 * factors * max(_ranks(layer)) * output
