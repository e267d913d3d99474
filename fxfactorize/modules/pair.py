"""`FactorizedPair`: the base of the rank-r pairs (Composer's ``module0``/``module1`` structure),
and Composer's MAC rule :func:`factorizing_could_speedup`."""

from __future__ import annotations

import torch
from torch import nn

from fxfactorize.core.latent import max_rank_with_speedup, resolve_latent_size
from fxfactorize.core.solution import LowRankSolution
from fxfactorize.layers import FactorizedLayer

__all__ = ["FactorizedPair", "factorizing_could_speedup", "kept_bias", "check_init"]


class FactorizedPair(FactorizedLayer):
    """Base of the rank-r pairs: two ordinary layers ``module0`` (input → ``latent_size``, no bias)
    and ``module1`` (``latent_size`` → output, with the bias), Composer's structure.

    Holds the rank bookkeeping, the MAC rule and :meth:`apply_solution`; exposes what the rest of
    the package needs (:meth:`grouped_weight`, :meth:`conv_arguments`, :attr:`has_bias`) so that
    nothing outside a pair reads its children.

    >>> from fxfactorize.modules import FactorizedLinear
    >>> pair = FactorizedLinear(8, 6, latent_features=2)
    >>> isinstance(pair, FactorizedPair), pair.layer_kind, tuple(pair.grouped_weight()[0].shape)
    (True, 'linear', (1, 6, 8))
    """

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

        >>> from fxfactorize.modules import FactorizedLinear
        >>> FactorizedLinear(512, 512, latent_features=64).should_factorize(32)
        True
        """
        return self._clean_latent_size(proposed_rank) <= self._max_rank_with_speedup()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.module1(self.module0(input))

    @property
    def has_bias(self) -> bool:
        return self.module1.bias is not None

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The bias added to the output (``module1``'s)."""
        return self.module1.bias

    def grouped_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The product ``module1 · module0`` per group, ``[G, M_g, D_g]``, and the output bias."""
        first, second = self.module0.weight, self.module1.weight
        rank_g = first.shape[0] // self.groups
        a = first.reshape(self.groups, rank_g, -1)
        b = second.reshape(self.groups, -1, rank_g)
        return b @ a, self.module1.bias

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

        >>> from fxfactorize.modules import FactorizedLinear
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


def check_init(init: str) -> None:
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random'; got {init!r}")


def kept_bias(module: nn.Module, new: FactorizedPair) -> torch.Tensor | None:
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
    if isinstance(module, FactorizedPair):
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
