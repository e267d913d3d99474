"""Streaming, additive second-moment statistics of a layer's input: `InputMoments` (the inputs
alone) and `PairedMoments` (the inputs a factorized model feeds the layer, paired row by row with
the original model's inputs, for the error-propagating solve)."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["InputMoments", "PairedMoments", "Statistics"]


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

    # Unpaired statistics are a pair whose two sides coincide (x′ = x, see PairedMoments), so code
    # that reads ``inputs``, ``original`` and ``cross_covariance()`` serves both kinds.
    @property
    def inputs(self) -> InputMoments:
        return self

    @property
    def original(self) -> InputMoments:
        return self

    @property
    def cross(self) -> torch.Tensor:
        """``Σ x xᵀ``: the paired ``Σ x′ xᵀ`` when the two sides coincide."""
        return self.xtx

    def cross_covariance(self) -> torch.Tensor:
        """``Σ (x − μ)(x − μ)ᵀ``: the covariance, as for a pair whose two sides coincide."""
        return self.covariance()

    def mean(self) -> torch.Tensor:
        """Mean input per group, ``[groups, D]``."""
        return self.xsum / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Centered scatter ``Σ (x - μ)(x - μ)ᵀ`` per group (a sum, not divided by the count)."""
        if self.count == 0:
            return torch.zeros_like(self.xtx)
        centered = self.xtx - self.xsum.unsqueeze(2) * self.xsum.unsqueeze(1) / self.count
        return (centered + centered.transpose(1, 2)) / 2


@dataclasses.dataclass
class PairedMoments:
    """Statistics of row pairs ``(x′, x)``: ``x′`` what the layer receives in the model whose earlier
    layers are already factorized, ``x`` what it receives in the original model.

    ``inputs`` sums ``x′``, ``original`` sums ``x`` and ``cross`` is ``Σ x′ xᵀ`` (``[groups, D, D]``).
    The target of the error-propagating solve is the original layer's output ``W x + b``, so these
    sums are all it needs, whatever the layer's output width: memory ``3 · groups · D²``.

    >>> m = PairedMoments.zeros(3)
    >>> x = torch.randn(10, 3); m.update(x + 0.1, x)
    >>> m.count, tuple(m.cross_covariance().shape)
    (10, (1, 3, 3))
    """

    inputs: InputMoments
    original: InputMoments
    cross: torch.Tensor

    @classmethod
    def zeros(
        cls, dim: int, groups: int = 1, device: torch.device | str | None = None
    ) -> PairedMoments:
        """Empty statistics for ``groups`` blocks of ``dim``-dimensional inputs."""
        return cls(
            InputMoments.zeros(dim, groups, device),
            InputMoments.zeros(dim, groups, device),
            torch.zeros(groups, dim, dim, dtype=torch.float64, device=device),
        )

    @property
    def count(self) -> int:
        return self.inputs.count

    @property
    def groups(self) -> int:
        return self.inputs.groups

    @property
    def dim(self) -> int:
        return self.inputs.dim

    def update(
        self, rows: torch.Tensor, original_rows: torch.Tensor, with_original: bool = True
    ) -> None:
        """Add row pairs: ``rows`` (``x′``) and ``original_rows`` (``x``), both ``[N, groups · D]``.
        ``with_original=False`` leaves ``original`` to the caller (already summed elsewhere)."""
        if rows.shape != original_rows.shape:
            raise ValueError(
                f"paired rows differ in shape: {tuple(rows.shape)} and {tuple(original_rows.shape)}"
            )
        shaped = rows.detach().reshape(-1, self.groups, self.dim).to(torch.float64).transpose(0, 1)
        original = original_rows.detach().reshape(-1, self.groups, self.dim)
        original = original.to(torch.float64).transpose(0, 1)
        self.cross += shaped.transpose(1, 2) @ original
        self.inputs.update(rows)
        if with_original:
            self.original.update(original_rows)

    def __add__(self, other: PairedMoments) -> PairedMoments:
        return PairedMoments(
            self.inputs + other.inputs, self.original + other.original, self.cross + other.cross
        )

    def cross_covariance(self) -> torch.Tensor:
        """Centered ``Σ (x′ − μ′)(x − μ)ᵀ`` per group (a sum, not divided by the count)."""
        if self.count == 0:
            return torch.zeros_like(self.cross)
        return (
            self.cross
            - self.inputs.xsum.unsqueeze(2) * self.original.xsum.unsqueeze(1) / self.count
        )


#: What the data-aware solvers take: a layer's own inputs, or inputs paired with the original's.
Statistics = InputMoments | PairedMoments
