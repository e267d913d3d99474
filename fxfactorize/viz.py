"""Looking at the rewritten region of a graph: a ``print_tabular``-style listing and a drawing.

The drawing uses graphviz (``torch.fx.passes.graph_drawer``) when pydot and the ``dot`` program are
installed, and matplotlib otherwise, so it renders on machines without system graphviz.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from typing import Any

from tabulate import tabulate
from torch import fx

from fxfactorize.modules import FactorizedPair
from fxfactorize.report import REPORT_META

__all__ = ["changed_nodes", "draw_region", "graphviz_available", "region_nodes", "region_table"]


def changed_nodes(gm: fx.GraphModule) -> list[str]:
    """Names of the ``call_module`` nodes of ``gm`` whose module is an fxfactorize replacement.

    >>> import torch, fxfactorize as ff
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4))
    >>> changed_nodes(ff.transform(model, torch.randn(2, 512), progress=False))
    ['_0']
    """
    report = gm.meta.get(REPORT_META)
    targets = {record.target for record in getattr(report, "factorized", [])}
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in targets or isinstance(gm.get_submodule(node.target), FactorizedPair):
            names.append(node.name)
    return names


def region_nodes(
    gm: fx.GraphModule, nodes: Iterable[str] | None = None, context: int = 1
) -> list[fx.Node]:
    """The nodes named in ``nodes`` (default: :func:`changed_nodes`) and ``context`` neighbours
    on each side in graph order, in graph order.

    >>> import torch
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> [n.name for n in region_nodes(gm, ["_1"], context=1)]
    ['_0', '_1', 'output']
    """
    wanted = set(changed_nodes(gm) if nodes is None else nodes)
    ordered = list(gm.graph.nodes)
    known = {node.name for node in ordered}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"nodes {unknown} are not in the graph")
    keep = set()
    for index, node in enumerate(ordered):
        if node.name in wanted:
            keep.update(range(max(0, index - context), min(len(ordered), index + context + 1)))
    return [ordered[index] for index in sorted(keep)]


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        return ""
    module = gm.get_submodule(node.target)
    if isinstance(module, FactorizedPair):
        return f"{type(module).__name__}(rank={module.latent_size})"
    return type(module).__name__


def region_table(gm: fx.GraphModule, nodes: Iterable[str] | None = None, context: int = 1) -> str:
    """A ``print_tabular``-style table (opcode, name, target, args, module) of the region.

    Pass the same ``nodes`` for the traced original and the transformed graph to compare them
    (node names do not change in a rewrite).

    >>> import torch
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> print(region_table(gm, ["_0"], context=0))
    opcode       name    target    args        module
    -----------  ------  --------  ----------  --------
    call_module  _0      0         (input_1,)  Linear
    """
    rows = [
        [node.op, node.name, _target_name(node), _args_text(node), _describe(gm, node)]
        for node in region_nodes(gm, nodes, context)
    ]
    return tabulate(
        rows,
        headers=["opcode", "name", "target", "args", "module"],
        tablefmt="simple",
        disable_numparse=True,  # targets like "0" are names, not numbers
    )


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _args_text(node: fx.Node) -> str:
    text = str(tuple(node.args))
    return text if len(text) <= 40 else text[:37] + "..."


def graphviz_available() -> bool:
    """Whether pydot and the graphviz ``dot`` program are both installed."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


def draw_region(
    gm: fx.GraphModule,
    nodes: Iterable[str] | None = None,
    context: int = 1,
    backend: str = "auto",
    max_nodes: int = 40,
) -> Any:
    """Draw the rewritten region of ``gm`` (changed nodes highlighted).

    ``backend="graphviz"`` returns the ``pydot.Dot`` of the whole graph from
    ``torch.fx.passes.graph_drawer.FxGraphDrawer`` (write it with ``create_svg()``);
    ``backend="matplotlib"`` returns a matplotlib figure of the region only (at most
    ``max_nodes`` nodes); ``"auto"`` picks graphviz when :func:`graphviz_available`.

    >>> import torch, fxfactorize as ff
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
    >>> figure = draw_region(ff.transform(model, torch.randn(2, 512), progress=False), backend="matplotlib")
    >>> type(figure).__name__
    'Figure'
    """
    if backend not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"backend must be 'auto', 'graphviz' or 'matplotlib'; got {backend!r}")
    if backend == "graphviz" or (backend == "auto" and graphviz_available()):
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        return FxGraphDrawer(gm, "fxfactorize").get_dot_graph()
    return _draw_with_matplotlib(gm, region_nodes(gm, nodes, context)[:max_nodes], nodes)


def _draw_with_matplotlib(
    gm: fx.GraphModule, region: list[fx.Node], nodes: Iterable[str] | None
) -> Any:
    from fxfactorize._plotting import require_matplotlib

    plt = require_matplotlib()
    changed = set(changed_nodes(gm) if nodes is None else nodes)
    height = max(2.0, 0.55 * len(region))
    fig, ax = plt.subplots(figsize=(7.0, height), layout="constrained")
    y_of = {node.name: len(region) - 1 - index for index, node in enumerate(region)}
    for node in region:  # edges first, so the boxes sit on top
        for user in node.users:
            if user.name not in y_of:
                continue
            skip = y_of[node.name] - y_of[user.name] > 1  # not the next node: bend the arrow
            ax.annotate(
                "",
                xy=(0, y_of[user.name] + 0.2),
                xytext=(0, y_of[node.name] - 0.2),
                arrowprops={
                    "arrowstyle": "->",
                    "color": "0.4",
                    "connectionstyle": "arc3,rad=-0.6" if skip else "arc3",
                },
            )
    for node in region:
        label = f"{node.name}  {_describe(gm, node) or _target_name(node)}"
        color = "#ffd8a8" if node.name in changed else "#e9ecef"
        ax.text(0, y_of[node.name], label, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": color, "edgecolor": "0.3"})  # fmt: skip
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-0.8, len(region) - 0.2)
    ax.axis("off")
    ax.set_title("rewritten region (orange: factorized)")
    return fig
