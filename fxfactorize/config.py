"""`FactorizeConfig`: every knob of the pass, validated once, in one place."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from torch import nn

from fxfactorize.core.latent import resolve_latent_size, validate_latent_size
from fxfactorize.costmodels import get_cost_model

__all__ = ["FactorizeConfig", "resolve_latent_size", "validate_latent_size"]


def _validate_min_size(value: Any, name: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ValueError(f"{name} must be an int >= 0; got {value!r}")


def _validate_leaf_modules(value: Any) -> tuple:
    if isinstance(value, (str, type)):  # one entry given bare
        value = (value,)
    try:
        entries = tuple(value)
    except TypeError:
        entries = (value,)
    for entry in entries:
        if not (
            isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))
        ):
            raise ValueError(
                "leaf_modules must hold nn.Module subclasses or qualified submodule names; "
                f"got {entry!r}"
            )
    return entries


def _validate_shrinkage(value: Any) -> str | float:
    if value == "auto":
        return "auto"
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1]; got {value!r}")


@dataclasses.dataclass(frozen=True)
class FactorizeConfig:
    """What to factorize and how.

    Defaults are those of Composer's ``Factorize`` algorithm.

    Args:
        linears: factorize ``nn.Linear`` layers.
        convs: factorize convolution layers.
        min_features: a Linear is left alone unless ``min(in, out) >= min_features``.
        latent_features: rank of factorized Linear layers (int ≥ 1) or fraction of
            ``min(in, out)`` (float in (0, 1)).
        min_channels: a conv is left alone unless ``min(in_channels, out_channels) >= min_channels``.
        latent_channels: rank (latent channels) of factorized convs, int or fraction as above.
        method: the factorization method, a name registered in :mod:`fxfactorize.methods`
            (``"lowrank"``, ``"spatial"``, ``"tucker2"``, a tensorized format), or ``"auto"``:
            per conv, the structure and rank with the lowest predicted error at the allowed cost.
        progress: show tqdm progress bars for long work.
        cost_model: how a pair is judged cheaper: ``"latency"`` (default: a roofline calibrated
            on the device; the pair must be predicted faster by a margin), ``"macs"`` (Composer's
            rule: fewer multiply-adds), ``"measured"`` (times both), or a cost model instance
            (see :mod:`fxfactorize.costmodels`).
        tolerance: if set (a float in (0, 1)), each layer gets the smallest rank whose predicted
            nmse is ≤ ``tolerance`` instead of ``latent_*``.
        budget: if set (a float in (0, 1]), ranks are allocated across layers to minimise the
            summed predicted nmse while the Linear/Conv layers' total cost (in the cost model's
            unit: MACs or seconds) stays ≤ ``budget`` × the original.
        rank_multiple: ranks are rounded up to a multiple of this where the cost model predicts
            that costs nothing (with ``budget``: the grid of candidate ranks).
        on_untraceable: ``"descend"`` (transform the largest submodules that torch.fx can trace
            when the whole model cannot be traced) or ``"raise"`` (a ``TraceError``).
        leaf_modules: extra module types or qualified names (relative to the model) that tracing
            keeps as opaque calls, on top of :data:`DEFAULT_LEAF_MODULES`.
        functional: also factorize ``F.linear``/``F.conv*``/``matmul`` calls whose weight is a
            parameter (they become module calls first).
        propagate_error: with calibration, solve the layers in graph order, each on the inputs
            it receives once the layers before it are factorized, against the original layer's
            output on the original inputs (llm-compressor's name; ``False``: each layer is
            solved alone on the original model's inputs).
        sensitivity: with calibration and a ``tolerance``/``budget`` policy, weigh each layer's
            error by how much the model's output moves when that layer's output does (measured
            on the calibration batches), instead of counting every layer's nmse alike.
        shrinkage: with calibration, how far to blend each layer's statistics toward the
            data-free solution: ``"auto"`` (chosen per layer on held-out calibration folds,
            so scarce data never does worse than data-free there) or a fixed float in [0, 1]
            (0: trust the calibration data fully, 1: data-free).
        distributed: when ``torch.distributed`` is initialised, run across the ranks of the
            process group (statistics reduced, each layer solved by one rank and broadcast; see
            :mod:`fxfactorize.passes.distributed`); ``False``: each process works alone.
        predict_latency: time the original model once on the example inputs (a few forward
            passes, and each Linear/Conv layer inside them) and report the whole model's
            predicted latency ratio as planned (``Plan.latency``). ``None`` (default): unless the
            device profile is pinned (``set_device_profile`` or ``$FXFACTORIZE_DEVICE_PROFILE``,
            as in tests: a timing is never reproducible) and no timer was injected
            (:func:`fxfactorize.costmodels.set_model_timer`).

    >>> FactorizeConfig(latent_features=64).latent_features
    64
    >>> FactorizeConfig(min_channels=-1)
    Traceback (most recent call last):
    ...
    ValueError: min_channels must be an int >= 0; got -1
    """

    linears: bool = True
    convs: bool = True
    min_features: int = 256
    latent_features: int | float = 128
    min_channels: int = 256
    latent_channels: int | float = 0.25
    method: str = "lowrank"
    progress: bool = True
    cost_model: Any = "latency"
    tolerance: float | None = None
    budget: float | None = None
    rank_multiple: int = 1
    on_untraceable: str = "descend"
    leaf_modules: tuple = ()
    functional: bool = True
    # chosen on the real-model benchmark (README, "Keeping the function")
    propagate_error: bool = True
    sensitivity: bool = True
    shrinkage: str | float = "auto"
    distributed: bool = True
    predict_latency: bool | None = None

    def __post_init__(self) -> None:
        for name in (
            "linears",
            "convs",
            "progress",
            "functional",
            "propagate_error",
            "sensitivity",
            "distributed",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("min_features", "min_channels"):
            object.__setattr__(self, name, _validate_min_size(getattr(self, name), name))
        for name in ("latent_features", "latent_channels"):
            object.__setattr__(self, name, validate_latent_size(getattr(self, name), name))
        self._validate_rank_policy()
        if self.predict_latency is not None and not isinstance(self.predict_latency, bool):
            raise ValueError(
                f"predict_latency must be None or a bool; got {self.predict_latency!r}"
            )
        if self.on_untraceable not in ("descend", "raise"):
            raise ValueError(
                f"on_untraceable must be 'descend' or 'raise'; got {self.on_untraceable!r}"
            )
        object.__setattr__(self, "leaf_modules", _validate_leaf_modules(self.leaf_modules))
        object.__setattr__(self, "shrinkage", _validate_shrinkage(self.shrinkage))
        if not isinstance(self.method, str):
            raise ValueError(
                f"method must be a str naming a registered method; got {self.method!r}"
            )

    def _validate_rank_policy(self) -> None:
        get_cost_model(self.cost_model)  # raises ValueError naming cost_model
        tolerance, budget = self.tolerance, self.budget
        if tolerance is not None and not (
            isinstance(tolerance, numbers.Real)
            and not isinstance(tolerance, bool)
            and 0.0 < tolerance < 1.0
        ):
            raise ValueError(f"tolerance must be None or a float in (0, 1); got {tolerance!r}")
        if budget is not None and not (
            isinstance(budget, numbers.Real)
            and not isinstance(budget, bool)
            and 0.0 < budget <= 1.0
        ):
            raise ValueError(f"budget must be None or a float in (0, 1]; got {budget!r}")
        if tolerance is not None and budget is not None:
            raise ValueError("set at most one of tolerance and budget; got both")
        multiple = self.rank_multiple
        if not (
            isinstance(multiple, numbers.Integral)
            and not isinstance(multiple, bool)
            and multiple >= 1
        ):
            raise ValueError(f"rank_multiple must be an int >= 1; got {multiple!r}")

    def replace(self, **overrides: Any) -> FactorizeConfig:
        """A copy with some fields changed; unknown names are a ``TypeError`` naming them.

        >>> FactorizeConfig().replace(latent_features=0.1).latent_features
        0.1
        """
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"unknown FactorizeConfig option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def build(cls, config: FactorizeConfig | None = None, **overrides: Any) -> FactorizeConfig:
        """``config`` (or the defaults) with ``overrides`` applied; how `transform` reads its kwargs.

        >>> FactorizeConfig.build(None, min_features=64).min_features
        64
        """
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a FactorizeConfig; got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config
