"""The method interface and its registry."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from torch import nn

from fxfactorize.core.moments import Statistics
from fxfactorize.layers import LayerShape

__all__ = [
    "AUTO_METHOD",
    "DEFAULT_METHOD",
    "Method",
    "Solved",
    "get_method",
    "register_method",
    "registered_methods",
    "spec_bool",
    "spec_int",
    "spec_value",
]

#: The method for layers the configured method does not handle (Composer's rank-r pair).
DEFAULT_METHOD = "lowrank"
#: Not a handler: the planner picks per conv the structure and rank (the pair for Linear layers).
AUTO_METHOD = "auto"


@dataclasses.dataclass
class Solved:
    """A solved replacement: the module to put in place and the error it makes."""

    module: nn.Module
    nmse: float
    nmse_source: str  # "weights" or "calibration"
    bias: bool  # whether the replacement carries an output bias
    detail: str | None = None  # format-specific description (e.g. tensorized modes and ranks)
    shrinkage: float | None = None  # α blended toward data-free (data-aware pairs only)
    shrinkage_note: str | None = None  # why α could not be validated on held-out folds


class Method(Protocol):
    """What a factorization method provides to the pipeline; the passes call nothing else.

    ``kinds`` are the layer kinds it replaces (``"linear"``, ``"conv2d"``, ...); ``is_pair`` says
    that its replacement at rank ``r`` is the rank-r pair the cost models price and whose error
    the rank policies predict from the spectrum (other methods are planned by MACs alone).
    """

    name: str
    kinds: tuple[str, ...]
    is_pair: bool

    def accepts(self, layer: LayerShape) -> str | None:
        """``None`` if this method can factorize ``layer``, else the reason it cannot."""

    def cost(self, layer: LayerShape, rank: int) -> tuple[int, int]:
        """``(MACs, params)`` of the replacement at ``rank``."""

    def detail(self, layer: LayerShape, rank: int) -> str | None:
        """A description of the replacement's structure for the report (``None``: the rank says all)."""

    def solve(
        self,
        module: nn.Module,
        layer: LayerShape,
        rank: int,
        moments: Statistics | None,
        shrinkage: float = 0.0,
    ) -> Solved:
        """Build the replacement of ``module`` at ``rank`` (data-aware when ``moments`` is given:
        :class:`~fxfactorize.core.moments.PairedMoments` for the error-propagating objective;
        ``shrinkage`` blends them toward data-free, see :func:`fxfactorize.core.lowrank.factorize_weight`)."""

    def describe(self, replacement: nn.Module) -> dict:
        """A JSON-able spec from which :meth:`rebuild` recreates ``replacement``'s structure."""

    def spec_shapes(self, layer: LayerShape, spec: dict) -> dict[str, tuple[int, ...]]:
        """The state-dict shapes (keys relative to the replacement) :meth:`rebuild` would give.

        Computed without building anything, so a spec read from a file can be checked against
        the saved tensors first; ``ValueError`` naming the spec key when ``spec`` is malformed
        or out of bounds for ``layer``.
        """

    def rebuild(self, module: nn.Module, layer: LayerShape, spec: dict) -> nn.Module:
        """An (unsolved) replacement for ``module`` shaped as ``spec`` says; weights are loaded after."""


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` (replacing any earlier one)."""
    _REGISTRY[method.name] = method
    return method


def registered_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The handler registered as ``name``; ``ValueError`` naming the choices otherwise.

    >>> import fxfactorize.methods
    >>> get_method("lowrank").name
    'lowrank'
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = [AUTO_METHOD, *registered_methods()]
        raise ValueError(f"method must be one of {choices}; got {name!r}") from None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spec_value(spec: dict, key: str) -> object:
    """``spec[key]``; ``ValueError`` naming the key when it is missing.

    >>> spec_value({"rank": 8}, "bias")
    Traceback (most recent call last):
    ...
    ValueError: spec has no 'bias'
    """
    if key not in spec:
        raise ValueError(f"spec has no {key!r}")
    return spec[key]


def spec_int(spec: dict, key: str, low: int, high: int) -> int:
    """``spec[key]`` when it is an int (not a bool, not a float) in ``[low, high]``.

    >>> spec_int({"rank": 8}, "rank", 1, 32)
    8
    >>> spec_int({"rank": 128.9}, "rank", 1, 32)
    Traceback (most recent call last):
    ...
    ValueError: spec 'rank' must be an int in [1, 32]; got 128.9
    """
    value = spec_value(spec, key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"spec {key!r} must be an int in [{low}, {high}]; got {_short(value)}")
    return value


def spec_bool(spec: dict, key: str) -> bool:
    """``spec[key]`` when it is a bool (JSON ``true``/``false``).

    >>> spec_bool({"bias": 1}, "bias")
    Traceback (most recent call last):
    ...
    ValueError: spec 'bias' must be true or false; got 1
    """
    value = spec_value(spec, key)
    if not isinstance(value, bool):
        raise ValueError(f"spec {key!r} must be true or false; got {_short(value)}")
    return value
