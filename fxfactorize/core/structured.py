"""Closed-form solvers of the two other conv structures: spatial SVD and Tucker-2.

A conv weight ``W [out, in, *kernel]`` acts on patches ``x [in · prod(kernel)]`` (channel-major,
see :mod:`fxfactorize.core.patches`), so every structure is judged by its *effective weight*
``Ŵ [out, in · prod(kernel)]``, exactly as the rank-r pair is:

* **spatial SVD** (2-d kernels): ``Ŵ[o, c, h, w] = Σ_r B[o, r, w] A[r, c, h]``, a rank-r matrix once
  ``W`` is laid out as ``[(o, w), (c, h)]``; its truncated SVD is the data-free optimum.
* **Tucker-2**: ``Ŵ[o, c, k] = Σ U[o, j] G[j, i, k] V[i, c]``; HOSVD on the out/in modes, then HOOI
  sweeps (each only raises ``‖G‖²``, so only lowers the error).

The data-aware solve (:func:`refine`) minimises the calibrated objective of the pair's solver
(``tr(ΔŴ C ΔŴᵀ)`` with the same ridge, shrinkage and error-propagating cross term) by alternating
exact minimisations over one factor at a time (conjugate gradients on that factor's quadratic),
started from the data-free solution: no step raises the objective, so it never ends worse than
data-free on the calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fxfactorize.core.lowrank import RIDGE, shrunk_problem, top_singular_pair
from fxfactorize.core.moments import Statistics

__all__ = [
    "hosvd_error",
    "refine",
    "spatial_factors",
    "spatial_matrix",
    "spatial_weight",
    "tucker2_factors",
    "tucker2_weight",
]

#: HOOI sweeps after the HOSVD (each costs two SVDs of an unfolding; 3 reach the fixed point to
#: well under 1e-6 of ‖W‖² on the conv weights measured, from a HOSVD start).
HOOI_SWEEPS = 3


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``W [out, in, K_h, K_w]`` laid out as ``[out · K_w, in · K_h]``: the spatial structure is a
    rank bound on it.

    >>> tuple(spatial_matrix(torch.zeros(4, 3, 5, 2)).shape)
    (8, 15)
    """
    out, channels, kh, kw = weight.shape
    return weight.permute(0, 3, 1, 2).reshape(out * kw, channels * kh)


def spatial_weight(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Effective ``[out, in, K_h, K_w]`` weight of ``first [r, in, K_h, 1]`` then ``second [out, r, 1, K_w]``.

    >>> a, b = torch.randn(2, 3, 5, 1), torch.randn(4, 2, 1, 7)
    >>> tuple(spatial_weight(a, b).shape)
    (4, 3, 5, 7)
    """
    return torch.einsum("rch,orw->ochw", first[..., 0], second[:, :, 0, :])


def spatial_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data-free optimum at ``rank``: ``(first [r, in, K_h, 1], second [out, r, 1, K_w])``, in
    float64, from the truncated SVD of :func:`spatial_matrix` (no closer ``Ŵ`` of that structure).

    >>> a, b = torch.randn(2, 3, 5, 1), torch.randn(4, 2, 1, 7)
    >>> w = spatial_weight(a, b).double()
    >>> first, second = spatial_factors(w, 2)
    >>> bool(torch.allclose(spatial_weight(first, second), w))
    True
    """
    out, channels, kh, kw = weight.shape
    left, right, _ = top_singular_pair(spatial_matrix(weight.to(torch.float64)), rank)
    second = left.reshape(out, kw, rank).permute(0, 2, 1).unsqueeze(2)
    first = right.reshape(rank, channels, kh).unsqueeze(3)
    return first.contiguous(), second.contiguous()


def tucker2_weight(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Effective weight of ``first [r₁, in]``, ``core [r₂, r₁, *kernel]`` and ``last [out, r₂]``.

    >>> tuple(tucker2_weight(torch.ones(2, 5), torch.ones(3, 2, 3, 3), torch.ones(4, 3)).shape)
    (4, 5, 3, 3)
    """
    return torch.einsum("oj,ji...,ic->oc...", last, core, first)


def _leading(unfolded: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis ``[n, rank]`` of the leading left singular space of ``unfolded`` ``[n, m]``."""
    gram = unfolded @ unfolded.T
    _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(1)[:, :rank]


def tucker2_factors(
    weight: torch.Tensor, ranks: tuple[int, int], sweeps: int = HOOI_SWEEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight at ``ranks = (r₁, r₂)`` (in, out): HOSVD, then ``sweeps`` of HOOI.

    Returns ``(first [r₁, in], core [r₂, r₁, *kernel], last [out, r₂])`` in float64 (``first`` and
    ``last`` have orthonormal rows/columns, so ``‖W − Ŵ‖² = ‖W‖² − ‖core‖²``).

    >>> w = tucker2_weight(torch.randn(2, 6), torch.randn(3, 2, 3, 3), torch.randn(5, 3)).double()
    >>> bool(torch.allclose(tucker2_weight(*tucker2_factors(w, (2, 3))), w))
    True
    """
    w = weight.to(torch.float64)
    out, channels = w.shape[:2]
    r1, r2 = ranks
    in_basis = _leading(w.transpose(0, 1).reshape(channels, -1), r1)  # [in, r₁]
    out_basis = _leading(w.reshape(out, -1), r2)  # [out, r₂]
    for _ in range(sweeps):
        projected = torch.einsum("oc...,ci->oi...", w, in_basis)
        out_basis = _leading(projected.reshape(out, -1), r2)
        projected = torch.einsum("oc...,oj->cj...", w, out_basis)
        in_basis = _leading(projected.reshape(channels, -1), r1)
    core = torch.einsum("oc...,oj,ci->ji...", w, out_basis, in_basis)
    return in_basis.T.contiguous(), core.contiguous(), out_basis.contiguous()


def hosvd_error(weight: torch.Tensor, ranks: Sequence[tuple[int, int]]) -> list[float]:
    """``‖W − Ŵ‖² / ‖W‖²`` of the HOSVD (no HOOI) at each ``(r₁, r₂)`` of ``ranks``, from one pair of
    eigendecompositions: the solve's HOOI sweeps only lower it.

    >>> w = tucker2_weight(torch.randn(2, 6), torch.randn(3, 2, 3, 3), torch.randn(5, 3)).double()
    >>> [round(e, 9) for e in hosvd_error(w, [(2, 3), (6, 5)])]
    [0.0, 0.0]
    """
    w = weight.to(torch.float64)
    out, channels = w.shape[:2]
    in_basis = _leading(w.transpose(0, 1).reshape(channels, -1), channels)
    out_basis = _leading(w.reshape(out, -1), out)
    rotated = torch.einsum("oc...,oj,ci->ji...", w, out_basis, in_basis)
    energy = rotated.pow(2).reshape(out, channels, -1).sum(-1)  # [out rank, in rank]
    kept = energy.cumsum(0).cumsum(1)
    total = float(w.pow(2).sum())
    if total <= 0:
        return [0.0 for _ in ranks]
    return [max(total - float(kept[r2 - 1, r1 - 1]), 0.0) / total for r1, r2 in ranks]


def refine(
    weight: torch.Tensor,
    factors: list[torch.Tensor],
    expand: Callable[..., torch.Tensor],
    moments: Statistics,
    shrinkage: float = 0.0,
    sweeps: int = 4,
    steps: int = 25,
    ridge: float = RIDGE,
) -> list[torch.Tensor]:
    """``factors`` improved on the calibration objective by block-coordinate descent.

    ``expand(*factors)`` is the effective weight (multilinear in the factors); the objective is
    ``tr(ΔŴ C ΔŴᵀ) − 2 tr(ΔŴ Tᵀ) + λ‖Ŵ − W‖²`` in the centered statistics of
    :func:`~fxfactorize.core.lowrank.shrunk_problem` (``C`` the inputs' scatter, ``T`` the target's
    cross term), which is what the pair's reduced-rank regression minimises. Each sweep minimises
    it over each factor in turn, the others fixed: a convex quadratic, solved by ``steps``
    conjugate-gradient steps from the current value (monotone: never worse than the start).

    >>> from fxfactorize.core.moments import InputMoments
    >>> m = InputMoments.zeros(4); m.update(torch.randn(64, 4))
    >>> w = torch.randn(3, 4, dtype=torch.float64)
    >>> start = [torch.full((3, 2), 0.1, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)]
    >>> b, a = refine(w, start, lambda b, a: b @ a, m)
    >>> c = m.covariance()[0]
    >>> def error(b, a): return float(torch.trace((w - b @ a) @ c @ (w - b @ a).T))
    >>> error(b, a) < error(*start)
    True
    """
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    cov, cross = shrunk_problem(moments, w.T, 0, shrinkage)
    dim = cov.shape[0]
    trace = float(torch.trace(cov))
    lam = ridge * trace / dim if trace > 0 else 1.0
    c = cov + lam * torch.eye(dim, dtype=cov.dtype, device=cov.device)
    target = (cov @ w.T if cross is None else cross).T + lam * w  # [out, D]
    factors = [f.detach().to(torch.float64).clone() for f in factors]
    for _ in range(sweeps):
        for index in range(len(factors)):
            factors[index] = _block_cg(factors, index, expand, c, target, steps)
    return factors


def _block_cg(
    factors: list[torch.Tensor],
    index: int,
    expand: Callable[..., torch.Tensor],
    c: torch.Tensor,
    target: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Minimise the quadratic over ``factors[index]`` by conjugate gradients (others fixed)."""
    out = target.shape[0]

    def linear(block: torch.Tensor) -> torch.Tensor:
        parts = list(factors)
        parts[index] = block
        return expand(*parts).reshape(out, -1)

    x = factors[index]
    # L is linear in the block, so its adjoint is a vector-Jacobian product at any point
    _, adjoint = torch.func.vjp(linear, x)
    residual = adjoint(target - linear(x) @ c)[0]  # −½ gradient
    direction = residual.clone()
    rr = float((residual * residual).sum())
    # converged: the gradient is at float64 noise next to the target's pull on this block
    floor = 1e-26 * float(adjoint(target)[0].pow(2).sum())
    for _ in range(steps):
        if rr <= floor or not math.isfinite(rr):
            break
        hd = adjoint(linear(direction) @ c)[0]
        curvature = float((direction * hd).sum())
        if curvature <= 0:  # flat direction (a factor with an unused component): stop here
            break
        alpha = rr / curvature
        x = x + alpha * direction
        residual = residual - alpha * hd
        new_rr = float((residual * residual).sum())
        direction = residual + (new_rr / rr) * direction
        rr = new_rr
    return x
