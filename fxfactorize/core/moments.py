"""`InputMoments`: streaming, additive second-moment statistics of a layer's input."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["InputMoments"]


@dataclasses.dataclass
class InputMoments:
    """Sums of ``x xᵀ`` and ``x`` over ``count`` input vectors, per group, in float64.

    ``xtx`` is ``[groups, D, D]`` and ``xsum`` ``[groups, D]``: a grouped convolution only ever
    needs the diagonal blocks, so memory is ``groups · D²`` rather than ``(groups · D)²``.
    Moments are sums, so statistics from several batches or processes add up with ``+``.

    >>> m = InputMoments.zeros(3)
    >>> m.update(torch.randn(10, 3)); m.update(torch.randn(5, 3))
    >>> m.count, tuple(m.covariance().shape)
    (15, (1, 3, 3))
    """

    xtx: torch.Tensor
    xsum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(
        cls, dim: int, groups: int = 1, device: torch.device | str | None = None
    ) -> InputMoments:
        """Empty statistics for ``groups`` blocks of ``dim``-dimensional inputs."""
        return cls(
            xtx=torch.zeros(groups, dim, dim, dtype=torch.float64, device=device),
            xsum=torch.zeros(groups, dim, dtype=torch.float64, device=device),
        )

    @property
    def groups(self) -> int:
        return self.xtx.shape[0]

    @property
    def dim(self) -> int:
        return self.xtx.shape[-1]

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows`` (``[N, groups · D]``) to the sums."""
        rows = rows.detach().reshape(-1, self.groups, self.dim).to(torch.float64).transpose(0, 1)
        self.xtx += rows.transpose(1, 2) @ rows
        self.xsum += rows.sum(dim=1)
        self.count += rows.shape[1]

    def __add__(self, other: InputMoments) -> InputMoments:
        if self.xtx.shape != other.xtx.shape:
            raise ValueError(
                f"cannot add moments of shape {tuple(self.xtx.shape)} and {tuple(other.xtx.shape)}"
            )
        return InputMoments(self.xtx + other.xtx, self.xsum + other.xsum, self.count + other.count)

    def mean(self) -> torch.Tensor:
        """Mean input per group, ``[groups, D]``."""
        return self.xsum / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Centered scatter ``Σ (x - μ)(x - μ)ᵀ`` per group (a sum, not divided by the count)."""
        if self.count == 0:
            return torch.zeros_like(self.xtx)
        centered = self.xtx - self.xsum.unsqueeze(2) * self.xsum.unsqueeze(1) / self.count
        return (centered + centered.transpose(1, 2)) / 2
