"""Run the model as the pipeline sees it: its traced graph, or the model with each traced region
standing in through its graph, so that every planned layer (those made from functional calls
included) is a module object that a hook can watch and that :func:`~fxfactorize.passes.rewrite.install`
can swap."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx, nn

from fxfactorize.calling import call_model, evaluation_mode, normalize_inputs
from fxfactorize.passes.regions import Region
from fxfactorize.passes.rewrite import install

__all__ = ["StandIn", "running"]


class StandIn(nn.Module):
    """Takes a region's place in the model: binds the call's arguments to the region graph's
    signature and hands them, one per placeholder, to ``run`` (default: the graph itself)."""

    def __init__(self, gm: fx.GraphModule, run: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.gm = gm
        self._run = run or gm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(self.gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return self._run(*normalize_inputs(self.gm, dict(bound.arguments)))


@contextlib.contextmanager
def running(model: nn.Module, regions: list[Region]) -> Iterator[tuple[nn.Module, Callable]]:
    """``(root, run)``: ``run(batch)`` runs the model in eval mode, the regions' graphs in place;
    ``root`` holds every planned layer module (install replacements there). ``model`` is
    restored on exit.

    >>> import torch
    >>> from fxfactorize.passes.regions import Region
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> with running(model, [Region("", fx.symbolic_trace(model), {})]) as (root, run):
    ...     run(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """
    if regions[0].name == "":  # the root traced whole
        gm = regions[0].graph
        with evaluation_mode(gm):
            yield gm, lambda batch: gm(*normalize_inputs(gm, batch))
        return
    stand_ins = {
        model.get_submodule(region.name): StandIn(region.graph)
        for region in regions
        if not region.layer  # a bare layer region is its layer: hooks see it in the model
    }
    undo = install(model, stand_ins)
    try:
        with evaluation_mode(model):
            yield model, lambda batch: call_model(model, batch)
    finally:
        undo()
