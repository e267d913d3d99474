"""The cost-model interface: predict the cost of a layer as it is and as a rank-r pair."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from fxfactorize.passes.cost import LayerShape

__all__ = ["CostModel", "LayerSite"]


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """A layer where it runs: its geometry, the module, and the input shape it sees.

    ``module`` and ``input_shape`` are only needed by cost models that run the layer
    (``"measured"``); the others use ``layer`` alone.

    >>> site = LayerSite(LayerShape("linear", 64, 32, (), 1, positions=4, bias=True))
    >>> site.layer.macs, site.dtype
    (8192, torch.float32)
    """

    layer: LayerShape
    module: nn.Module | None = None
    input_shape: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


class CostModel(Protocol):
    """Predicts what a layer costs, in ``unit`` (MACs or seconds); lower is better.

    ``margin`` is the fraction by which the pair must be predicted cheaper than the original to be
    worth it: a layer is factorized at ``rank`` only if
    ``cost(site, rank) <= (1 - margin) * cost(site, None)``.
    """

    name: str
    unit: str
    margin: float

    def cost(self, site: LayerSite, rank: int | None) -> float:
        """Cost of the layer as it is (``rank=None``) or as a pair at total rank ``rank``."""

    def pays(self, site: LayerSite, rank: int) -> bool:
        """Whether the pair at ``rank`` is predicted cheaper than the original by the margin."""
