"""Cost models: how the pass predicts whether a factorized pair is cheaper than the layer.

``FactorizeConfig.cost_model`` picks one by name: ``"latency"`` (default, a calibrated roofline),
``"macs"`` (Composer's rule) or ``"measured"`` (times both candidates); or pass an instance.
"""

from __future__ import annotations

from fxfactorize.costmodels.base import CostModel, LayerSite
from fxfactorize.costmodels.macs import MacsCostModel
from fxfactorize.costmodels.measured import MeasuredCostModel
from fxfactorize.costmodels.roofline import (
    DeviceProfile,
    RooflineCostModel,
    device_profile,
    set_device_profile,
)

__all__ = [
    "COST_MODELS",
    "CostModel",
    "DeviceProfile",
    "LayerSite",
    "MacsCostModel",
    "MeasuredCostModel",
    "RooflineCostModel",
    "device_profile",
    "get_cost_model",
    "set_device_profile",
]

COST_MODELS = {"latency": RooflineCostModel, "macs": MacsCostModel, "measured": MeasuredCostModel}


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
