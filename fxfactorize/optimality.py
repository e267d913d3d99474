"""Is each factorized layer of a candidate the optimum for its rank? Judged from the reference alone.

:func:`verify_layers` finds every factorized layer of a candidate by its type (the rank-r pairs
``FactorizedLinear`` / ``FactorizedConv1d/2d/3d`` and the tensorized
:class:`fxfactorize.tensorized.FactorizedLinear`), takes the reference's layer at the same qualified
name, rebuilds both affine maps from their parameters (the candidate's ``y = Ŵx + b̂``, its rank read
from the shapes of its weights; the reference's ``y = Wx + b``) and checks that ``Ŵ, b̂`` reach the
optimum for that rank. Nothing the candidate says about itself (``meta``, its report) is read. Below,
``ε`` is the coarsest machine epsilon of the two layers' dtypes, ``r`` the rank per group, and every
sum also runs over the groups of a grouped convolution.

* **Data-free** (rank-r pairs): ``‖W − Ŵ‖²_F ≤ τ + γ ‖W‖²_F + (ROUNDING ε)² σ₁ Σ_{i≤r} σ_i`` with
  ``τ = Σ_{i>r} σ_i(W)²`` (Eckart–Young: no rank-r matrix is closer), and ``|b̂ − b| ≤ 2ε|b|``
  element by element (the bias is kept). ``γ = 2 r n ε₆₄`` (``n`` the longer side) covers the
  solver's float64 Gram eigensolve: eigenvalues off by ``n ε₆₄ σ₁²`` lose at most ``2r`` times that
  of kept energy (Ky Fan). Rounding the factors (``√σ`` on each side) to the layer's dtype adds
  ``δ`` with ``‖δ‖² ≤ ε² σ₁ Σ_{i≤r} σ_i``, orthogonal to ``W − W_r``; ``ROUNDING = 2`` (measured:
  honest layers use under 3 % of that term).
* **Calibrated** (rank-r pairs, given the calibration batches): the error of the candidate's map on
  the inputs the reference layer receives from them, weights and bias together,
  ``E = Σ_n ‖(W − Ŵ)x_n + b − b̂‖²``, must satisfy
  ``E ≤ τ_λ + γ tr(W (C + λI) Wᵀ) + r (CALIBRATED_ROUNDING ε)² Σ_n ‖W x_n + b‖²`` with
  ``τ_λ = Σ_{i>r} eig_i(W (C + λI) Wᵀ)`` from the centered input scatter ``C`` and the solver's
  ridge ``λ = RIDGE · tr(C) / D`` (:mod:`fxfactorize.core.lowrank`). With ``λ = 0`` that is the least
  error any rank-r map with any bias reaches on that data (reduced-rank regression through the
  whitened SVD; the best bias keeps the mean output). The solver minimises ``E + λ‖W − Ŵ‖²_F``, so
  its ``E`` is at most ``τ_λ``, which exceeds ``τ_0`` by at most ``λ ‖W‖²_F``, a ``1e-6 · tr(C)/D``
  sliver. ``ε`` here is at least float32's (the moments are summed from float32 products); the
  solution's rounding raises ``E`` to second order only (the optimum is stationary), and honest
  layers use under 1 % of the rounding term (measured down to bfloat16, with inputs of condition
  number 1e6 in a rotated basis). This is the optimum of each layer on the *reference's*
  activations, which is what ``transform(..., calibration=...)`` solves for; a layer trained or
  solved on other inputs afterwards is not verified by it.
* **Shrunk or error-propagating** (``shrinkage``, ``propagate_error``; rank-r pairs, given the
  calibration batches): the layer must minimise, for some ``α`` of
  :data:`~fxfactorize.core.shrinkage.SHRINKAGE_GRID`, the objective the solver states,
  ``F_α(M) = (1 − α) E(M) + (α τ + λ) ‖M − Wᵀ‖²_F`` with ``τ = tr(C′)/D``, where ``E`` is the
  error of ``M`` against the reference layer's output: either on the reference's own inputs or,
  for the error-propagating solve, on the inputs the *candidate* feeds the layer (``x′``, paired
  row by row with the reference's ``x``). Its minimum over rank-r ``M`` is
  ``c − Σ_{i≤r} s_i(Z)²`` with ``Z = L⁻¹ B`` (``L Lᵀ = (1 − α) C′ + (α τ + λ) I``,
  ``B = (1 − α) T + (α τ + λ) Wᵀ``, ``T`` the centered cross term, ``c`` the constant); the
  candidate's ``F_α`` (with its own bias, so ``E`` counts any mean error too) may exceed it by
  ``SHRUNK_SLACK · c`` plus the rounding term above.
* **Tensorized** TT / blockTT / Tucker: no closed-form optimum; the layer must be as close as the
  textbook algorithm for its format gets at its ranks, computed here with exact float64 SVDs:
  TT-SVD (TT, blockTT) or HOSVD (Tucker; HOOI sweeps only improve on it). Both are quasi-optimal
  (error² at most the sum of the unfoldings' tails). Allowed:
  ``‖W − Ŵ‖_F ≤ √(e (1 + TENSOR_RTOL)) + ROUNDING · factors · ε ‖W‖_F``; the 1 % covers the
  library's float32 Gram splits and its randomized range finder for unfoldings of 512+ on both
  sides (measured within 0.3 % of the exact split). The bias must be kept. CP (ALS) has no such
  reference point: a CP layer is unverifiable.
* **Spatial SVD / Tucker-2** convs: see :mod:`fxfactorize.structured_bounds` (data-free: the exact
  optimum of the spatial layout, or the exact HOSVD; calibrated: no worse than that data-free
  solution with its best bias on the calibration inputs, or on the paired inputs of an
  error-propagating solve).

A layer that meets a bound is *verified*; its substitute (a function built from the candidate's
parameters alone, under the reference layer's geometry) stands in for the reference layer while the
candidate is compared end to end, so anything the candidate's module does beyond those parameters
(hooks, an overridden forward, other stride or padding) shows as a difference there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxfactorize.core import linalg
from fxfactorize.core.composer_api import accumulate_rows
from fxfactorize.core.lowrank import RIDGE, error_energy
from fxfactorize.core.moments import InputMoments, PairedMoments, Statistics
from fxfactorize.core.patches import conv_patch_rows
from fxfactorize.core.shrinkage import SHRINKAGE_GRID
from fxfactorize.errors import CalibrationError
from fxfactorize.modules import STRUCTURED_CONVS, FactorizedConvNd, FactorizedLinear
from fxfactorize.structured_bounds import calibrated_bound, data_free_bound, structured_map
from fxfactorize.tensorized.layer import FactorizedLinear as TensorizedLinear

__all__ = [
    "Affine",
    "Verdict",
    "collect_moments",
    "collect_paired",
    "factorized_layers",
    "reference_affine",
    "verify_layers",
]

log = logging.getLogger("fxfactorize")

# Multiples of the rounding envelope allowed (see the module docstring).
ROUNDING = 2.0
CALIBRATED_ROUNDING = 2.0
# Relative slack of the shrunk/propagated certificate: float64 cancellation in c − Σ s², with
# whitening of condition number up to 1e6 (measured: honest layers use under 1e-11).
SHRUNK_SLACK = 1e-9
# Relative slack on the TT-SVD / HOSVD bound for the randomized range finder (measured ≤ 0.3 %).
TENSOR_RTOL = 1e-2

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POINTWISE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Malformed(ValueError):
    """A factorized layer whose parameters do not form the map its type promises."""


class _NonFiniteInput(ValueError):
    """A calibration batch gives NaN or Inf at a layer's input."""


@dataclasses.dataclass
class Affine:
    """A layer's map ``y = W x + b`` per group: ``weight`` ``[G, M_g, D_g]`` and ``bias``
    ``[G, M_g]`` in float64 (zeros where the layer has none); ``conv`` is the convolution whose
    geometry (kernel, stride, padding, dilation, padding mode, groups) applies, ``None`` for a
    Linear map; ``dtype`` is the layer's parameter dtype."""

    weight: torch.Tensor
    bias: torch.Tensor
    dtype: torch.dtype
    conv: nn.Module | None = None

    @property
    def groups(self) -> int:
        return self.weight.shape[0]


@dataclasses.dataclass
class Verdict:
    """What :func:`verify_layers` found about one factorized layer of the candidate.

    ``status``: ``"verified"`` (``how`` says by which bound), ``"shared"`` (the reference holds the
    very same module: nothing to prove), ``"fault"`` (it misses its bound: ``excess`` is the
    error beyond the allowed one, relative to the reference layer's energy) or ``"unverifiable"``
    (``detail`` says why and what would verify it; ``needs_calibration`` when the calibration
    batches could). ``reference`` and ``substitute`` are set for verified layers.
    """

    name: str
    status: str
    detail: str = ""
    how: str = ""
    excess: float = math.nan
    reference: nn.Module | None = None
    substitute: Callable[[torch.Tensor], torch.Tensor] | None = None
    needs_calibration: bool = False
    needs_pairs: bool = False  # a fault on the reference's inputs: try the candidate's own


def factorized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every factorized layer of ``model``, each module once.

    >>> from fxfactorize.modules.factorized import FactorizedLinear
    >>> model = nn.Sequential(FactorizedLinear(8, 8, latent_features=2), nn.Linear(8, 8))
    >>> [name for name, _ in factorized_layers(model)]
    ['0']
    """
    kinds = (FactorizedLinear, FactorizedConvNd, TensorizedLinear, *STRUCTURED_CONVS)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


def _eps(*dtypes: torch.dtype) -> float:
    return max(torch.finfo(d).eps if d.is_floating_point else 0.0 for d in dtypes)


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a float64 CPU tensor: every check is done there, whatever the model's device."""
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _grouped_bias(bias: torch.Tensor | None, groups: int, out_g: int) -> torch.Tensor:
    if bias is None:
        return torch.zeros(groups, out_g, dtype=torch.float64)
    return _f64(bias).reshape(groups, out_g)


def _pair_map(
    module: nn.Module, groups: int, in_g: int, out: int, kernel: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(Ŵ [G, M_g, D_g], b̂ [G, M_g], rank per group)`` of a rank-r pair, laid out as a layer of
    ``groups`` groups with ``in_g`` inputs (times the kernel) per group and ``out`` outputs.
    Reads the children's raw parameters: a candidate's own accessors are what is being checked."""
    first, second = module.module0.weight, module.module1.weight
    rank = first.shape[0]
    if rank % groups or out % groups:
        raise _Malformed(f"rank {rank} or {out} outputs do not split into {groups} groups")
    rank_g, out_g = rank // groups, out // groups
    if tuple(first.shape[2:]) != tuple(kernel) or first[0].numel() != in_g:
        raise _Malformed(f"module0 weight {tuple(first.shape)} does not fit the reference layer")
    if (
        second.shape[0] != out
        or second[0].numel() != rank_g
        or any(k != 1 for k in second.shape[2:])
    ):
        raise _Malformed(
            f"module1 weight {tuple(second.shape)} is not a pointwise map from rank {rank}"
        )
    inner, outer = module.module0.bias, module.module1.bias
    if (inner is not None and inner.numel() != rank) or (
        outer is not None and outer.numel() != out
    ):
        raise _Malformed("a bias does not fit its layer")
    a = _f64(first).reshape(groups, rank_g, in_g)
    b = _f64(second).reshape(groups, out_g, rank_g)
    bias = _grouped_bias(outer, groups, out_g)
    if inner is not None:  # y = B(Ax + b₀) + b₁
        bias = bias + (b @ _f64(inner).reshape(groups, rank_g, 1))[..., 0]
    return b @ a, bias, rank_g


def reference_affine(module: nn.Module) -> Affine | None:
    """The map of a reference layer (Linear, Conv1d/2d/3d, a rank-r pair or a one-layer tensorized
    Linear), or ``None`` for any other module.

    >>> conv = nn.Conv2d(4, 6, 3, groups=2)
    >>> tuple(reference_affine(conv).weight.shape)
    (2, 3, 18)
    """
    if isinstance(module, TensorizedLinear):
        if module.n_layers != 1:
            return None
        weight = _f64(TensorizedLinear.get_weight(module))[None]
        dtype = module.factors[0].dtype
        return Affine(weight, _grouped_bias(module.bias, 1, weight.shape[1]), dtype)
    if isinstance(module, (FactorizedLinear, FactorizedConvNd)):
        conv = module.module0 if isinstance(module, FactorizedConvNd) else None
        groups = conv.groups if conv is not None else 1
        first = module.module0.weight
        try:
            weight, bias, _ = _pair_map(
                module, groups, first[0].numel(), module.module1.weight.shape[0], first.shape[2:]
            )
        except _Malformed:
            return None
        return Affine(weight, bias, first.dtype, conv)
    if isinstance(module, nn.Linear):
        weight = _f64(module.weight)[None]
        return Affine(weight, _grouped_bias(module.bias, 1, weight.shape[1]), module.weight.dtype)
    if isinstance(module, _CONVS):
        groups, out = module.groups, module.out_channels
        weight = _f64(module.weight).reshape(groups, out // groups, -1)
        bias = _grouped_bias(module.bias, groups, out // groups)
        return Affine(weight, bias, module.weight.dtype, module)
    return None


def _candidate_map(layer: nn.Module, ref: Affine) -> tuple[Affine, int | tuple, Callable]:
    """``(the candidate layer's map in the reference's layout, its rank, its substitute)``."""
    groups, out_g, in_g = ref.weight.shape
    if isinstance(layer, TensorizedLinear):
        if ref.conv is not None or layer.n_layers != 1:
            raise _Malformed("a tensorized Linear must stand for a Linear layer")
        # the dense weight the layer's own eval forward multiplies with
        dense = TensorizedLinear.get_weight(layer).detach().contiguous()
        if tuple(dense.shape) != (out_g, in_g):
            raise _Malformed(f"weight {tuple(dense.shape)}, reference {(out_g, in_g)}")
        bias = layer.bias
        if bias is not None and bias.numel() != out_g:
            raise _Malformed(f"bias of {bias.numel()} for {out_g} outputs")
        mapped = Affine(_f64(dense)[None], _grouped_bias(bias, 1, out_g), dense.dtype)
        return mapped, tuple(f.shape for f in layer.factors), lambda x: F.linear(x, dense, bias)
    is_conv = isinstance(layer, FactorizedConvNd)
    if is_conv != (ref.conv is not None) or (is_conv and layer.dims != ref.conv.weight.dim() - 2):
        raise _Malformed(f"a {type(layer).__name__} cannot stand for this reference layer")
    kernel = tuple(ref.conv.kernel_size) if is_conv else ()
    weight, bias, rank_g = _pair_map(layer, groups, in_g, groups * out_g, kernel)
    mapped = Affine(weight, bias, layer.module0.weight.dtype, ref.conv)
    return mapped, rank_g, _pair_substitute(layer, ref)


def _pair_substitute(layer: nn.Module, ref: Affine) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pair's parameters under the reference's geometry, as a plain function (no module call)."""
    first, inner = layer.module0.weight, layer.module0.bias
    second, bias = layer.module1.weight, layer.module1.bias
    conv = ref.conv
    if conv is None:
        return lambda x: F.linear(F.linear(x, first, inner), second, bias)
    pointwise = _POINTWISE[conv.weight.dim() - 2]
    return lambda x: pointwise(
        conv._conv_forward(x, first, inner), second, bias, groups=conv.groups
    )


def _tail(matrix: torch.Tensor, rank: int) -> tuple[float, float]:
    """``(Σ_{i>rank} σ_i², σ_1 · Σ_{i≤rank} σ_i)`` of a float64 matrix: the optimum's error and
    what rounding evenly split factors can add to it (see :func:`_data_free`)."""
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0:
        return 0.0, 0.0
    return float((s[rank:] ** 2).sum()), float(s[0] * s[:rank].sum())


def _gram_allowance(rank: int, shape: tuple[int, ...], eps: float) -> float:
    """Kept energy a Gram eigensolve in precision ``eps`` may lose at ``rank``, relative to the
    matrix's energy: eigenvalues off by ``n ε`` of the largest (``n`` the longer side, the Gram's
    inner dimension) move the sum of the top ``rank`` by at most ``2 · rank`` times that."""
    return 2 * min(rank, *shape) * max(shape) * eps


def _relative(excess: float, energy: float) -> float:
    return excess / energy if energy > 0 else (0.0 if excess <= 0 else math.inf)


def _bias_check(ref: Affine, cand: Affine, eps: float) -> str:
    """``""`` if ``b̂ = b`` to rounding, else what differs."""
    diff = (cand.bias - ref.bias).abs()
    if bool((diff <= 2 * eps * ref.bias.abs()).all()):
        return ""
    return f"bias differs from the reference's by up to {float(diff.max()):.3g}"


def _data_free(ref: Affine, cand: Affine, rank_g: int) -> tuple[bool, str, float]:
    """Whether ``cand`` is the truncated SVD of ``ref`` at ``rank_g`` per group (to rounding).

    Rounding factors ``B = U√S``, ``A = √S Vᵀ`` to precision ``ε`` adds ``δ = δB A + B δA`` with
    ``‖δ‖ ≤ ε √(σ₁ Σ_{i≤r} σ_i)``; ``δ`` lies in the kept singular spaces, orthogonal to the
    residual ``W − W_r``, so the squared error grows by ``‖δ‖²`` only.
    """
    eps = _eps(ref.dtype, cand.dtype)
    tails = [_tail(w, rank_g) for w in ref.weight]
    tail, spread = sum(t for t, _ in tails), sum(h for _, h in tails)
    error = float((ref.weight - cand.weight).pow(2).sum())
    energy = float(ref.weight.pow(2).sum())
    solve = _gram_allowance(rank_g, ref.weight.shape[1:], torch.finfo(torch.float64).eps)
    allowed = tail + solve * energy + (ROUNDING * eps) ** 2 * spread
    bias = _bias_check(ref, cand, eps)
    detail = (
        f"‖W − Ŵ‖² = {_relative(error, energy):.4g} of ‖W‖², the optimum for rank {rank_g}"
        f"{' per group' if ref.groups > 1 else ''} is {_relative(tail, energy):.4g}"
    )
    detail += f"; {bias}" if bias else ""
    return error <= allowed and not bias, detail, _relative(max(error - allowed, 0.0), energy)


def _calibrated(
    ref: Affine, cand: Affine, rank_g: int, moments: InputMoments
) -> tuple[bool, str, float]:
    """Whether ``cand``'s error on the inputs summarised by ``moments`` is the rank's optimum.

    The optimum is a stationary point of the error (weights along the rank-r manifold, bias
    anywhere): rounding its ``r`` rank-one terms and its bias to relative precision ``ε`` raises
    the error to second order only, allowed ``r (CALIBRATED_ROUNDING ε)²`` of the output energy
    ``Σ_n ‖W x_n + b‖²`` (measured: under 1 % of that allowance for bfloat16 layers, with inputs
    of condition number 1e6 in a rotated basis).
    """
    eps = _eps(ref.dtype, cand.dtype, torch.float32)  # moments are summed from float32 products
    cov = moments.covariance()
    delta_w, delta_b = ref.weight - cand.weight, ref.bias - cand.bias
    error = _output_energy(delta_w, delta_b, moments)
    tail = total = 0.0
    for g in range(ref.groups):
        values = _whitened_eigenvalues(ref.weight[g], cov[g])
        tail, total = tail + float(values[rank_g:].sum()), total + float(values.sum())
    rounding = (CALIBRATED_ROUNDING * eps) ** 2 * max(rank_g * ref.groups, 1)
    rounding *= _output_energy(ref.weight, ref.bias, moments)
    solve = _gram_allowance(rank_g, ref.weight.shape[1:], torch.finfo(torch.float64).eps)
    allowed = tail + solve * total + rounding
    energy = float(torch.einsum("gmd,gde,gme->", ref.weight, cov, ref.weight))
    detail = (
        f"error on the calibration data {_relative(max(error, 0.0), energy):.4g} of the output "
        f"variance, the optimum for rank {rank_g} is {_relative(tail, energy):.4g}"
    )
    return error <= allowed, detail, _relative(max(error - allowed, 0.0), energy)


def _group(stats: Statistics, g: int) -> Statistics:
    """Group ``g`` of grouped statistics, as one-group statistics."""

    def one(m: InputMoments) -> InputMoments:
        return InputMoments(m.xtx[g : g + 1], m.xsum[g : g + 1], m.count)

    if isinstance(stats, InputMoments):
        return one(stats)
    return PairedMoments(one(stats.inputs), one(stats.original), stats.cross[g : g + 1])


def _shrunk(ref: Affine, cand: Affine, rank_g: int, stats: Statistics) -> tuple[bool, str, float]:
    """Whether ``cand`` minimises ``F_α`` on ``stats`` for some ``α`` of the grid (see the module
    docstring); the detail names the ``α`` that fits, or the closest miss."""
    eps = _eps(ref.dtype, cand.dtype, torch.float32)
    parts = []  # per group: (error, distance, cov, original cov, cross, rounding)
    for g in range(ref.groups):
        one = _group(stats, g)
        inputs, original = one.inputs, one.original
        weight, bias = ref.weight[g : g + 1], ref.bias[g]
        error = error_energy(weight, bias, cand.weight[g : g + 1], cand.bias[g], one)
        rounding = (CALIBRATED_ROUNDING * eps) ** 2 * max(rank_g, 1)
        rounding *= _output_energy(weight, ref.bias[g : g + 1], original)
        cov = inputs.covariance()[0]
        cross = one.cross_covariance()[0]
        distance = float((ref.weight[g] - cand.weight[g]).pow(2).sum())
        parts.append((error, distance, cov, original.covariance()[0], cross, rounding))
    closest = (math.inf, 0.0)
    for alpha in SHRINKAGE_GRID[:-1]:  # α = 1 is the data-free optimum, checked before
        excess = scale = 0.0
        for g, (error, distance, cov, orig_cov, cross, rounding) in enumerate(parts):
            w_t = ref.weight[g].T
            dim = cov.shape[0]
            tau = float(torch.trace(cov)) / dim
            anchor = alpha * tau + (RIDGE * tau if tau > 0 else 1.0)
            c = (1 - alpha) * float(
                torch.einsum("md,de,me->", ref.weight[g], orig_cov, ref.weight[g])
            )
            c += anchor * float(w_t.pow(2).sum())
            eye = torch.eye(dim, dtype=cov.dtype)
            factor, info = linalg.cholesky_ex((1 - alpha) * cov + anchor * eye)
            if int(info) != 0:
                break
            target = (1 - alpha) * (cross @ w_t) + anchor * w_t
            z = torch.linalg.solve_triangular(factor, target, upper=False)
            gram = z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T
            top = linalg.eigvalsh((gram + gram.T) / 2).flip(0)[:rank_g].clamp_min(0)
            value = (1 - alpha) * error + anchor * distance
            excess += value - (c - float(top.sum())) - SHRUNK_SLACK * c - rounding
            scale += c
        else:
            relative = _relative(max(excess, 0.0), scale)
            if excess <= 0:
                what = "propagated " if isinstance(stats, PairedMoments) else ""
                return True, f"the {what}optimum at shrinkage {alpha:g}", 0.0
            closest = min(closest, (relative, alpha))
    return False, f"closest: shrinkage {closest[1]:g}, {closest[0]:.3g} above", closest[0]


def _output_energy(weight: torch.Tensor, bias: torch.Tensor, moments: InputMoments) -> float:
    """``Σ_n ‖W x_n + b‖²`` over the inputs summarised by ``moments``, per group, summed."""
    quadratic = torch.einsum("gmd,gde,gme->", weight, moments.xtx, weight)
    cross = 2 * torch.einsum("gm,gmd,gd->", bias, weight, moments.xsum)
    return float(quadratic + cross + moments.count * bias.pow(2).sum())


def _whitened_eigenvalues(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending) of ``W (C + λI) Wᵀ`` with the solver's ridge ``λ``."""
    dim = cov.shape[0]
    trace = float(torch.trace(cov))
    lam = RIDGE * trace / dim if trace > 0 and math.isfinite(trace) else 1.0
    regular = cov + lam * torch.eye(dim, dtype=cov.dtype)
    if weight.shape[0] <= dim:
        matrix = weight @ regular @ weight.T
    else:  # the D×D form C^½ WᵀW C^½ has the same nonzero eigenvalues
        values, vectors = linalg.eigh(regular)
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        matrix = root @ weight.T @ weight @ root
    return linalg.eigvalsh((matrix + matrix.T) / 2).flip(0).clamp_min(0)


def _tensor_view(weight: torch.Tensor, layer: TensorizedLinear) -> torch.Tensor:
    """The reference weight as the layer's tensor (TT / blockTT: modes in core order)."""
    structure = layer.structure
    shapes = [tuple(f.shape) for f in layer.factors]
    if shapes != [shape for shape, _ in structure.factors()]:
        raise _Malformed(f"factor shapes {shapes} do not match the layer's structure")
    tensor = weight.T.reshape(*structure.in_modes, *structure.out_modes)
    if structure.format == "tucker":
        return tensor
    names = structure.mode_names
    return tensor.permute([names.index(m) for g in structure.core_groups() for m in g])


def _tt_svd_error(tensor: torch.Tensor, dims: list[int], bonds: list[int]) -> float:
    """Squared error of the exact TT-SVD (float64 SVDs) of ``tensor``, cores of ``dims`` entries
    (per core, its modes merged) and bond sizes ``bonds``: each split keeps the leading singular
    directions of the remainder; the discarded parts are orthogonal, so their energies add."""
    error, rest, left = 0.0, tensor.reshape(-1), 1
    for dim, bond in zip(dims[:-1], bonds, strict=True):
        _, s, vh = torch.linalg.svd(rest.reshape(left * dim, -1), full_matrices=False)
        error += float((s[bond:] ** 2).sum())
        rest, left = s[:bond, None] * vh[:bond], min(bond, s.numel())
    return error


def _hosvd_error(tensor: torch.Tensor, ranks: tuple[int, ...]) -> float:
    """Squared error of the exact HOSVD of ``tensor`` at ``ranks``: each mode projected on the
    leading left singular vectors of its unfolding (orthonormal: error = ‖T‖² − ‖core‖²)."""
    core = tensor
    for mode, rank in enumerate(ranks):
        unfolded = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
        basis = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]
        core = torch.tensordot(core, basis, dims=([mode], [0])).movedim(-1, mode)
    return max(float(tensor.pow(2).sum() - core.pow(2).sum()), 0.0)


def _tensor_reference_error(weight: torch.Tensor, layer: TensorizedLinear) -> float:
    """What the textbook algorithm for the layer's format reaches at its ranks: TT-SVD (TT,
    blockTT) or HOSVD (Tucker; the layer's HOOI sweeps only improve on it)."""
    tensor = _tensor_view(weight, layer)
    structure = layer.structure
    if structure.format == "tucker":
        return _hosvd_error(tensor, tuple(layer.factors[0].shape))
    sizes = structure.mode_sizes
    dims = [math.prod(sizes[m] for m in group) for group in structure.core_groups()]
    return _tt_svd_error(tensor, dims, [f.shape[-1] for f in layer.factors][:-1])


def _tensorized(ref: Affine, cand: Affine, layer: TensorizedLinear) -> tuple[bool, str, float]:
    """Whether a TT / blockTT / Tucker layer is as close as the textbook algorithm gets."""
    weight = ref.weight[0]
    reached = _tensor_reference_error(weight, layer)
    energy = float(weight.pow(2).sum())
    error = float((weight - cand.weight[0]).pow(2).sum())
    eps = _eps(ref.dtype, cand.dtype)
    rounding = ROUNDING * len(layer.factors) * eps * math.sqrt(energy)
    allowed = (math.sqrt(reached * (1 + TENSOR_RTOL)) + rounding) ** 2
    bias = _bias_check(ref, cand, eps)
    algorithm = "HOSVD" if layer.structure.format == "tucker" else "TT-SVD"
    detail = (
        f"‖W − Ŵ‖² = {_relative(error, energy):.4g} of ‖W‖², the exact {algorithm} at ranks "
        f"{layer.rank} reaches {_relative(reached, energy):.4g}"
    )
    detail += f"; {bias}" if bias else ""
    return error <= allowed and not bias, detail, _relative(max(error - allowed, 0.0), energy)


def _reference_layer(reference: nn.Module, name: str) -> nn.Module | None:
    try:
        return reference.get_submodule(name)
    except AttributeError:
        return None


def _uncheckable(name: str, moments: dict[str, InputMoments] | None, missed: str) -> Verdict | None:
    """The verdict on a layer that is not the data-free ``missed`` when calibration cannot decide
    (none given, or none reaches the layer); ``None`` when it can."""
    if moments is None:
        why = f"not the data-free {missed}; a calibrated layer needs calibration="
        return Verdict(name, "unverifiable", why, needs_calibration=True)
    if name not in moments:
        why = f"not the data-free {missed}, and no calibration batch reaches the layer"
        return Verdict(name, "unverifiable", why)
    return None


def _judge(
    name: str,
    layer: nn.Module,
    reference: nn.Module,
    moments: dict[str, InputMoments] | None,
    paired: dict[str, PairedMoments] | None = None,
) -> Verdict:
    """One layer's verdict; ``moments`` is ``None`` without calibration; ``paired`` (the
    candidate's inputs of its layers paired with the reference's) when already collected."""
    ref_layer = _reference_layer(reference, name)
    if ref_layer is layer:
        return Verdict(name, "shared", "the reference holds this very module")
    ref = None if ref_layer is None else reference_affine(ref_layer)
    if ref is None:
        what = "no layer" if ref_layer is None else f"a {type(ref_layer).__name__}"
        why = f"the reference has {what} at {name!r} to compare it with"
        return Verdict(name, "unverifiable", f"{why} (a layer made from a functional call?)")
    if isinstance(layer, STRUCTURED_CONVS):
        return _judge_structured(name, layer, ref, ref_layer, moments, paired)
    try:
        cand, rank, substitute = _candidate_map(layer, ref)
    except _Malformed as error:
        return Verdict(name, "fault", f"malformed {type(layer).__name__}: {error}", excess=math.inf)
    verified = Verdict(name, "verified", reference=ref_layer, substitute=substitute)
    if isinstance(layer, TensorizedLinear):
        return _judge_tensorized(verified, ref, cand, layer)
    fits, detail, excess = _data_free(ref, cand, rank)
    if fits:
        return dataclasses.replace(verified, how="data-free", detail=detail)
    unchecked = _uncheckable(name, moments, f"optimum ({detail})")
    if unchecked is not None:
        return unchecked
    fits, cal_detail, cal_excess = _calibrated(ref, cand, rank, moments[name])
    if fits:
        return dataclasses.replace(verified, how="calibration", detail=cal_detail)
    fits, shrunk_detail, shrunk_excess = _shrunk(ref, cand, rank, moments[name])
    if fits:
        return dataclasses.replace(verified, how="calibration", detail=shrunk_detail)
    if paired is not None and name in paired:
        fits, paired_detail, paired_excess = _shrunk(ref, cand, rank, paired[name])
        if fits:
            return dataclasses.replace(verified, how="propagated calibration", detail=paired_detail)
        detail = (
            f"neither the data-free optimum ({detail}), nor the calibrated one ({cal_detail}; "
            f"shrunk: {shrunk_detail}), nor the error-propagating one ({paired_detail})"
        )
        return Verdict(name, "fault", detail, excess=min(excess, cal_excess, paired_excess))
    detail = f"neither the data-free optimum ({detail}) nor the calibrated one ({cal_detail})"
    return Verdict(
        name, "fault", detail, excess=min(excess, cal_excess, shrunk_excess), needs_pairs=True
    )


def _judge_structured(
    name: str,
    layer: nn.Module,
    ref: Affine,
    ref_layer: nn.Module,
    moments: dict[str, InputMoments] | None,
    paired: dict[str, PairedMoments] | None,
) -> Verdict:
    """A spatial-SVD or Tucker-2 layer's verdict (see :mod:`fxfactorize.structured_bounds`)."""
    try:
        weight, bias, substitute = structured_map(layer, ref.conv)
    except ValueError as error:
        return Verdict(name, "fault", f"malformed {type(layer).__name__}: {error}", excess=math.inf)
    verified = Verdict(name, "verified", reference=ref_layer, substitute=substitute)
    reference = ref.weight[0].reshape(weight.shape)
    dtype = next(layer.parameters()).dtype
    energy = float(reference.pow(2).sum())
    error = float((reference - weight).pow(2).sum())
    allowed = data_free_bound(reference, layer, dtype)
    bias_differs = _bias_check(ref, Affine(ref.weight, bias[None], dtype), _eps(ref.dtype, dtype))
    detail = (
        f"‖W − Ŵ‖² = {_relative(error, energy):.4g} of ‖W‖², the data-free {layer.structure} "
        f"reaches {_relative(allowed, energy):.4g}" + (f"; {bias_differs}" if bias_differs else "")
    )
    if error <= allowed and not bias_differs:
        return dataclasses.replace(verified, how="data-free", detail=detail)
    unchecked = _uncheckable(name, moments, f"solution ({detail})")
    if unchecked is not None:
        return unchecked
    grouped = (ref.weight, ref.bias[0], weight.reshape(ref.weight.shape), bias)
    failures = []
    for how, stats in (("calibration", moments[name]), ("propagated calibration", None)):
        stats = stats if stats is not None else (paired or {}).get(name)
        if stats is None:
            continue
        reached = error_energy(*grouped, stats)
        bound = calibrated_bound(reference, ref.bias[0], layer, stats)
        what = f"error on the {how} data {reached:.4g}, the data-free solution's {bound:.4g}"
        if reached <= bound:
            return dataclasses.replace(verified, how=how, detail=what)
        failures.append((what, _relative(reached - bound, bound)))
    summary = "; ".join(what for what, _ in failures)
    return Verdict(
        name,
        "fault",
        f"neither the data-free solution ({detail}) nor better on calibration ({summary})",
        excess=min(excess for _, excess in failures),
        needs_pairs=paired is None,
    )


def _judge_tensorized(
    verified: Verdict, ref: Affine, cand: Affine, layer: TensorizedLinear
) -> Verdict:
    name = verified.name
    if layer.structure.format == "cp":
        why = "a CP layer has no computable optimum (ALS)"
        return Verdict(name, "unverifiable", why)
    try:
        fits, detail, excess = _tensorized(ref, cand, layer)
    except _Malformed as error:
        return Verdict(name, "fault", f"malformed tensorized layer: {error}", excess=math.inf)
    if fits:
        return dataclasses.replace(verified, how=f"{layer.structure.format} bound", detail=detail)
    return Verdict(name, "fault", f"worse than the textbook decomposition: {detail}", excess=excess)


def _rows(ref: Affine, x: torch.Tensor) -> Iterable[torch.Tensor]:
    """The input rows ``x_n`` a layer's map sees (patches under the kernel for a convolution)."""
    conv = ref.conv
    if conv is None:
        return [x.reshape(-1, ref.weight.shape[2])]
    geometry = {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "padding_mode")}
    return conv_patch_rows(x, tuple(conv.kernel_size), **geometry)


def collect_moments(
    reference: nn.Module,
    names: list[str],
    batches: Iterable[Any],
    call: Callable[[nn.Module, Any], Any],
) -> dict[str, InputMoments]:
    """Input moments of the reference layers ``names`` while ``call(reference, batch)`` runs over
    ``batches`` (the caller puts the model in eval mode under ``torch.no_grad()``): every call of a
    layer counts, as the calibration pass counts every call site.

    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    >>> m = collect_moments(model, ["0"], [torch.ones(4, 3)], lambda mod, x: mod(x))
    >>> m["0"].count, float(m["0"].xsum[0, 0])
    (4, 4.0)
    """
    moments: dict[str, InputMoments] = {}

    def hook_for(name: str, ref: Affine) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if not bool(torch.isfinite(x).all()):
                raise _NonFiniteInput(
                    f"calibration gives NaN or Inf at the input of layer {name!r}"
                )
            stats = moments.setdefault(name, InputMoments.zeros(ref.weight.shape[2], ref.groups))
            for rows in _rows(ref, x.detach().cpu()):
                accumulate_rows(stats, rows)

        return hook

    handles = []
    for name in names:
        module = reference.get_submodule(name)
        hook = hook_for(name, reference_affine(module))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    seen = 0
    try:
        for index, batch in enumerate(batches):
            try:
                call(reference, batch)
            except _NonFiniteInput:
                raise
            except Exception as error:
                raise CalibrationError(index, f"{type(error).__name__}: {error}") from error
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("calibration has no batches")
    return moments


def verify_layers(
    reference: nn.Module,
    candidate: nn.Module,
    calibration: Iterable[Any] | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
) -> list[Verdict]:
    """A :class:`Verdict` for every factorized layer of ``candidate`` (see the module docstring).

    ``calibration`` (batches, run through ``reference`` with ``call(reference, batch)``; the caller
    puts it in eval mode under ``torch.no_grad()``) is run only if some layer is not the data-free
    optimum.

    >>> from fxfactorize.modules.factorized import FactorizedLinear
    >>> layer = nn.Linear(16, 16)
    >>> pair = FactorizedLinear.from_linear(layer, latent_features=4)
    >>> [(v.status, v.how) for v in verify_layers(nn.Sequential(layer), nn.Sequential(pair))]
    [('verified', 'data-free')]
    >>> with torch.no_grad():
    ...     _ = pair.module1.bias.add_(1.0)
    >>> verify_layers(nn.Sequential(layer), nn.Sequential(pair))[0].status
    'unverifiable'
    """
    layers = factorized_layers(candidate)
    verdicts = [_judge(name, layer, reference, None) for name, layer in layers]
    pending = [v.name for v in verdicts if v.needs_calibration]
    if calibration is None or not pending:
        return verdicts
    call = call or (lambda m, b: m(b))
    if iter(calibration) is calibration:  # a one-shot iterator: the pairs need a second pass
        calibration = list(calibration)
    moments = collect_moments(reference, pending, calibration, call)
    modules = dict(layers)
    verdicts = [
        _judge(v.name, modules[v.name], reference, moments) if v.name in pending else v
        for v in verdicts
    ]
    retry = [v.name for v in verdicts if v.needs_pairs]
    if not retry:
        return verdicts
    paired = collect_paired(reference, candidate, retry, calibration, call)
    return [
        _judge(v.name, modules[v.name], reference, moments, paired) if v.name in retry else v
        for v in verdicts
    ]


def collect_paired(
    reference: nn.Module,
    candidate: nn.Module,
    names: list[str],
    batches: Iterable[Any],
    call: Callable[[nn.Module, Any], Any],
) -> dict[str, PairedMoments]:
    """Per layer of ``names``: the inputs the *candidate* gives its layer (``x′``), paired call by
    call with those the reference gives its own (``x``), over ``batches`` (each runs through both).

    >>> import copy
    >>> reference = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> candidate = copy.deepcopy(reference)
    >>> m = collect_paired(reference, candidate, ["2"], [torch.ones(4, 3)], lambda mod, x: mod(x))
    >>> m["2"].count, bool(torch.equal(m["2"].cross, m["2"].inputs.xtx))
    (4, True)
    """
    paired: dict[str, PairedMoments] = {}
    captured: dict[str, dict[str, list[torch.Tensor]]] = {"reference": {}, "candidate": {}}

    def hook_for(side: str, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if not bool(torch.isfinite(x).all()):
                raise _NonFiniteInput(
                    f"calibration gives NaN or Inf at the input of layer {name!r}"
                )
            captured[side].setdefault(name, []).append(x.detach().cpu())

        return hook

    handles = []
    for side, model in (("reference", reference), ("candidate", candidate)):
        for name in names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(hook_for(side, name), with_kwargs=True))
    try:
        for index, batch in enumerate(batches):
            for side in captured.values():
                side.clear()
            try:
                call(reference, batch)
                call(candidate, batch)
            except _NonFiniteInput:
                raise
            except Exception as error:
                raise CalibrationError(index, f"{type(error).__name__}: {error}") from error
            for name in names:
                ref = reference_affine(reference.get_submodule(name))
                pairs = zip(
                    captured["candidate"].get(name, []),
                    captured["reference"].get(name, []),
                    strict=False,
                )
                for x_prime, x in pairs:
                    stats = paired.setdefault(
                        name, PairedMoments.zeros(ref.weight.shape[2], ref.groups)
                    )
                    for rows, original in zip(_rows(ref, x_prime), _rows(ref, x), strict=True):
                        stats.update(rows, original)
    finally:
        for handle in handles:
            handle.remove()
    return paired
