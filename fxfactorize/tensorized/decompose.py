"""Decompositions of a full tensor into the factors of a :class:`Structure` (float64 inside).

TT / blockTT: TT-SVD (exact at full ranks, quasi-optimal otherwise). Tucker: HOSVD then HOOI
sweeps. CP: alternating least squares from an SVD-based start, stopped when the relative error
changes by less than ``tol``. All deterministic given ``seed`` (used only where CP's rank exceeds
a mode's size and the start needs extra columns).
"""

from __future__ import annotations

import math

import torch

from fxfactorize.tensorized.contract import contract
from fxfactorize.tensorized.structure import Structure

__all__ = ["decompose"]


def decompose(tensor: torch.Tensor, structure: Structure, **kwargs: object) -> list[torch.Tensor]:
    """Factors of ``structure`` approximating ``tensor`` (shape: ``structure``'s modes).

    ``kwargs``: ``n_iter_max`` (HOOI sweeps, default 1; CP-ALS sweeps, default 50), ``tol`` (stop when
    the relative error changes by less, default 1e-8), ``seed`` (CP).

    >>> s = Structure("tucker", (3, 4), (4, 3), 1, (3, 4, 4, 3))
    >>> t = torch.randn(3, 4, 4, 3, dtype=torch.float64)
    >>> core, *fs = decompose(t, s)
    >>> float((contract([core, *fs], [f[1] for f in s.factors()], s.mode_names) - t).norm()) < 1e-9
    True
    """
    tensor = tensor.to(torch.float64)
    unknown = set(kwargs) - {"n_iter_max", "tol", "seed", "init"}
    if unknown:
        raise ValueError(f"decomposition_kwargs has unknown option(s): {sorted(unknown)}")
    if structure.format in ("tt", "blocktt"):
        return _tt_svd(tensor, structure)
    if structure.format == "tucker":
        return _tucker(
            tensor, structure, int(kwargs.get("n_iter_max", 1)), float(kwargs.get("tol", 1e-8))
        )
    return _cp_als(
        tensor,
        structure,
        int(kwargs.get("n_iter_max", 50)),
        float(kwargs.get("tol", 1e-8)),
        int(kwargs.get("seed", 0)),
    )


def _tt_svd(tensor: torch.Tensor, structure: Structure) -> list[torch.Tensor]:
    names = structure.mode_names
    groups = structure.core_groups()
    order = [names.index(m) for g in groups for m in g]
    work = tensor.permute(order)  # blockTT: (l, i0, o0, i1, o1, ...)
    sizes = structure.mode_sizes
    dims = [math.prod(sizes[m] for m in g) for g in groups]
    cores, left = [], 1
    rest = work.reshape(-1)
    for k, dim in enumerate(dims[:-1]):
        rank = structure.ranks[k + 1]
        u, s, vh = _truncated_svd(rest.reshape(left * dim, -1), rank)
        cores.append(u.reshape(left, *(sizes[m] for m in groups[k]), rank))
        rest = s[:, None] * vh
        left = rank
    cores.append(rest.reshape(left, *(sizes[m] for m in groups[-1]), 1))
    return cores


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """Leading ``rank`` singular triplets through the Gram of the smaller side (float64; only the
    leading part is kept, so squaring the condition number costs nothing that matters), padded
    with zeros where the matrix has fewer."""
    m, n = matrix.shape
    small = min(m, n, rank)
    if m <= n:
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)
        u = vectors.flip(1)[:, :small]
        s = values.flip(0)[:small].clamp_min(0).sqrt()
        vh = (u.T @ matrix) / s.clamp_min(1e-300)[:, None]
    else:
        values, vectors = torch.linalg.eigh(matrix.T @ matrix)
        vh = vectors.flip(1)[:, :small].T
        s = values.flip(0)[:small].clamp_min(0).sqrt()
        s = torch.where(s > 1e-12 * s.max().clamp_min(1e-300), s, torch.zeros_like(s))
        u = (matrix @ vh.T) / torch.where(s > 0, s, torch.ones_like(s))  # null directions: ~0
    if small < rank:  # bond larger than the matrix rank allows: pad with zeros
        pad = rank - small
        u = torch.cat([u, u.new_zeros(m, pad)], 1)
        s = torch.cat([s, s.new_zeros(pad)])
        vh = torch.cat([vh, vh.new_zeros(pad, n)], 0)
    return u, s, vh


def _leading_vectors(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading left singular vectors of a wide ``matrix`` (via its small Gram)."""
    values, vectors = torch.linalg.eigh(matrix @ matrix.T)
    return vectors.flip(1)[:, :count]


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _tucker(
    tensor: torch.Tensor, structure: Structure, n_iter: int, tol: float
) -> list[torch.Tensor]:
    names = structure.mode_names
    n = len(names)
    factors = [_leading_vectors(_unfold(tensor, m), r) for m, r in enumerate(structure.ranks)]
    rank_names = [f"r{m}" for m in names]
    norm = tensor.norm()
    previous = None
    for _ in range(n_iter):
        for m in range(n):
            others = [k for k in range(n) if k != m]
            projected = contract(
                [tensor, *(factors[k] for k in others)],
                [tuple(names), *((names[k], rank_names[k]) for k in others)],
                tuple(names[m] if k == m else rank_names[k] for k in range(n)),
            )
            factors[m] = _leading_vectors(_unfold(projected, m), structure.ranks[m])
        core = _core(tensor, factors, names, rank_names)
        error = math.sqrt(max(0.0, float(norm**2 - core.norm() ** 2))) / max(float(norm), 1e-300)
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    return [_core(tensor, factors, names, rank_names), *factors]


def _core(tensor, factors, names, rank_names) -> torch.Tensor:
    return contract(
        [tensor, *factors],
        [tuple(names), *zip(names, rank_names, strict=True)],
        tuple(rank_names),
    )


def _khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Row-major Khatri-Rao product of a few factors ``[d_k, R]`` → ``[prod d_k, R]``."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _cp_als(
    tensor: torch.Tensor, structure: Structure, n_iter: int, tol: float, seed: int
) -> list[torch.Tensor]:
    rank = structure.ranks[0]
    shape = tensor.shape
    n = len(shape)
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for m in range(n):
        lead = _leading_vectors(_unfold(tensor, m), min(rank, shape[m]))
        if rank > lead.shape[1]:
            extra = torch.randn(
                shape[m], rank - lead.shape[1], generator=generator, dtype=tensor.dtype
            )
            lead = torch.cat([lead, extra / math.sqrt(shape[m])], 1)
        factors.append(lead)
    # Split the modes in two halves of similar size: the MTTKRP of a mode on one side then needs
    # only the Khatri-Rao product of the *other* side's factors (rows: that side's size), never
    # the whole weight's.
    split = min(range(1, n), key=lambda k: abs(math.prod(shape[:k]) - math.prod(shape[k:])))
    sides = [list(range(split)), list(range(split, n))]
    matrix = tensor.reshape(math.prod(shape[:split]), -1)
    norm_sq = float(tensor.norm() ** 2)
    weights = torch.ones(rank, dtype=tensor.dtype)
    grams = [f.T @ f for f in factors]  # kept up to date: only the updated factor's changes
    previous = None
    for _ in range(n_iter):
        for side, other in ((0, 1), (1, 0)):
            kr = _khatri_rao([factors[k] for k in sides[other]])
            half = matrix @ kr if side == 0 else matrix.T @ kr  # [prod(side dims), R]
            half = half.reshape(*(shape[k] for k in sides[side]), rank)
            labels = tuple(f"m{k}" for k in sides[side])
            for m in sides[side]:
                mttkrp = contract(
                    [half, *(factors[k] for k in sides[side] if k != m)],
                    [(*labels, "r"), *((f"m{k}", "r") for k in sides[side] if k != m)],
                    (f"m{m}", "r"),
                )
                gram = torch.ones(rank, rank, dtype=tensor.dtype)
                for k in range(n):
                    if k != m:
                        gram = gram * grams[k]
                # a tiny ridge keeps the normal equations solvable when columns align
                gram.diagonal().add_(1e-10 * float(gram.diagonal().mean()) + 1e-300)
                chol, info = torch.linalg.cholesky_ex(gram)
                if int(info) == 0:
                    updated = torch.cholesky_solve(mttkrp.T, chol).T
                else:
                    updated = torch.linalg.lstsq(gram, mttkrp.T).solution.T
                weights = updated.norm(dim=0).clamp_min(1e-300)
                factors[m] = updated / weights
                grams[m] = factors[m].T @ factors[m]
        # relative error from inner products, never forming the reconstruction
        full_gram = gram * grams[m]
        fit_sq = float(weights @ full_gram @ weights)
        inner = float((mttkrp * factors[m] * weights).sum())
        error = math.sqrt(max(0.0, norm_sq - 2 * inner + fit_sq)) / max(math.sqrt(norm_sq), 1e-300)
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    scale = weights.abs() ** (1.0 / n)  # spread the column weights evenly over the factors
    factors[0] = factors[0] * torch.sign(weights)
    return [f * scale for f in factors]
