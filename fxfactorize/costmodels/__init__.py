"""Cost models: how the pass predicts whether a factorized pair is cheaper than the layer.

``FactorizeConfig.cost_model`` picks one by name: ``"latency"`` (default, a calibrated roofline),
``"macs"`` (Composer's rule) or ``"measured"`` (times both candidates); or pass an instance.
"""

from __future__ import annotations

from fxfactorize.costmodels.base import (
    COST_MODELS,
    CostModel,
    LayerSite,
    get_cost_model,
    register_cost_model,
)
from fxfactorize.costmodels.macs import MacsCostModel
from fxfactorize.costmodels.measured import MeasuredCostModel
from fxfactorize.costmodels.roofline import (
    DeviceProfile,
    RooflineCostModel,
    device_profile,
    set_device_profile,
)
from fxfactorize.costmodels.whole import (
    LatencyPrediction,
    ModelTiming,
    predict_latency,
    set_model_timer,
    time_model,
)

__all__ = [
    "COST_MODELS",
    "CostModel",
    "DeviceProfile",
    "LatencyPrediction",
    "LayerSite",
    "MacsCostModel",
    "MeasuredCostModel",
    "ModelTiming",
    "RooflineCostModel",
    "device_profile",
    "get_cost_model",
    "predict_latency",
    "register_cost_model",
    "set_device_profile",
    "set_model_timer",
    "time_model",
]
