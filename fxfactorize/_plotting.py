"""matplotlib helpers; matplotlib is the optional extra ``fxfactorize[plot]``."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_layer_table", "require_matplotlib"]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` (headless-safe), or an ImportError naming the extra to install.

    >>> require_matplotlib().__name__
    'matplotlib.pyplot'
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "plotting needs matplotlib, an optional extra: pip install 'fxfactorize[plot]'"
        ) from error
    import sys

    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # no display outside notebooks; keep the user's choice otherwise
    import matplotlib.pyplot as plt

    return plt


def plot_layer_table(table: Any, figsize: tuple[float, float] = (10.0, 7.0)) -> Any:
    """Figure of a Plan/Report: MACs and params before/after, and nmse, per factorized layer."""
    plt = require_matplotlib()
    records = table.factorized
    names = [record.target for record in records]
    positions = list(range(len(records)))
    width = 0.4
    fig, axes = plt.subplots(3, 1, figsize=figsize, sharex=True, layout="constrained")
    for ax, key, label in (
        (axes[0], "macs", "MACs"),
        (axes[1], "params", "parameters"),
    ):
        before = [getattr(record, f"{key}_before") for record in records]
        after = [getattr(record, f"{key}_after") or 0 for record in records]
        ax.bar([p - width / 2 for p in positions], before, width, label="before")
        ax.bar([p + width / 2 for p in positions], after, width, label="after")
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize="small")
    nmse = [record.nmse if record.nmse is not None else float("nan") for record in records]
    axes[2].bar(positions, nmse, color="tab:red")
    axes[2].set_ylabel("nmse")
    axes[2].set_xticks(positions, names, rotation=90, fontsize="x-small")
    axes[0].set_title(f"{table.title}: {len(records)} factorized layers")
    return fig
