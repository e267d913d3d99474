"""`LayerRecord`, `Plan` and `Report`: what the pass decided and did, per layer, as a table."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import warnings as _warnings_module
from collections.abc import Iterable
from typing import Any

from tabulate import tabulate

from fxfactorize.config import FactorizeConfig
from fxfactorize.costmodels.whole import LatencyPrediction
from fxfactorize.errors import FactorizeWarning

__all__ = [
    "REPORT_META",
    "SCHEMA_VERSION",
    "LayerRecord",
    "Plan",
    "Report",
    "attach_report",
    "format_count",
    "publish",
    "report_of",
]

log = logging.getLogger("fxfactorize")

#: Key of the report in a transform result's ``meta`` dict.
REPORT_META = "fxfactorize"

#: Version of the dictionary/JSON layout written by ``Plan.to_dict`` / ``Report.to_dict``.
#: Bumped only when a key changes meaning or disappears; new keys may appear without a bump.
SCHEMA_VERSION = 1


def format_count(value: int | float) -> str:
    """Human-readable count: ``1234567 -> '1.23M'``.

    >>> format_count(1234567), format_count(950), format_count(4.2e9)
    ('1.23M', '950', '4.20G')
    """
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


@dataclasses.dataclass
class LayerRecord:
    """One Linear/Conv layer of the model: its shape, the decision, and the result.

    ``rank`` is ``None`` and ``reason`` says why when the layer is left unchanged; ``nmse`` is
    filled in once the layer is solved (``nmse_source`` says whether it was estimated from the
    weights alone or measured on calibration data).
    """

    node: str
    target: str
    op: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...]
    groups: int
    macs_before: int
    params_before: int
    rank: int | None = None
    macs_after: int | None = None
    params_after: int | None = None
    reason: str | None = None
    nmse: float | None = None
    nmse_source: str | None = None
    method: str = "lowrank"
    detail: str | None = None  # method-specific structure, e.g. a tensorized format's ranks
    #: the record of the same module object reached under another name (its parameters count there)
    shared_with: str | None = None
    #: data-aware only: how far the calibration statistics were blended toward data-free (0: not
    #: at all, 1: the data-free solution), chosen on held-out calibration folds or given
    shrinkage: float | None = None
    #: factorized only: the layer's predicted seconds as planned ÷ as it is (the cost model's own
    #: ratio for a cost model in seconds; the latency roofline's under ``cost_model="macs"``)
    latency_ratio: float | None = None

    @property
    def factorized(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (``kernel`` becomes a list).

        >>> LayerRecord("fc", "fc", "Linear", 4, 2, (), 1, 8, 10).to_dict()["kernel"]
        []
        """
        data = dataclasses.asdict(self)
        data["kernel"] = list(self.kernel)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRecord:
        """Inverse of :meth:`to_dict`; keys this version does not know are ignored.

        >>> record = LayerRecord("fc", "fc", "Linear", 4, 2, (), 1, 8, 10, rank=1)
        >>> LayerRecord.from_dict(record.to_dict()) == record
        True
        """
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["kernel"] = tuple(values.get("kernel", ()))
        return cls(**values)

    def row(self) -> list[object]:
        kernel = "×".join(map(str, self.kernel)) if self.kernel else "-"
        after_macs = self.macs_after if self.factorized else self.macs_before
        after_params = self.params_after if self.factorized else self.params_before
        if not self.factorized:
            outcome = f"skipped: {self.reason}"
        elif self.nmse is None:
            outcome = "planned"
        else:
            outcome = f"{self.nmse:.3g} ({self.nmse_source})"
            if self.shrinkage:
                outcome = f"{self.nmse:.3g} ({self.nmse_source}, shrinkage {self.shrinkage:g})"
        if self.shared_with:
            outcome += f"; same module as {self.shared_with}"
        return [
            self.node,
            self.op,
            f"{self.in_features}→{self.out_features}",
            kernel,
            (self.detail or self.rank) if self.factorized else "-",
            format_count(self.macs_before),
            format_count(after_macs),
            format_count(self.params_before),
            format_count(after_params),
            outcome,
        ]


_HEADERS = [
    "node",
    "op",
    "in→out",
    "kernel",
    "rank",
    "MACs before",
    "MACs after",
    "params before",
    "params after",
    "nmse / reason",
]


class _LayerTable:
    """Shared table rendering and totals of :class:`Plan` and :class:`Report`."""

    title = ""
    kind = ""

    def __init__(self, layers: Iterable[LayerRecord], warnings: Iterable[str] = ()) -> None:
        self.layers = list(layers)
        #: the whole model's predicted latency as planned (a
        #: :class:`~fxfactorize.costmodels.LatencyPrediction`), or ``None`` if it was not timed
        self.latency: Any = None
        #: what a user must know about the result (a budget not met, too little calibration data)
        self.warnings = list(warnings)

    @property
    def factorized(self) -> list[LayerRecord]:
        """Records of the layers that are (to be) factorized."""
        return [record for record in self.layers if record.factorized]

    def totals(self) -> dict[str, int]:
        """MACs and parameters of all listed layers, before and after; a module listed under
        several names (``shared_with``) has its MACs counted at each call and its parameters once."""
        owned = [r for r in self.layers if not r.shared_with]
        before_m = sum(r.macs_before for r in self.layers)
        before_p = sum(r.params_before for r in owned)
        after_m = sum(r.macs_after if r.factorized else r.macs_before for r in self.layers)
        after_p = sum(r.params_after if r.factorized else r.params_before for r in owned)
        return {
            "macs_before": before_m,
            "macs_after": after_m,
            "params_before": before_p,
            "params_after": after_p,
        }

    def latency_summary(self) -> str:
        """The predicted latency line of the summary ("" when the model was not timed)."""
        if self.latency is None:
            return ""
        p = self.latency
        return (
            f"; predicted latency {p.ratio:.3f}× of the whole model ({p.measured_s * 1e3:.1f} ms "
            f"→ {p.predicted_s * 1e3:.1f} ms), {p.layers_ratio:.3f}× of its Linear/Conv layers' "
            f"seconds ({p.layers_s / p.measured_s:.0%} of the time)"
            if p.measured_s > 0
            else ""
        )

    def summary(self) -> str:
        t = self.totals()
        mac_ratio = t["macs_after"] / t["macs_before"] if t["macs_before"] else 1.0
        param_ratio = t["params_after"] / t["params_before"] if t["params_before"] else 1.0
        return (
            f"{len(self.factorized)} of {len(self.layers)} Linear/Conv layers factorized; "
            f"MACs {format_count(t['macs_before'])} → {format_count(t['macs_after'])} "
            f"({mac_ratio:.3f}×), params {format_count(t['params_before'])} → "
            f"{format_count(t['params_after'])} ({param_ratio:.3f}×){self.latency_summary()}"
        )

    def __str__(self) -> str:
        t = self.totals()
        rows = [record.row() for record in self.layers]
        rows.append(
            [
                "total",
                "",
                "",
                "",
                "",
                format_count(t["macs_before"]),
                format_count(t["macs_after"]),
                format_count(t["params_before"]),
                format_count(t["params_after"]),
                "",
            ]
        )
        table = tabulate(rows, headers=_HEADERS, tablefmt="simple")
        notes = "".join(f"\nwarning: {text}" for text in self.warnings)
        return f"{self.title}\n{table}\n{self.summary()}{notes}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.summary()}>"

    def _rows(self) -> list[list[object]]:
        t = self.totals()
        total = [format_count(t[key]) for key in ("macs_before", "macs_after")]
        total += [format_count(t[key]) for key in ("params_before", "params_after")]
        return [record.row() for record in self.layers] + [["total", "", "", "", "", *total, ""]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data with a stable schema (see the README's "Report schema").

        Keys: ``schema_version`` (int), ``kind`` (``"plan"`` or ``"report"``), ``config`` (the
        :class:`~fxfactorize.config.FactorizeConfig` fields), ``totals`` (``macs_before``,
        ``macs_after``, ``params_before``, ``params_after``), ``layers`` (one
        :meth:`LayerRecord.to_dict` per layer), ``warnings`` (list of str); a report adds
        ``seconds``.

        >>> import torch, fxfactorize as ff
        >>> p = ff.plan(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512))
        >>> d = p.to_dict()
        >>> d["schema_version"], d["kind"], d["layers"][0]["rank"]
        (1, 'plan', 128)
        """
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "config": _config_to_dict(getattr(self, "config", None)),
            "totals": self.totals(),
            "layers": [record.to_dict() for record in self.layers],
            "warnings": list(self.warnings),
            "latency": None if self.latency is None else self.latency.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string; values JSON cannot hold are written with ``str``.

        >>> import json, torch, fxfactorize as ff
        >>> json.loads(ff.plan(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512)).to_json())["kind"]
        'plan'
        """
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown, followed by the one-line summary.

        >>> import torch, fxfactorize as ff
        >>> print(ff.plan(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512)).to_markdown().splitlines()[0])
        | node   | op     | in→out   | kernel   |   rank | MACs before   | MACs after   | params before   | params after   | nmse / reason   |
        """
        table = tabulate(self._rows(), headers=_HEADERS, tablefmt="github")
        notes = "".join(f"\n\n**warning:** {text}" for text in self.warnings)
        return f"{table}\n\n{self.summary()}{notes}"

    def _repr_html_(self) -> str:
        table = tabulate(self._rows(), headers=_HEADERS, tablefmt="html")
        notes = "".join(f"<p><b>warning:</b> {html.escape(text)}</p>" for text in self.warnings)
        return (
            f"<p><b>{html.escape(self.title)}</b></p>{table}"
            f"<p>{html.escape(self.summary())}</p>{notes}"
        )

    def plot(self, figsize: tuple[float, float] = (10.0, 7.0)) -> Any:
        """A matplotlib figure: MACs and params before/after per factorized layer, and nmse.

        Needs matplotlib (``pip install 'fxfactorize[plot]'``).

        >>> import torch, fxfactorize as ff
        >>> gm = ff.transform(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512), progress=False)
        >>> len(gm.meta["fxfactorize"].plot().axes)
        3
        """
        from fxfactorize._plotting import plot_layer_table

        return plot_layer_table(self, figsize)


class Plan(_LayerTable):
    """The decisions of the plan pass: a rank or a skip reason per Linear/Conv layer.

    ``print(plan)`` shows the table; nothing has been solved yet, so there is no nmse.
    """

    title = "fxfactorize plan"
    kind = "plan"

    def __init__(
        self, layers: Iterable[LayerRecord], config: object, warnings: Iterable[str] = ()
    ) -> None:
        super().__init__(layers, warnings)
        self.config = config

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict`'s output (``ValueError`` for a newer schema).

        >>> import torch, fxfactorize as ff
        >>> p = ff.plan(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512))
        >>> Plan.from_dict(p.to_dict()).layers == p.layers
        True
        """
        layers, config = _parse(data, "plan")
        plan = cls(layers, config, _warnings(data))
        plan.latency = _latency(data)
        return plan


class Report(_LayerTable):
    """What ``transform`` did, attached to the result as ``gm.meta["fxfactorize"]``."""

    title = "fxfactorize report"
    kind = "report"

    def __init__(
        self,
        layers: Iterable[LayerRecord],
        config: object,
        seconds: float = 0.0,
        warnings: Iterable[str] = (),
    ) -> None:
        super().__init__(layers, warnings)
        self.config = config
        self.seconds = seconds
        #: how calibrated layers were solved: ``"propagate_error"`` (in graph order, on the
        #: factorized model's inputs), ``"independent"``, or ``None`` (no calibration)
        self.calibration: str | None = None
        #: the :class:`~fxfactorize.healing.HealReport` of ``transform(..., heal=...)``
        self.heal: Any = None

    def summary(self) -> str:
        how = f"; calibration: {self.calibration}" if self.calibration else ""
        if self.heal is not None:
            how += f"; healed {self.heal.steps} steps"
        return f"{super().summary()}{how}; took {self.seconds:.2f}s"

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Plan.to_dict`, plus ``seconds`` (wall time of ``transform``) and
        ``calibration`` (see :attr:`calibration`)."""
        return {**super().to_dict(), "seconds": self.seconds, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict`'s output (``ValueError`` for a newer schema).

        >>> import torch, fxfactorize as ff
        >>> gm = ff.transform(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512), progress=False)
        >>> again = Report.from_dict(gm.meta["fxfactorize"].to_dict())
        >>> again.layers == gm.meta["fxfactorize"].layers, again.config.latent_features
        (True, 128)
        """
        layers, config = _parse(data, "report")
        report = cls(layers, config, float(data.get("seconds", 0.0)), _warnings(data))
        report.calibration = data.get("calibration")
        report.latency = _latency(data)
        return report


def attach_report(model: Any, report: Report) -> None:
    """Put ``report`` in ``model.meta[REPORT_META]`` (``meta`` made a dict if the model has none).

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> attach_report(model, Report([], None))
    >>> report_of(model).layers
    []
    """
    meta = getattr(model, "meta", None)
    if meta is None:
        model.meta = {}
        meta = model.meta
    if not isinstance(meta, dict):
        raise TypeError(
            f"cannot attach the report: {type(model).__name__}.meta exists and is not a dict"
        )
    meta[REPORT_META] = report


def report_of(model: Any) -> Report:
    """The :class:`Report` that ``transform`` attached to its result.

    A fully traced model returns a GraphModule with the report in ``gm.meta["fxfactorize"]``; a
    partially traced one returns the original container with it in ``model.meta["fxfactorize"]``.

    >>> import torch, fxfactorize as ff
    >>> gm = ff.transform(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.ones(1, 512), progress=False)
    >>> report_of(gm).factorized[0].rank
    128
    """
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or REPORT_META not in meta:
        raise ValueError(
            f"{type(model).__name__} carries no fxfactorize report (not a transform result)"
        )
    return meta[REPORT_META]


def publish(report: Report, context: str = "") -> None:
    """Log ``report``'s summary and raise each of its warnings as a :class:`FactorizeWarning`.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     publish(Report([], None, warnings=["budget=0.1 cannot be met"]))
    >>> [str(w.message) for w in caught]
    ['budget=0.1 cannot be met']
    """
    log.info("%s%s", report.summary(), context)
    for text in report.warnings:
        _warnings_module.warn(text, FactorizeWarning, stacklevel=3)


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for a config value (e.g. a cost model instance becomes its name)."""
    if value is None or isinstance(value, (str, int, float, bool, list, tuple, dict)):
        return value
    return getattr(value, "name", repr(value))


def _config_to_dict(config: object) -> dict[str, Any] | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config)
        }
    return dict(config)  # type: ignore[call-overload]


def _config_from_dict(data: dict[str, Any] | None) -> object:
    """A FactorizeConfig when the fields allow one, else the plain dict (e.g. from a newer version)."""
    if data is None:
        return None
    known = {field.name for field in dataclasses.fields(FactorizeConfig)}
    try:
        return FactorizeConfig(**{key: value for key, value in data.items() if key in known})
    except (TypeError, ValueError):
        return dict(data)


def _latency(data: dict[str, Any]) -> LatencyPrediction | None:
    latency = data.get("latency")
    return None if latency is None else LatencyPrediction.from_dict(latency)


def _warnings(data: dict[str, Any]) -> list[str]:
    return [str(text) for text in data.get("warnings") or ()]


def _parse(data: dict[str, Any], kind: str) -> tuple[list[LayerRecord], object]:
    if not isinstance(data, dict) or "layers" not in data:
        raise ValueError(
            f"expected a {kind} dictionary with a 'layers' list; got {type(data).__name__}"
        )
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(
            f"{kind} schema_version {version!r} is not readable by this fxfactorize "
            f"(reads schema_version <= {SCHEMA_VERSION}); upgrade fxfactorize"
        )
    layers = [LayerRecord.from_dict(item) for item in data["layers"]]
    return layers, _config_from_dict(data.get("config"))


@dataclasses.dataclass(frozen=True)
class UntracedModule:
    """A module torch.fx could not trace whole (its traceable children were transformed instead)."""

    name: str  # qualified name in the model; "" is the model itself
    module_class: str
    reason: str  # torch.fx's message


def _regions_text(regions: list[str], untraced: list[UntracedModule]) -> list[str]:
    lines = [f"traced regions: {', '.join(regions) or 'none'}"]
    for module in untraced:
        name = module.name or "(model)"
        lines.append(f"not traced: {name} ({module.module_class}): {module.reason}")
    return lines


class PartialPlan(Plan):
    """The :class:`Plan` of a model whose root did not trace, with its ``regions`` and ``untraced``
    modules (see :class:`PartialReport`)."""

    def __init__(
        self,
        layers: Iterable[LayerRecord],
        config: object,
        regions: Iterable[str] = (),
        untraced: Iterable[UntracedModule] = (),
        warnings: Iterable[str] = (),
    ) -> None:
        super().__init__(layers, config, warnings)
        self.regions = list(regions)
        self.untraced = list(untraced)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *_regions_text(self.regions, self.untraced)])


class PartialReport(Report):
    """The :class:`Report` of a model whose root did not trace: the table of every layer found in
    the traced ``regions`` (qualified names of the submodules that became GraphModules or were
    replaced whole), plus the ``untraced`` modules with torch.fx's reason.
    """

    def __init__(
        self,
        layers: Iterable[LayerRecord],
        config: object,
        seconds: float = 0.0,
        regions: Iterable[str] = (),
        untraced: Iterable[UntracedModule] = (),
        warnings: Iterable[str] = (),
    ) -> None:
        super().__init__(layers, config, seconds, warnings)
        self.regions = list(regions)
        self.untraced = list(untraced)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *_regions_text(self.regions, self.untraced)])

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Report.to_dict`, plus ``regions`` and ``untraced`` (name, class, reason)."""
        untraced = [dataclasses.asdict(module) for module in self.untraced]
        return {**super().to_dict(), "regions": list(self.regions), "untraced": untraced}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartialReport:
        """Inverse of :meth:`to_dict`."""
        report = Report.from_dict(data)
        untraced = [UntracedModule(**module) for module in data.get("untraced", [])]
        partial = cls(
            report.layers,
            report.config,
            report.seconds,
            data.get("regions", []),
            untraced,
            report.warnings,
        )
        partial.calibration = report.calibration
        return partial


__all__ += ["PartialPlan", "PartialReport", "UntracedModule"]  # issue 7: partial tracing
