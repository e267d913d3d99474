"""Decompositions of a full tensor into the factors of a :class:`Structure`.

TT / blockTT: TT-SVD (exact at full ranks, quasi-optimal otherwise). Tucker: HOSVD then HOOI
sweeps. CP: alternating least squares from an SVD-based start, with momentum, stopped when the
relative error changes by less than ``tol``. All deterministic given ``seed`` (used where CP's
rank exceeds a mode's size and the start needs extra columns, and by the TT range finder).

Precision: a float32 or half-precision tensor, or a float64 one whose entries are all float32
values (a float32 layer cast by the caller), is decomposed in float32, about twice as fast; any
other tensor is decomposed in float64 throughout. In float32, truncations through a
Gram resolve singular values down to ~1e-3 of the largest (relative error ~1e-7 × condition
number), far below the truncation error at any useful rank; CP's normal equations retry in
float64 where a float32 Cholesky fails, and a CP fit closer than float32 can measure (relative
error < 1e-3) is finished in float64. Factors are returned in float64 either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fxfactorize.tensorized.structure import Structure

__all__ = ["decompose"]

# TT-SVD steps on unfoldings at least this large on both sides, with a bond at most
# 1/_KRYLOV_RATIO of the smaller side, use a randomized block Krylov range finder: a full
# eigendecomposition of a 1024² Gram costs ~4x more, and the Krylov space (~3.4 bonds wide)
# keeps the truncation error within ~0.3 % of the exact SVD's even on flat (random) spectra.
_KRYLOV_MIN = 512
_KRYLOV_RATIO = 7
_KRYLOV_WIDTH_DIV = 3  # blocks of rank / 3 columns, 10 of them (measured: the best error per ms)
_KRYLOV_DEPTH = 9
_KRYLOV_EXHAUSTED = 1e-3  # see _krylov_split
# CP momentum (Nesterov-style extrapolation between ALS sweeps, restarted when a sweep from the
# extrapolated point does worse): about 40 % fewer sweeps for the same error at rank 410.
_BETA_START, _BETA_STEP, _BETA_MAX = 0.5, 0.1, 1.0
_CP_SWEEPS = 30  # rank 410 of a random 256²: error² 0.511 (50 plain sweeps: 0.518)
# Below this relative error, float32 inner products no longer resolve the error (~1e-4): a
# near-exact CP fit is refined in float64 from there.
_CP_FLOAT32_FLOOR = 1e-3


def decompose(tensor: torch.Tensor, structure: Structure, **kwargs: object) -> list[torch.Tensor]:
    """Factors of ``structure`` approximating ``tensor`` (shape: ``structure``'s modes).

    ``kwargs``: ``n_iter_max`` (HOOI sweeps, default 1; CP-ALS sweeps, default 30: with momentum
    they fit better than 50 plain ALS sweeps), ``tol`` (stop when the relative error changes by
    less, default 1e-8), ``seed`` (CP start, TT range finder; default 0), ``init`` (accepted for
    TensorLy-Torch compatibility; the start is always SVD-based).

    >>> from fxfactorize.tensorized.contract import contract
    >>> s = Structure("tucker", (3, 4), (4, 3), 1, (3, 4, 4, 3))
    >>> t = torch.randn(3, 4, 4, 3, dtype=torch.float64)
    >>> core, *fs = decompose(t, s)
    >>> float((contract([core, *fs], [f[1] for f in s.factors()], s.mode_names) - t).norm()) < 1e-9
    True
    """
    unknown = set(kwargs) - {"n_iter_max", "tol", "seed", "init"}
    if unknown:
        raise ValueError(f"decomposition_kwargs has unknown option(s): {sorted(unknown)}")
    # float32 / half weights are exact in float32; float64 ones only when their values are
    work = _work_tensor(tensor) if tensor.dtype == torch.float64 else tensor.to(torch.float32)
    seed = int(kwargs.get("seed", 0))
    tol = float(kwargs.get("tol", 1e-8))
    if structure.format in ("tt", "blocktt"):
        factors = _tt_svd(work, structure, seed)
    elif structure.format == "tucker":
        factors = _tucker(work, structure, int(kwargs.get("n_iter_max", 1)), tol)
    else:
        factors = _cp_als(work, structure, int(kwargs.get("n_iter_max", _CP_SWEEPS)), tol, seed)
    return [f.to(torch.float64) for f in factors]


def _work_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (float64) in float32 when that loses nothing, else unchanged."""
    narrow = tensor.to(torch.float32)
    return narrow if torch.equal(narrow.to(torch.float64), tensor) else tensor


# ----------------------------------------------------------------------------------------- TT


def _tt_svd(tensor: torch.Tensor, structure: Structure, seed: int) -> list[torch.Tensor]:
    names = structure.mode_names
    groups = structure.core_groups()
    order = [names.index(m) for g in groups for m in g]
    work = tensor.permute(order)  # blockTT: (l, i0, o0, i1, o1, ...)
    sizes = structure.mode_sizes
    dims = [math.prod(sizes[m] for m in g) for g in groups]
    generator = torch.Generator().manual_seed(seed)
    cores, left = [], 1
    rest = work.reshape(-1)
    for k, dim in enumerate(dims[:-1]):
        rank = structure.ranks[k + 1]
        u, rest = _split(rest.reshape(left * dim, -1), rank, generator)
        cores.append(u.reshape(left, *(sizes[m] for m in groups[k]), rank))
        left = rank
    cores.append(rest.reshape(left, *(sizes[m] for m in groups[-1]), 1))
    return cores


def _split(
    matrix: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, rest)`` with ``u`` (``[m, rank]``) orthonormal columns (or zero ones) spanning the
    leading left singular space and ``u @ rest`` the projection of ``matrix`` onto it."""
    m, n = matrix.shape
    if rank >= m:  # the whole column space fits the bond: an identity split is exact
        u = torch.eye(m, rank, dtype=matrix.dtype)
        return u, matrix if rank == m else torch.cat([matrix, matrix.new_zeros(rank - m, n)])
    if min(m, n) >= _KRYLOV_MIN and rank * _KRYLOV_RATIO <= min(m, n):
        return _krylov_split(matrix, rank, generator)
    if m <= n:
        u = _leading_vectors(matrix, rank)
        return u, u.T @ matrix
    return _split_tall(matrix, rank)


def _split_tall(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_split` through the small ``[n, n]`` Gram: ``u = M V / s``, ``rest = s Vᵀ``, so
    ``u @ rest = M V Vᵀ`` is an exact projection even where ``u`` is only nearly orthonormal."""
    m, n = matrix.shape
    v = _leading_vectors(matrix.T, min(rank, n))
    b = matrix @ v
    s = b.norm(dim=0)
    u = b / torch.where(s > 0, s, torch.ones_like(s))  # exactly null directions stay zero
    rest = s[:, None] * v.T
    if rank > n:  # bond larger than the matrix rank allows: pad with zeros
        u = torch.cat([u, u.new_zeros(m, rank - n)], 1)
        rest = torch.cat([rest, rest.new_zeros(rank - n, n)])
    return u, rest


def _krylov_split(
    matrix: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_split` within the block Krylov space ``[MΩ, (MMᵀ)MΩ, ..., (MMᵀ)^q MΩ]`` of a
    Gaussian ``Ω`` with ``rank / 3`` columns (Musco & Musco 2015: far closer to the exact
    truncation than a subspace iteration of the same cost). Block Lanczos with full
    reorthogonalization: each block is made orthogonal to the previous ones as it is built, so the
    rows ``blockᵀ M`` computed along the way already form ``basisᵀ M``. Where the space runs out
    (a block numerically inside the previous ones: ``M`` of low rank), that orthogonality is lost,
    and one Householder QR of the whole basis restores it."""
    m, n = matrix.shape
    width = -(-rank // _KRYLOV_WIDTH_DIV)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(matrix.dtype)
    basis = matrix.new_empty(m, width * (_KRYLOV_DEPTH + 1))
    block = torch.linalg.qr(matrix @ omega).Q
    rows, exhausted = [], False
    for j in range(_KRYLOV_DEPTH + 1):
        basis[:, j * width : (j + 1) * width] = block
        rows.append(block.T @ matrix)
        if j == _KRYLOV_DEPTH:
            break
        done = basis[:, : (j + 1) * width]
        x = matrix @ rows[-1].T
        x = x - done @ (done.T @ x)
        scale = float(x.norm(dim=0).max())
        x = x - done @ (done.T @ x)  # twice: orthogonal to working precision (Kahan-Parlett)
        block, r = torch.linalg.qr(x)
        # QR divides by r's diagonal: where it is tiny against the block, rounding along the
        # previous blocks dominates the new columns (measured: ≤ 1e-5 there, ≥ 1e-4 otherwise)
        exhausted |= not float(r.diagonal().abs().min()) > _KRYLOV_EXHAUSTED * scale
    if exhausted:
        basis = torch.linalg.qr(basis).Q
        small = basis.T @ matrix
    else:
        small = torch.cat(rows)  # basisᵀ M
    w = _leading_vectors(small, rank)
    return basis @ w, w.T @ small


def _leading_vectors(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading left singular vectors of a wide ``matrix`` (via its small Gram)."""
    values, vectors = torch.linalg.eigh(matrix @ matrix.T)
    return vectors.flip(1)[:, :count]


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _balanced_split(shape: Sequence[int]) -> list[list[int]]:
    """Modes in two contiguous halves of similar total size."""
    n = len(shape)
    split = min(range(1, n), key=lambda k: abs(math.prod(shape[:k]) - math.prod(shape[k:])))
    return [list(range(split)), list(range(split, n))]


# ------------------------------------------------------------------------------------- Tucker


def _tucker(
    tensor: torch.Tensor, structure: Structure, n_iter: int, tol: float
) -> list[torch.Tensor]:
    """HOSVD, then HOOI sweeps. Each sweep projects the tensor once per half of the modes: the
    modes of one half are updated from the tensor already projected on the other half's
    factors, which is what HOOI's mode-by-mode updates would recompute each time."""
    n = tensor.dim()
    ranks = structure.ranks
    factors = [_leading_vectors(_unfold(tensor, m), r) for m, r in enumerate(ranks)]
    halves = _balanced_split(tensor.shape) if n > 1 else [[0], []]
    norm = float(tensor.norm())
    previous = None
    core = None
    for _ in range(n_iter):
        for side, other in ((0, 1), (1, 0)):
            partial = _project(tensor, factors, halves[other])
            for m in halves[side]:
                projected = _project(partial, factors, [k for k in halves[side] if k != m])
                factors[m] = _leading_vectors(_unfold(projected, m), ranks[m])
        core = _project(partial, factors, halves[1])  # partial: projected on halves[0] already
        error = math.sqrt(max(0.0, norm**2 - float(core.norm()) ** 2)) / max(norm, 1e-300)
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    if core is None:
        core = _project(tensor, factors, range(n))
    return [core, *factors]


def _project(
    tensor: torch.Tensor, factors: list[torch.Tensor], modes: Sequence[int]
) -> torch.Tensor:
    """``tensor`` with each mode in ``modes`` replaced by its coordinates on that mode's factor
    (``T ×ₘ Uₘᵀ``); modes already projected keep their (rank-sized) length."""
    for m in modes:
        tensor = _mode_product(tensor, factors[m], m)
    return tensor


def _mode_product(tensor: torch.Tensor, factor: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor ×ₘ factorᵀ`` as one matrix product on a ``[P, n, Q]`` view, never a permuted copy
    of ``tensor``."""
    shape = tensor.shape
    n, rank = factor.shape
    rows = math.prod(shape[:mode])
    if mode == tensor.dim() - 1:  # uᵀ xᵀ: MKL is several times faster on the wide form here
        out = (factor.T @ tensor.reshape(rows, n).T).T.contiguous()
    else:
        out = torch.matmul(factor.T, tensor.reshape(rows, n, -1))  # batched over the rows
    return out.reshape(*shape[:mode], rank, *shape[mode + 1 :])


# ----------------------------------------------------------------------------------------- CP


def _khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Row-major Khatri-Rao product of a few factors ``[d_k, R]`` → ``[prod d_k, R]``."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _cp_start(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Leading singular vectors of each unfolding, plus scaled Gaussian columns past its size."""
    factors = []
    for m, size in enumerate(tensor.shape):
        lead = _leading_vectors(_unfold(tensor, m), min(rank, size)).to(torch.float64)
        if rank > lead.shape[1]:
            extra = torch.randn(
                size, rank - lead.shape[1], generator=generator, dtype=torch.float64
            )
            lead = torch.cat([lead, extra / math.sqrt(size)], 1)
        factors.append(lead.to(tensor.dtype))
    return factors


def _cp_als(
    tensor: torch.Tensor, structure: Structure, n_iter: int, tol: float, seed: int
) -> list[torch.Tensor]:
    """ALS with momentum. Keeps the last accepted sweep ``(factors, weights, error)``; after each
    accepted sweep the next starts from ``f + β (f - f_prev)``; a sweep that ends worse than the
    last accepted one is discarded and the next restarts from it without momentum. Sweeps run in
    ``tensor``'s dtype, switching to float64 once the error falls below float32's reach."""
    rank = structure.ranks[0]
    shape = tensor.shape
    generator = torch.Generator().manual_seed(seed)
    factors = _cp_start(tensor, rank, generator)
    sides = _balanced_split(shape)
    matrix = tensor.reshape(math.prod(shape[k] for k in sides[0]), -1)
    norm_sq = float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)
    accepted: tuple[list[torch.Tensor], torch.Tensor, float] | None = None
    beta = 0.0
    for _ in range(n_iter):
        weights, error = _cp_sweep(matrix, shape, sides, factors, norm_sq)
        if accepted is not None and error > accepted[2]:
            factors, beta = list(accepted[0]), 0.0  # overshot: back to the last accepted sweep
            continue
        last = accepted
        accepted = (list(factors), weights, error)
        if matrix.dtype != torch.float64 and error < _CP_FLOAT32_FLOOR:
            matrix, factors = matrix.double(), [f.double() for f in factors]
            # float64 errors are the ones to compare from here: accept the next sweep outright
            accepted, beta = (list(factors), weights.double(), math.inf), 0.0
            continue
        if last is not None and abs(last[2] - error) < tol:
            break
        beta = min(_BETA_MAX, beta + _BETA_STEP) if beta else _BETA_START
        if last is not None:
            factors = [f + beta * (f - p) for f, p in zip(factors, last[0], strict=True)]
    if accepted is None:  # no sweep: the start, with unit weights
        accepted = (factors, torch.ones(rank, dtype=tensor.dtype), 0.0)
    factors, weights = list(accepted[0]), accepted[1]
    scale = weights.abs() ** (1.0 / len(shape))  # spread the column weights evenly
    factors[0] = factors[0] * torch.sign(weights)
    return [f * scale for f in factors]


def _cp_sweep(
    matrix: torch.Tensor,
    shape: Sequence[int],
    sides: list[list[int]],
    factors: list[torch.Tensor],
    norm_sq: float,
) -> tuple[torch.Tensor, float]:
    """One ALS sweep over all modes, updating ``factors`` (unit columns) in place of the list.

    The modes are split in two halves: a mode's MTTKRP needs only the Khatri-Rao product of the
    *other* half's factors (one ``[P, Q] @ [Q, R]`` product per half, in ``matrix``'s dtype),
    then small contractions within its own half. Returns the last mode's column weights and the
    relative error of the result, from inner products (the reconstruction is never formed)."""
    rank = factors[0].shape[1]
    small = factors[0].dtype
    grams = [f.T @ f for f in factors]
    gram = torch.empty(rank, rank, dtype=small)  # reused: the normal matrix of each mode
    for side, other in ((0, 1), (1, 0)):
        kr = _khatri_rao([factors[k].to(matrix.dtype) for k in sides[other]])
        half = (matrix if side == 0 else matrix.T) @ kr
        half = half.to(small).reshape(*(shape[k] for k in sides[side]), rank)
        other_gram = _hadamard([grams[k] for k in sides[other]])  # fixed during this half
        for j, m in enumerate(sides[side]):
            mttkrp = _half_mttkrp(half, [factors[k] for k in sides[side]], j)
            _hadamard([other_gram, *(grams[k] for k in sides[side] if k != m)], out=gram)
            updated = _solve_normal(gram, mttkrp)
            weights = (updated * updated).sum(0).sqrt_().clamp_min_(1e-30)
            factors[m] = updated / weights
            grams[m] = factors[m].T @ factors[m]
    fit_sq = float(weights @ (gram * grams[m]) @ weights)
    inner = float((mttkrp * factors[m] * weights).sum())
    error = math.sqrt(max(0.0, norm_sq - 2 * inner + fit_sq)) / max(math.sqrt(norm_sq), 1e-300)
    return weights, error


def _hadamard(matrices: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise product of at least one matrix, into ``out`` (else a new tensor)."""
    if len(matrices) == 1:
        return matrices[0].clone() if out is None else out.copy_(matrices[0])
    out = torch.mul(matrices[0], matrices[1], out=out)
    for g in matrices[2:]:
        out.mul_(g)
    return out


def _half_mttkrp(half: torch.Tensor, side_factors: list[torch.Tensor], j: int) -> torch.Tensor:
    """``half`` (``[d_0, ..., d_s, R]``) contracted with every side factor but the ``j``-th
    (broadcast products and one sum: several times faster than einsum's batched products)."""
    order = len(side_factors)
    weight = None
    for i, f in enumerate(side_factors):
        if i != j:
            f = f.reshape(*(f.shape[0] if k == i else 1 for k in range(order)), f.shape[1])
            weight = f if weight is None else weight * f
    if weight is None:
        return half
    return (half * weight).sum(dim=[i for i in range(order) if i != j])


def _solve_normal(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ gram⁻¹`` in ``gram``'s dtype (``gram`` gets a tiny ridge added in place)."""
    # a tiny ridge keeps the normal equations solvable when columns align
    ridge = 1e-10 * float(gram.diagonal().mean()) + 1e-30
    gram.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(mttkrp.T, chol).T
    wide, rhs = gram.to(torch.float64), mttkrp.T.to(torch.float64)
    if gram.dtype != torch.float64:  # the ridge is below float32 rounding: retry in float64
        wide.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(wide)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol).T.to(gram.dtype)
    return torch.linalg.lstsq(wide, rhs).solution.T.to(gram.dtype)
