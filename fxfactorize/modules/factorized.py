"""`FactorizedLinear` and `FactorizedConv2d`: a layer split into two smaller ones.

Both keep Composer's structure (two children named ``module0`` and ``module1``, no nonlinearity
between them) so ``state_dict``s move between the two libraries. ``module0`` maps the input to
``latent_size`` features/channels without bias; ``module1`` maps those to the output, with bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxfactorize.config import resolve_latent_size
from fxfactorize.core.solution import LowRankSolution

__all__ = [
    "FactorizedConv2d",
    "FactorizedLinear",
    "factorizing_could_speedup",
    "max_rank_with_speedup",
]


def max_rank_with_speedup(fan_in: int, out_size: int) -> int:
    """Largest rank ``r`` with ``r · (fan_in + out) < fan_in · out`` (fewer multiply-adds).

    >>> max_rank_with_speedup(512, 512)
    255
    """
    breakeven = fan_in * out_size / (fan_in + out_size)
    return int(math.ceil(breakeven - 1))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class _FactorizedModule(nn.Module):
    """Shared logic of the factorized pair: rank bookkeeping, the MAC rule, applying solutions."""

    module0: nn.Module
    module1: nn.Module

    def __init__(
        self, in_size: int, out_size: int, latent_size: int | float, groups: int = 1
    ) -> None:
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        self.groups = groups
        self.latent_size = self._clean_latent_size(latent_size)

    def _clean_latent_size(self, latent_size: int | float) -> int:
        rank = resolve_latent_size(latent_size, self.in_size, self.out_size)
        if self.groups > 1:  # latent channels split evenly across groups
            rank = max(self.groups, rank - rank % self.groups)
        return rank

    def _fan_in_per_group(self) -> int:
        return self.in_size // self.groups

    def _max_rank_with_speedup(self) -> int:
        if hasattr(self, "module1"):  # already factorized: any lower rank is cheaper
            return self.latent_size - 1
        per_group = max_rank_with_speedup(self._fan_in_per_group(), self.out_size // self.groups)
        return per_group * self.groups

    def should_factorize(self, proposed_rank: int | float) -> bool:
        """Whether factorizing at ``proposed_rank`` lowers the multiply-add count.

        >>> FactorizedLinear(512, 512, latent_features=64).should_factorize(32)
        True
        """
        return self._clean_latent_size(proposed_rank) <= self._max_rank_with_speedup()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.module1(self.module0(input))

    def reset_parameters(self) -> None:
        """Re-initialise both children as freshly built layers."""
        self.module0.reset_parameters()
        self.module1.reset_parameters()

    def _set_latent(self, rank: int) -> None:
        raise NotImplementedError

    def _solution_weights(self, solution: LowRankSolution) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply_solution(self, solution: LowRankSolution) -> None:
        """Load ``solution`` into the two children (always; no check that it pays).

        The tensors are cast to this module's dtype and device. A solution without bias leaves
        ``module1`` without one; a solution with bias gives ``module1`` one.
        """
        if solution.Wa is None or solution.Wb is None or solution.rank < 1:
            raise ValueError("apply_solution needs a factorized solution (Wa, Wb and rank >= 1)")
        reference = self.module1.weight
        weight0, weight1 = self._solution_weights(solution)
        self._set_latent(solution.rank)
        like = {"dtype": reference.dtype, "device": reference.device}
        with torch.no_grad():
            self.module0.weight = nn.Parameter(weight0.detach().to(**like).contiguous())
            self.module1.weight = nn.Parameter(weight1.detach().to(**like).contiguous())
            if solution.bias is None:
                self.module1.bias = None
            else:
                self.module1.bias = nn.Parameter(solution.bias.detach().to(**like).clone())


class FactorizedLinear(_FactorizedModule):
    """Factorized replacement for :class:`torch.nn.Linear`: ``Linear(in, r)`` then ``Linear(r, out)``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether ``module1`` has an additive bias.
        latent_features: the rank, an int ≥ 1 or a fraction of ``min(in, out)``.

    Raises:
        ValueError: if the rank does not lower the multiply-add count (see
            :meth:`max_allowed_latent_features`).

    >>> layer = FactorizedLinear(512, 256, latent_features=32)
    >>> layer(torch.randn(4, 512)).shape
    torch.Size([4, 256])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        latent_features: int | float = 0.25,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, latent_features)
        if not self.should_factorize(self.latent_size):
            raise ValueError(
                f"latent_features={self.latent_size} does not reduce multiply-adds for a "
                f"{in_features}->{out_features} Linear; it must be <= {self._max_rank_with_speedup()}"
            )
        kw = {"device": device, "dtype": dtype}
        self.module0 = nn.Linear(in_features, self.latent_size, bias=False, **kw)
        self.module1 = nn.Linear(self.latent_size, out_features, bias=bias, **kw)

    @property
    def in_features(self) -> int:
        return self.in_size

    @property
    def out_features(self) -> int:
        return self.out_size

    @property
    def latent_features(self) -> int:
        """Rank of the factorization: width of the space between ``module0`` and ``module1``."""
        return self.latent_size

    def _set_latent(self, rank: int) -> None:
        self.latent_size = rank
        self.module0.out_features = rank
        self.module1.in_features = rank

    def _solution_weights(self, solution: LowRankSolution) -> tuple[torch.Tensor, torch.Tensor]:
        return solution.Wa.T, solution.Wb.T  # Composer's [D, r], [r, M] -> torch's [r, D], [M, r]

    @staticmethod
    def max_allowed_latent_features(in_features: int, out_features: int) -> int:
        """Largest rank that lowers the multiply-add count of an ``in -> out`` Linear.

        >>> FactorizedLinear.max_allowed_latent_features(1024, 1024)
        511
        """
        return max_rank_with_speedup(in_features, out_features)

    # Composer names this method with "channels" on the Linear class; kept so ported code runs.
    max_allowed_latent_channels = max_allowed_latent_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_size}, out_features={self.out_size}, latent_features={self.latent_size}"


class FactorizedConv2d(_FactorizedModule):
    """Factorized replacement for :class:`torch.nn.Conv2d`: a K×K conv to ``latent_channels``
    channels (with the original stride, padding, dilation, padding mode and groups) followed by a
    1×1 conv to ``out_channels`` (same groups, with bias).

    With ``groups = g`` each group is factorized on its own: ``module0`` is
    ``Conv2d(in, r, K, groups=g)`` and ``module1`` ``Conv2d(r, out, 1, groups=g)``, so ``r`` is a
    multiple of ``g`` and the group structure is kept.

    >>> conv = FactorizedConv2d(64, 64, 3, latent_channels=16, padding=1)
    >>> conv(torch.randn(1, 64, 8, 8)).shape
    torch.Size([1, 64, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        latent_channels: int | float = 0.25,
        **kwargs,
    ) -> None:
        groups = int(kwargs.pop("groups", 1))
        bias = bool(kwargs.pop("bias", True))
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        self.kernel_size = _pair(kernel_size)
        super().__init__(in_channels, out_channels, latent_channels, groups=groups)
        if not self.should_factorize(self.latent_size):
            raise ValueError(
                f"latent_channels={self.latent_size} does not reduce multiply-adds for a "
                f"{in_channels}->{out_channels} {self.kernel_size} conv; it must be <= "
                f"{self._max_rank_with_speedup()}"
            )
        self.convolution_kwargs = dict(kwargs)
        factory = {"device": device, "dtype": dtype}
        self.module0 = nn.Conv2d(
            in_channels,
            self.latent_size,
            self.kernel_size,
            groups=groups,
            bias=False,
            **kwargs,
            **factory,
        )
        self.module1 = nn.Conv2d(
            self.latent_size, out_channels, 1, groups=groups, bias=bias, **factory
        )

    def _fan_in_per_group(self) -> int:
        return self.in_size // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def in_channels(self) -> int:
        return self.in_size

    @property
    def out_channels(self) -> int:
        return self.out_size

    @property
    def latent_channels(self) -> int:
        """Output channels of ``module0``, input channels of ``module1``."""
        return self.latent_size

    def _set_latent(self, rank: int) -> None:
        self.latent_size = rank
        self.module0.out_channels = rank
        self.module1.in_channels = rank

    def _solution_weights(self, solution: LowRankSolution) -> tuple[torch.Tensor, torch.Tensor]:
        return solution.Wa, solution.Wb  # already [r, in/g, kh, kw] and [out, r/g, 1, 1]

    @staticmethod
    def max_allowed_latent_channels(
        in_channels: int, out_channels: int, kernel_size: int | tuple[int, int]
    ) -> int:
        """Largest latent channel count that lowers the multiply-add count (groups=1).

        >>> FactorizedConv2d.max_allowed_latent_channels(256, 256, 3)
        230
        """
        kh, kw = _pair(kernel_size)
        return max_rank_with_speedup(in_channels * kh * kw, out_channels)

    # Composer names this method with "features" on the conv class; kept so ported code runs.
    max_allowed_latent_features = max_allowed_latent_channels

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_size}, out_channels={self.out_size}, "
            f"kernel_size={self.kernel_size}, latent_channels={self.latent_size}, groups={self.groups}"
        )


def factorizing_could_speedup(module: nn.Module, latent_size: int | float) -> bool:
    """Whether factorizing ``module`` at ``latent_size`` lowers its multiply-add count (Composer's rule).

    ``latent_size`` is an int ≥ 1 or a fraction of ``min(in, out)``. Modules that are not a
    Linear, a Conv2d or a factorized pair return ``False``.

    >>> factorizing_could_speedup(nn.Linear(512, 512), 128)
    True
    >>> factorizing_could_speedup(nn.Linear(512, 512), 300)
    False
    """
    if isinstance(module, _FactorizedModule):
        return module.should_factorize(latent_size)
    if isinstance(module, nn.Conv2d):
        rank = resolve_latent_size(latent_size, module.in_channels, module.out_channels)
        groups = module.groups
        fan_in = module.in_channels // groups * module.kernel_size[0] * module.kernel_size[1]
        per_group = max(1, rank // groups)
        return per_group <= max_rank_with_speedup(fan_in, module.out_channels // groups)
    if isinstance(module, nn.Linear):
        rank = resolve_latent_size(latent_size, module.in_features, module.out_features)
        return rank <= max_rank_with_speedup(module.in_features, module.out_features)
    return False
