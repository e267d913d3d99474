"""The whole model's latency: time it once, then predict it as planned.

A per-layer cost model prices the Linear/Conv layers alone; what the user waits for also holds
the layers the pass never touches (normalisation, activations, pooling, depthwise convs,
attention products). :func:`time_model` measures the original model once on its example inputs
(the whole call, and each Linear/Conv layer inside that call through forward hooks);
:func:`predict_latency` then replaces each layer's measured seconds by those seconds × the cost
model's predicted ratio for the layer as planned::

    predicted = whole − Σ layer seconds + Σ layer seconds × predicted ratio

The timer is injectable (:func:`set_model_timer`): tests pin timings, so a prediction never
depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "LatencyPrediction",
    "ModelTimer",
    "ModelTiming",
    "model_timer",
    "predict_latency",
    "set_model_timer",
    "time_model",
    "timer_injected",
]


@dataclasses.dataclass(frozen=True)
class ModelTiming:
    """Measured seconds of one call of a model (``whole_s``) and of each named layer inside that
    call (``layer_s``; a layer called several times adds its calls up).

    >>> ModelTiming(1.0, {"fc": 0.6}).untouched_s
    0.4
    """

    whole_s: float
    layer_s: dict[str, float]

    @property
    def untouched_s(self) -> float:
        """Seconds outside the timed layers (never below zero)."""
        return max(self.whole_s - sum(self.layer_s.values()), 0.0)


#: ``timer(run, layers)``: the :class:`ModelTiming` of ``run()`` (one forward pass of the model)
#: and of each module of ``layers`` (``{name: module}``) inside it.
ModelTimer = Callable[[Callable[[], object], Mapping[str, nn.Module]], ModelTiming]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _LayerClock:
    """Forward hooks adding each layer's wall seconds per call of the model."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(layers, 0.0)
        self._started: dict[str, float] = {}
        self._layers = layers

    def _pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: object) -> None:
            _sync()
            self._started[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            _sync()
            self.seconds[name] += time.perf_counter() - self._started.pop(name)

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        for name, module in self._layers.items():
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def time_model(
    run: Callable[[], object],
    layers: Mapping[str, nn.Module],
    repeats: int = 5,
    warmup: int = 1,
    enough_s: float = 10.0,
) -> ModelTiming:
    """Median seconds of ``run()`` and of each of ``layers`` inside it, over ``repeats`` runs
    (3 once the timed runs have taken ``enough_s``: a slow model's samples are long, so fewer of
    them settle the median, and each one costs seconds of the transform).

    Runs without hooks (the whole model's time) alternate with runs with them (each layer's time),
    so load on the machine hits both alike; everything runs under ``torch.no_grad``. A layer
    never called gets 0 seconds.

    >>> layer = nn.Linear(64, 64)
    >>> timing = time_model(lambda: layer(torch.randn(8, 64)), {"fc": layer}, repeats=3)
    >>> timing.whole_s > 0 and 0 < timing.layer_s["fc"]
    True
    """
    whole, per_layer = [], {name: [] for name in layers}
    with torch.no_grad():
        for _ in range(warmup):
            run()
        began = time.perf_counter()
        for done in range(repeats):
            if done >= min(3, repeats) and time.perf_counter() - began > enough_s:
                break
            _sync()
            start = time.perf_counter()
            run()
            _sync()
            whole.append(time.perf_counter() - start)
            clock = _LayerClock(layers)
            with clock.attached():
                run()
            for name, seconds in clock.seconds.items():
                per_layer[name].append(seconds)
    return ModelTiming(
        statistics.median(whole),
        {name: statistics.median(samples) for name, samples in per_layer.items()},
    )


_TIMER: list[ModelTimer] = []  # the injected timer, if any


def set_model_timer(timer: ModelTimer | None) -> None:
    """Time models with ``timer`` instead of :func:`time_model` (``None``: back to measuring).

    An injected timer also makes the pass predict the whole model's latency when the device
    profile is pinned (as in tests), where it otherwise skips timing.

    >>> set_model_timer(lambda run, layers: ModelTiming(1.0, dict.fromkeys(layers, 0.5)))
    >>> model_timer()(None, {"fc": None}).layer_s
    {'fc': 0.5}
    >>> set_model_timer(None)
    >>> model_timer() is time_model
    True
    """
    _TIMER.clear()
    if timer is not None:
        _TIMER.append(timer)


def model_timer() -> ModelTimer:
    """The timer in use: the injected one (:func:`set_model_timer`), else :func:`time_model`."""
    return _TIMER[0] if _TIMER else time_model


def timer_injected() -> bool:
    """Whether a timer was injected with :func:`set_model_timer`."""
    return bool(_TIMER)


@dataclasses.dataclass(frozen=True)
class LatencyPrediction:
    """The whole model's predicted latency as planned, from one timing of the original.

    ``measured_s``: the original model's seconds; ``layers_s``: of which in its Linear/Conv
    layers; ``layers_after_s``: those layers' predicted seconds as planned; ``predicted_s``: the
    whole model's predicted seconds.

    >>> p = LatencyPrediction(measured_s=1.0, layers_s=0.5, layers_after_s=0.25, predicted_s=0.75)
    >>> p.ratio, p.layers_ratio
    (0.75, 0.5)
    """

    measured_s: float
    layers_s: float
    layers_after_s: float
    predicted_s: float

    @property
    def ratio(self) -> float:
        """Predicted whole-model seconds ÷ the original's measured seconds."""
        return self.predicted_s / self.measured_s if self.measured_s > 0 else 1.0

    @property
    def layers_ratio(self) -> float:
        """Predicted ÷ measured seconds of the Linear/Conv layers alone (what a per-layer cost
        model promises)."""
        return self.layers_after_s / self.layers_s if self.layers_s > 0 else 1.0

    def to_dict(self) -> dict[str, float]:
        """The four seconds and the two ratios, JSON-able.

        >>> LatencyPrediction(2.0, 1.0, 0.5, 1.5).to_dict()["ratio"]
        0.75
        """
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "layers_ratio": self.layers_ratio,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> LatencyPrediction:
        """Inverse of :meth:`to_dict` (the ratios are recomputed).

        >>> LatencyPrediction.from_dict(LatencyPrediction(2.0, 1.0, 0.5, 1.5).to_dict()).ratio
        0.75
        """
        names = [field.name for field in dataclasses.fields(cls)]
        return cls(*(float(data[name]) for name in names))


def predict_latency(timing: ModelTiming, ratios: Mapping[str, float]) -> LatencyPrediction:
    """The whole model's seconds when each layer named in ``ratios`` takes its measured seconds
    × its ratio (layers not named, and everything outside the layers, keep their time).

    >>> timing = ModelTiming(whole_s=10.0, layer_s={"a": 4.0, "b": 2.0})
    >>> p = predict_latency(timing, {"a": 0.5})  # a halves; b and 4 s of the rest stay
    >>> p.predicted_s, p.ratio, p.layers_ratio
    (8.0, 0.8, 0.6666666666666666)
    """
    layers_s = sum(timing.layer_s.values())
    after = sum(s * ratios.get(name, 1.0) for name, s in timing.layer_s.items())
    untouched = timing.whole_s - layers_s  # may be slightly negative: the hooks' own overhead
    return LatencyPrediction(timing.whole_s, layers_s, after, max(untouched, 0.0) + after)
