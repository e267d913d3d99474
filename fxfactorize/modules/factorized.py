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
from fxfactorize.core.composer_api import factorize_conv2d, factorize_matrix
from fxfactorize.core.lowrank import factorize_weight
from fxfactorize.core.solution import LowRankSolution

__all__ = [
    "FactorizedConv2d",
    "FactorizedConvNd",
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

    def _solve_for_rank(self, input: torch.Tensor, rank: int) -> LowRankSolution:
        raise NotImplementedError

    def _checked_rank(self, rank: int | float) -> int:
        """``rank`` resolved like ``latent_size``; it may not exceed the current rank."""
        resolved = self._clean_latent_size(rank)
        if resolved > self.latent_size:
            raise ValueError(
                f"rank={resolved} exceeds the current rank {self.latent_size}; a factorized layer "
                "can only be re-factorized to a lower (or equal) rank"
            )
        return resolved

    def solution_for_rank(self, input: torch.Tensor, rank: int | float) -> LowRankSolution:
        """The best factorization at ``rank`` of this layer's function on ``input``; no change.

        ``input`` is what this module receives (Linear: ``[..., in_features]``; conv:
        ``[N, C, H, W]``). ``rank`` is an int or a fraction of ``min(in, out)``, at most the
        current rank. The result is the exact minimiser of the output error on ``input`` (see
        :func:`fxfactorize.factorize_matrix` / :func:`fxfactorize.factorize_conv2d`).
        """
        return self._solve_for_rank(input, self._checked_rank(rank))

    def set_rank(self, input: torch.Tensor, rank: int | float) -> None:
        """Re-factorize to ``rank`` in place, optimally for ``input`` (see :meth:`solution_for_rank`).

        >>> layer = FactorizedLinear(64, 64, latent_features=16)
        >>> layer.set_rank(torch.randn(100, 64), 8)
        >>> layer.latent_features, tuple(layer.module0.weight.shape)
        (8, (8, 64))
        """
        self.apply_solution(self.solution_for_rank(input, rank))

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

    def _solve_for_rank(self, input: torch.Tensor, rank: int) -> LowRankSolution:
        x = input.detach().reshape(-1, self.in_size)
        with torch.no_grad():
            y = self(x)
        wa, wb = self.module0.weight.T, self.module1.weight.T
        return factorize_matrix(x, y, wa, wb, bias=self.module1.bias, rank=rank)

    @classmethod
    def from_linear(
        cls, module: nn.Linear, module_ix: int = -1, init: str = "svd", **kwargs
    ) -> FactorizedLinear:
        """A factorized copy of ``module`` (``module_ix`` is accepted for Composer compatibility).

        ``init="svd"`` (default) keeps the layer's function as well as the rank allows: the best
        rank-``latent_features`` approximation of the weight (truncated SVD), with the bias kept.
        ``init="random"`` gives freshly initialised layers, as Composer's ``from_linear`` does.
        ``kwargs`` go to the constructor (e.g. ``latent_features``). ``module`` is not changed.

        >>> layer = nn.Linear(64, 32)
        >>> pair = FactorizedLinear.from_linear(layer, latent_features=32 // 4)
        >>> pair.latent_features, tuple(pair(torch.randn(2, 64)).shape)
        (8, (2, 32))
        """
        _check_init(init)
        weight = module.weight
        kwargs.setdefault("bias", module.bias is not None)
        new = cls(
            module.in_features,
            module.out_features,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        if init == "svd":
            factors = factorize_weight(weight.detach()[None], module.bias, new.latent_size)
            new.apply_solution(
                LowRankSolution(
                    factors.first[0].T,
                    factors.second[0].T,
                    _kept_bias(module, new),
                    new.latent_size,
                )
            )
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_size}, out_features={self.out_size}, latent_features={self.latent_size}"


def _ntuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


class FactorizedConvNd(_FactorizedModule):
    """Shared logic of the N-d conv pairs; subclasses set ``dims`` and ``conv_class``."""

    dims: int = 0
    conv_class: type[nn.Module] = nn.Module

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        latent_channels: int | float = 0.25,
        **kwargs,
    ) -> None:
        groups = int(kwargs.pop("groups", 1))
        bias = bool(kwargs.pop("bias", True))
        factory = {"device": kwargs.pop("device", None), "dtype": kwargs.pop("dtype", None)}
        self.kernel_size = _ntuple(kernel_size, self.dims)
        super().__init__(in_channels, out_channels, latent_channels, groups=groups)
        if not self.should_factorize(self.latent_size):
            raise ValueError(
                f"latent_channels={self.latent_size} does not reduce multiply-adds for a "
                f"{in_channels}->{out_channels} {self.kernel_size} conv; it must be <= "
                f"{self._max_rank_with_speedup()}"
            )
        self.convolution_kwargs = dict(kwargs)
        self.module0 = self.conv_class(
            in_channels,
            self.latent_size,
            self.kernel_size,
            groups=groups,
            bias=False,
            **kwargs,
            **factory,
        )
        self.module1 = self.conv_class(
            self.latent_size, out_channels, 1, groups=groups, bias=bias, **factory
        )

    def _fan_in_per_group(self) -> int:
        return self.in_size // self.groups * math.prod(self.kernel_size)

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
        return solution.Wa, solution.Wb  # [r, in/g, *kernel] and [out, r/g, 1, ...]

    @classmethod
    def max_allowed_latent_channels(
        cls, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...]
    ) -> int:
        """Largest latent channel count that lowers the multiply-add count (groups=1)."""
        fan_in = in_channels * math.prod(_ntuple(kernel_size, cls.dims))
        return max_rank_with_speedup(fan_in, out_channels)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_size}, out_channels={self.out_size}, "
            f"kernel_size={self.kernel_size}, latent_channels={self.latent_size}, groups={self.groups}"
        )


class FactorizedConv2d(FactorizedConvNd):
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

    dims = 2
    conv_class = nn.Conv2d

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

    def _solve_for_rank(self, input: torch.Tensor, rank: int) -> LowRankSolution:
        return factorize_conv2d(
            input.detach(),
            self.module0.weight,
            self.module1.weight,
            rank=rank,
            biasB=self.module1.bias,
            groups=self.groups,
            **self.convolution_kwargs,
        )

    @classmethod
    def from_conv2d(
        cls, module: nn.Conv2d, module_ix: int = -1, init: str = "svd", **kwargs
    ) -> FactorizedConv2d:
        """A factorized copy of ``module`` with its stride, padding, dilation, padding mode and groups.

        ``init="svd"`` (default) keeps the conv's function as well as the rank allows (truncated
        SVD of each group's ``[out/g, in/g·kh·kw]`` weight, bias kept); ``init="random"`` gives
        Composer's freshly initialised layers. ``kwargs`` go to the constructor (e.g.
        ``latent_channels``); ``module_ix`` is accepted for Composer compatibility.

        >>> conv = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        >>> pair = FactorizedConv2d.from_conv2d(conv, latent_channels=8)
        >>> tuple(pair(torch.randn(1, 32, 8, 8)).shape), pair.module0.stride
        ((1, 64, 4, 4), (2, 2))
        """
        _check_init(init)
        weight = module.weight
        kwargs.setdefault("bias", module.bias is not None)
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
            groups=module.groups,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        if init == "svd":
            groups, rank = module.groups, new.latent_size
            grouped = weight.detach().reshape(groups, module.out_channels // groups, -1)
            factors = factorize_weight(grouped, module.bias, rank // groups)
            wa = factors.first.reshape(rank, module.in_channels // groups, *new.kernel_size)
            wb = factors.second.reshape(module.out_channels, rank // groups, 1, 1)
            new.apply_solution(LowRankSolution(wa, wb, _kept_bias(module, new), rank))
        return new


def _check_init(init: str) -> None:
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random'; got {init!r}")


def _kept_bias(module: nn.Module, new: _FactorizedModule) -> torch.Tensor | None:
    """The original bias if the new pair has one (a pair asked to drop it gets none)."""
    if new.module1.bias is None or module.bias is None:
        return None if new.module1.bias is None else torch.zeros_like(new.module1.bias)
    return module.bias.detach()


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
