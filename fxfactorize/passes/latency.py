"""The whole model's predicted latency as planned: time the original once, price the plan.

The per-layer cost models price each Linear/Conv layer alone; this pass times the original model
on the example inputs (:func:`fxfactorize.costmodels.time_model`: the whole call and each
Linear/Conv layer inside it) and predicts the whole model's seconds with every planned layer's
measured seconds scaled by its record's ``latency_ratio`` (see
:func:`fxfactorize.costmodels.predict_latency`). The layers the pass leaves alone (BatchNorm,
activations, pooling, attention products, kept Linear/Conv layers) keep their measured time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from fxfactorize.calling import call_model, evaluation_mode
from fxfactorize.config import FactorizeConfig
from fxfactorize.costmodels.roofline import resolve_device_profile
from fxfactorize.costmodels.whole import (
    LatencyPrediction,
    ModelTiming,
    model_timer,
    predict_latency,
    timer_injected,
)
from fxfactorize.report import LayerRecord

__all__ = [
    "REGENERATION_COST",
    "latency_of",
    "small_gain_warning",
    "time_original",
    "wants_prediction",
]

log = logging.getLogger("fxfactorize")


def _device_and_dtype(model: nn.Module) -> tuple[str, Any]:
    weight = next(model.parameters(), None)
    if weight is None or not weight.is_floating_point():
        return "cpu", None
    return str(weight.device), weight.dtype


def wants_prediction(config: FactorizeConfig, model: nn.Module) -> bool:
    """Whether to time ``model``: ``config.predict_latency``, or by default unless the device
    profile of its device and dtype is pinned and no timer was injected.

    >>> import torch
    >>> from fxfactorize.costmodels import DeviceProfile, set_device_profile
    >>> set_device_profile(DeviceProfile(5e10, 1e10, 0.0))
    >>> wants_prediction(FactorizeConfig(), nn.Linear(2, 2))  # pinned: reproducible, no timing
    False
    >>> wants_prediction(FactorizeConfig(predict_latency=True), nn.Linear(2, 2))
    True
    >>> set_device_profile(None)
    """
    if config.predict_latency is not None:
        return config.predict_latency
    if timer_injected():
        return True
    device, dtype = _device_and_dtype(model)
    if dtype is None:
        return False
    return resolve_device_profile(device, dtype).source not in ("pinned", "environment")


def time_original(model: nn.Module, example_inputs: Any, targets: Iterable[str]) -> ModelTiming:
    """The :class:`~fxfactorize.costmodels.ModelTiming` of ``model`` on ``example_inputs`` in
    eval mode, with each module named in ``targets`` timed inside the call (names that are not
    submodules of ``model``, such as functional layers the pass turned into modules, are not
    timed: their time counts as untouched).

    >>> import torch
    >>> from fxfactorize.costmodels import set_model_timer, ModelTiming
    >>> set_model_timer(lambda run, layers: ModelTiming(2.0, dict.fromkeys(layers, 1.0)))
    >>> time_original(nn.Sequential(nn.Linear(4, 4)), torch.ones(1, 4), ["0", "missing"]).layer_s
    {'0': 1.0}
    >>> set_model_timer(None)
    """
    layers = {}
    for target in dict.fromkeys(targets):
        try:
            layers[target] = model.get_submodule(target)
        except AttributeError:
            continue

    def run() -> object:
        return call_model(model, example_inputs)

    with evaluation_mode(model):
        timing = model_timer()(run, layers)
    log.info(
        "timed the original model: %.3g ms, of which %.3g ms in %d Linear/Conv layers",
        timing.whole_s * 1e3,
        sum(timing.layer_s.values()) * 1e3,
        len(layers),
    )
    return timing


def latency_of(timing: ModelTiming, records: Iterable[LayerRecord]) -> LatencyPrediction:
    """The whole model's predicted latency with each factorized record's layer at its
    ``latency_ratio`` of the measured seconds.

    >>> record = LayerRecord("fc", "fc", "Linear", 512, 512, (), 1, 262144, 262656, rank=64)
    >>> record.latency_ratio = 0.25
    >>> latency_of(ModelTiming(4.0, {"fc": 2.0}), [record]).ratio
    0.625
    """
    ratios = {
        record.target: record.latency_ratio
        for record in records
        if record.factorized and record.latency_ratio is not None
    }
    return predict_latency(timing, ratios)


#: The whole-model gain below which a plan may not pay: the graph ``transform`` returns with
#: nothing factorized measured 0.91-1.10x torchvision's own modules (``benchmarks/speed.py``,
#: "regenerated ÷ original", 2-core CPU), which the per-layer prediction does not include.
REGENERATION_COST = 0.05


def small_gain_warning(prediction: LatencyPrediction, records: Iterable[LayerRecord]) -> str | None:
    """A warning when layers are factorized but the whole model is predicted to gain less than
    :data:`REGENERATION_COST` of its time, which the regenerated graph's own cost can cancel.

    >>> record = LayerRecord("fc", "fc", "Linear", 512, 512, (), 1, 262144, 262656, rank=64)
    >>> small_gain_warning(LatencyPrediction(1.0, 0.1, 0.08, 0.98), [record])[:35]
    'predicted latency 0.980× the whole '
    >>> small_gain_warning(LatencyPrediction(1.0, 0.5, 0.25, 0.75), [record]) is None
    True
    """
    if not any(record.factorized for record in records):
        return None
    if prediction.ratio < 1 - REGENERATION_COST:
        return None
    return (
        f"predicted latency {prediction.ratio:.3f}× the whole model's: a gain under "
        f"{REGENERATION_COST:.0%}, within what the regenerated graph alone measured against the "
        "original (0.91-1.10× on torchvision models); time the result (`fxfactorize bench`, or "
        "your own benchmark) before counting on a speedup"
    )
