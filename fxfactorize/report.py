"""`LayerRecord`, `Plan` and `Report`: what the pass decided and did, per layer, as a table."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from tabulate import tabulate

__all__ = ["LayerRecord", "Plan", "Report", "format_count"]


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

    @property
    def factorized(self) -> bool:
        return self.rank is not None

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
        return [
            self.node,
            self.op,
            f"{self.in_features}→{self.out_features}",
            kernel,
            self.rank if self.factorized else "-",
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

    def __init__(self, layers: Iterable[LayerRecord]) -> None:
        self.layers = list(layers)

    @property
    def factorized(self) -> list[LayerRecord]:
        """Records of the layers that are (to be) factorized."""
        return [record for record in self.layers if record.factorized]

    def totals(self) -> dict[str, int]:
        """MACs and parameters of all listed layers, before and after."""
        before_m = sum(r.macs_before for r in self.layers)
        before_p = sum(r.params_before for r in self.layers)
        after_m = sum(r.macs_after if r.factorized else r.macs_before for r in self.layers)
        after_p = sum(r.params_after if r.factorized else r.params_before for r in self.layers)
        return {
            "macs_before": before_m,
            "macs_after": after_m,
            "params_before": before_p,
            "params_after": after_p,
        }

    def summary(self) -> str:
        t = self.totals()
        mac_ratio = t["macs_after"] / t["macs_before"] if t["macs_before"] else 1.0
        param_ratio = t["params_after"] / t["params_before"] if t["params_before"] else 1.0
        return (
            f"{len(self.factorized)} of {len(self.layers)} Linear/Conv layers factorized; "
            f"MACs {format_count(t['macs_before'])} → {format_count(t['macs_after'])} "
            f"({mac_ratio:.3f}×), params {format_count(t['params_before'])} → "
            f"{format_count(t['params_after'])} ({param_ratio:.3f}×)"
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
        return f"{self.title}\n{table}\n{self.summary()}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.summary()}>"


class Plan(_LayerTable):
    """The decisions of the plan pass: a rank or a skip reason per Linear/Conv layer.

    ``print(plan)`` shows the table; nothing has been solved yet, so there is no nmse.
    """

    title = "fxfactorize plan"

    def __init__(self, layers: Iterable[LayerRecord], config: object) -> None:
        super().__init__(layers)
        self.config = config


class Report(_LayerTable):
    """What ``transform`` did, attached to the result as ``gm.meta["fxfactorize"]``."""

    title = "fxfactorize report"

    def __init__(self, layers: Iterable[LayerRecord], config: object, seconds: float = 0.0) -> None:
        super().__init__(layers)
        self.config = config
        self.seconds = seconds

    def summary(self) -> str:
        return f"{super().summary()}; took {self.seconds:.2f}s"


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
    ) -> None:
        super().__init__(layers, config)
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
    ) -> None:
        super().__init__(layers, config, seconds)
        self.regions = list(regions)
        self.untraced = list(untraced)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *_regions_text(self.regions, self.untraced)])


__all__ += ["PartialPlan", "PartialReport", "UntracedModule"]  # issue 7: partial tracing
