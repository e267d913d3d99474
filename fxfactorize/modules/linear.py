"""`FactorizedLinear`: ``Linear(in, r)`` then ``Linear(r, out)``, Composer's structure."""

from __future__ import annotations

import torch
from torch import nn

from fxfactorize.core.composer_api import factorize_matrix
from fxfactorize.core.latent import max_rank_with_speedup
from fxfactorize.core.lowrank import factorize_weight
from fxfactorize.core.solution import LowRankSolution
from fxfactorize.modules.pair import FactorizedPair, check_init, kept_bias

__all__ = ["FactorizedLinear"]


class FactorizedLinear(FactorizedPair):
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

    layer_kind = "linear"
    kernel = ()

    def conv_arguments(self) -> dict:
        return {}

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
        check_init(init)
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
                    kept_bias(module, new),
                    new.latent_size,
                )
            )
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_size}, out_features={self.out_size}, latent_features={self.latent_size}"
