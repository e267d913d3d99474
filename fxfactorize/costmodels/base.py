"""The cost-model interface (predict the cost of a layer as it is and as a rank-r pair) and the
registry of cost models by name. Cost models know nothing of methods: the plan hands them the
layer's geometry and, for those that run it, a way to build the pair."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from torch import nn

from fxfactorize.layers import LayerShape

__all__ = ["COST_MODELS", "CostModel", "LayerSite", "get_cost_model", "register_cost_model"]


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """A layer where it runs: its geometry, the module, and the input shape it sees.

    ``module``, ``input_shape`` and ``build`` (``build(rank)``: the layer's pair at that rank,
    weights unsolved) are only needed by cost models that run the layer (``"measured"``); the
    others use ``layer`` alone.

    >>> site = LayerSite(LayerShape("linear", 64, 32, (), 1, positions=4, bias=True))
    >>> site.layer.macs, site.dtype
    (8192, torch.float32)
    """

    layer: LayerShape
    module: nn.Module | None = None
    input_shape: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    build: Callable[[int], nn.Module] | None = dataclasses.field(default=None, compare=False)


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


#: The cost models by name (``FactorizeConfig.cost_model``); each registers where it is defined.
COST_MODELS: dict[str, type] = {}
_Model = TypeVar("_Model", bound=type)


def register_cost_model(cls: _Model) -> _Model:
    """Class decorator: make ``cls`` available as ``cost_model=cls.name``.

    >>> @register_cost_model
    ... class Free:
    ...     name, unit, margin = "free", "MACs", 0.0
    ...     def cost(self, site, rank): return 0.0
    ...     def pays(self, site, rank): return True
    >>> get_cost_model("free").unit
    'MACs'
    >>> del COST_MODELS["free"]
    """
    COST_MODELS[cls.name] = cls
    return cls


def get_cost_model(choice: str | CostModel) -> CostModel:
    """The cost model named ``choice`` (a fresh instance), or ``choice`` itself if it is one.

    >>> get_cost_model("macs").unit
    'MACs'
    >>> get_cost_model("flops")
    Traceback (most recent call last):
    ...
    ValueError: cost_model must be one of ['latency', 'macs', 'measured'] or a cost model instance; got 'flops'
    """
    if isinstance(choice, str):
        if choice not in COST_MODELS:
            raise ValueError(
                f"cost_model must be one of {sorted(COST_MODELS)} or a cost model instance; "
                f"got {choice!r}"
            )
        return COST_MODELS[choice]()
    if all(hasattr(choice, attr) for attr in ("cost", "pays", "unit")):
        return choice
    raise ValueError(
        f"cost_model must be one of {sorted(COST_MODELS)} or a cost model instance; got {choice!r}"
    )
