"""``cost_model="measured"``: time the original layer and the pair on the device, keep the faster."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fxfactorize.costmodels.base import LayerSite, register_cost_model
from fxfactorize.costmodels.roofline import PROFILE_NOISE
from fxfactorize.costmodels.timing import median_seconds

__all__ = ["MeasuredCostModel"]

Timer = Callable[[Callable[[], object]], float]


@register_cost_model
class MeasuredCostModel:
    """Seconds measured by running each candidate on a random input of the traced shape.

    The pair comes from ``site.build`` (the plan's method, weights unsolved: timing does not
    depend on their values). With
    ``compile=True`` both candidates run under ``torch.compile``. ``timer`` maps a zero-argument
    callable to seconds (default: median of repeats); results are cached per shape and rank.
    Each timing is trusted to ±``noise``, so a pair pays only if it is ``margin`` faster with both
    timings off against it by twice that (see :meth:`RooflineCostModel.pays
    <fxfactorize.costmodels.RooflineCostModel.pays>`); ``noise=0`` compares the timings as they are.

    >>> from fxfactorize.layers import LayerShape
    >>> fake = lambda fn: 1.0 if getattr(fn, "rank", None) is None else 0.5
    >>> model = MeasuredCostModel(timer=fake)
    >>> model.timer is fake
    True
    """

    name = "measured"
    unit = "s"

    def __init__(
        self,
        margin: float = 0.05,
        compile: bool = False,
        timer: Timer | None = None,
        method: str | None = None,
        noise: float = PROFILE_NOISE,
    ) -> None:
        if method is not None:  # the plan now hands over the pair (LayerSite.build)
            warnings.warn(
                "MeasuredCostModel(method=...) is deprecated and ignored: the plan builds the "
                "pair of the layer's own method",
                DeprecationWarning,
                stacklevel=2,
            )
        self.margin = margin
        self.noise = noise
        self.compile = compile
        self.timer = timer or median_seconds
        self._cache: dict[tuple, float] = {}

    def _candidate(self, site: LayerSite, rank: int | None) -> nn.Module:
        if site.module is None or site.input_shape is None or site.build is None:
            raise ValueError(
                "cost_model='measured' needs the module, its input shape and a pair builder; "
                f"got module={type(site.module).__name__}, input_shape={site.input_shape}, "
                f"build={site.build}"
            )
        if rank is None:
            return copy.deepcopy(site.module)  # timing must not touch the caller's module
        return site.build(rank)

    def cost(self, site: LayerSite, rank: int | None) -> float:
        key = (site.layer, site.input_shape, site.dtype, site.device, rank)
        if key not in self._cache:
            module = self._candidate(site, rank).eval()
            runner = torch.compile(module) if self.compile else module
            x = torch.randn(site.input_shape, dtype=site.dtype, device=site.device)

            def call() -> object:
                return runner(x)

            call.rank = rank  # lets an injected timer tell the candidates apart
            self._cache[key] = float(self.timer(call))
        return self._cache[key]

    def pays(self, site: LayerSite, rank: int) -> bool:
        """Whether the pair's time, made ``(1 - noise) ** -2`` slower, is ``margin`` below the
        layer's made that much faster: a pair that one noise could carry across the margin never pays.

        >>> from fxfactorize.passes.cost import describe_module
        >>> linear = nn.Linear(64, 64)
        >>> pair = lambda rank: nn.Sequential(nn.Linear(64, rank), nn.Linear(rank, 64))
        >>> site = LayerSite(describe_module(linear, 2 * 64), linear, (2, 64), build=pair)
        >>> timer = lambda fn: 1.0 if fn.rank is None else 0.7  # the pair measured 30 % faster
        >>> MeasuredCostModel(timer=timer, noise=0).pays(site, 8)
        True
        >>> MeasuredCostModel(timer=timer).pays(site, 8)  # but 10 % noise on each timing could undo it
        False
        """
        spread = (1.0 - self.noise) ** -2
        return self.cost(site, rank) * spread**2 <= (1.0 - self.margin) * self.cost(site, None)
