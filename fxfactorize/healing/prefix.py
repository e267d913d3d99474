"""The frozen prefix of a GraphModule: what does not depend on a trainable parameter.

While only some parameters train, every node whose value depends on none of them (placeholders,
``get_attr`` of frozen tensors, and everything computed only from those) gives the same value at
every step for the same batch. :func:`split_frozen_prefix` cuts the graph there: a *prefix*
GraphModule computes the *frontier* (frozen values that a trainable part or the output uses) from
the model's inputs, and a *suffix* GraphModule computes the output from the frontier. The prefix
is run once per batch, without autograd; each training step runs only the suffix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from fxfactorize.calling import normalize_inputs

__all__ = ["FrozenSplit", "frozen_nodes", "split_frozen_prefix"]


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, field = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, field)


def _holds_trainable(value: Any, trainable: Collection[int]) -> bool:
    if isinstance(value, nn.Module):
        return any(id(p) in trainable for p in value.parameters())
    return isinstance(value, torch.Tensor) and id(value) in trainable


def frozen_nodes(gm: fx.GraphModule, trainable: Collection[int]) -> set[fx.Node]:
    """The nodes of ``gm`` whose values depend on no parameter whose ``id`` is in ``trainable``.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    >>> trainable = {id(p) for p in gm.get_submodule("2").parameters()}
    >>> sorted(node.name for node in frozen_nodes(gm, trainable))
    ['_0', '_1', 'input_1']
    """
    frozen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "get_attr":
            if not _holds_trainable(_attribute(gm, node.target), trainable):
                frozen.add(node)
            continue
        if node.op == "call_module" and _holds_trainable(gm.get_submodule(node.target), trainable):
            continue
        if all(arg in frozen for arg in node.all_input_nodes):
            frozen.add(node)
    return frozen


@dataclasses.dataclass
class FrozenSplit:
    """A GraphModule cut at its frozen frontier (see :func:`split_frozen_prefix`).

    ``suffix(*prefix(*inputs))`` computes what the original computes on ``inputs`` (positional,
    one per placeholder); :meth:`frontier` and :meth:`run` do that from a batch in any form.
    ``prefix_nodes`` counts the nodes the prefix computes (placeholders excluded).
    """

    original: fx.GraphModule
    prefix: fx.GraphModule
    suffix: fx.GraphModule
    frontier_names: list[str]
    prefix_nodes: int

    def frontier(self, batch: Any) -> tuple[Any, ...]:
        """The frontier values for ``batch`` (a tensor, tuple or dict of inputs), without grad."""
        with torch.no_grad():
            return tuple(self.prefix(*normalize_inputs(self.original, batch)))

    def run(self, frontier: tuple[Any, ...]) -> Any:
        """The model's output from ``frontier`` values (copied first: the suffix may write in
        place into a value that a cache keeps)."""
        copies = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, frontier)
        return self.suffix(*copies)


def split_frozen_prefix(gm: fx.GraphModule, trainable: Collection[int]) -> FrozenSplit | None:
    """Cut ``gm`` where its values start to depend on a trainable parameter (ids in
    ``trainable``); ``None`` when there is nothing worth caching (the frontier is only the
    placeholders) or the graph cannot be cut safely (custom code generation, ``*args`` inputs).

    The two parts share ``gm``'s submodules and parameters (nothing is copied).

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> gm = fx.symbolic_trace(model)
    >>> split = split_frozen_prefix(gm, {id(p) for p in model[2].parameters()})
    >>> split.frontier_names, split.prefix_nodes
    (['_1'], 2)
    >>> x = torch.randn(3, 4)
    >>> torch.equal(split.run(split.frontier(x)), gm(x))
    True
    """
    if type(gm.graph._codegen) is not fx.graph.CodeGen:  # pytree in/out specs: call gm whole
        return None
    nodes = list(gm.graph.nodes)
    if any(n.op == "placeholder" and str(n.target).startswith("*") for n in nodes):
        return None
    frozen = frozen_nodes(gm, trainable)
    frontier = [
        n
        for n in nodes
        if n in frozen and n.op != "get_attr" and any(user not in frozen for user in n.users)
    ]
    if all(n.op == "placeholder" for n in frontier):
        return None

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node in frozen:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in frontier))
    prefix = fx.GraphModule(gm, prefix_graph, class_name="FrozenPrefix")
    prefix.graph.eliminate_dead_code()  # keeps placeholders and impure calls (asserts)
    prefix.recompile()

    suffix_graph = fx.Graph()
    env = {n: suffix_graph.placeholder(n.name) for n in frontier}
    for node in nodes:
        if node in env:
            continue
        if node not in frozen or (
            node.op == "get_attr" and any(user not in frozen for user in node.users)
        ):
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    suffix_graph.lint()
    suffix = fx.GraphModule(gm, suffix_graph, class_name="TrainableSuffix")
    computed = sum(n.op not in ("placeholder", "output") for n in prefix.graph.nodes)
    return FrozenSplit(gm, prefix, suffix, [n.name for n in frontier], computed)
