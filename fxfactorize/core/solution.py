"""`LowRankSolution`: the tensors of a factorized operator, in Composer's layout."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LowRankSolution"]


@dataclasses.dataclass
class LowRankSolution:
    """The two factors, the output bias, the rank and the error of a factorization.

    Same fields and meaning as Composer's ``LowRankSolution``. For a matrix ``Wa`` is
    ``[D, rank]`` and ``Wb`` ``[rank, M]`` (so ``Y ≈ X @ Wa @ Wb + bias``); for a convolution
    ``Wa`` is ``[rank, in_channels / groups, *kernel]`` and ``Wb`` ``[out_channels, rank / groups, 1, 1]``.
    ``rank == -1`` marks an unfactorized (full-rank) solution, where ``Wb`` is ``None``.
    ``nmse`` is the mean squared output error divided by the variance of the original output.

    >>> s = LowRankSolution(Wa=torch.ones(4, 2), Wb=torch.ones(2, 3), rank=2)
    >>> (s.Wa @ s.Wb).shape
    torch.Size([4, 3])
    """

    Wa: torch.Tensor | None = None
    Wb: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    rank: int = -1
    nmse: float = 0.0
