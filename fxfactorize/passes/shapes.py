"""Pass 2, shapes: run the example inputs through the graph, recording ``node.meta["tensor_meta"]``."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxfactorize.calling import check_example_inputs, evaluation_mode, normalize_inputs
from fxfactorize.errors import ShapePropagationError

# normalize_inputs / evaluation_mode / check_example_inputs live in fxfactorize.calling
__all__ = [
    "ShapePropagation",
    "check_example_inputs",
    "evaluation_mode",
    "normalize_inputs",
    "propagate_shapes",
]


class ShapePropagation(ShapeProp):
    """``ShapeProp`` whose failures are a :class:`ShapePropagationError` naming the node."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except ShapePropagationError:
            raise
        except Exception as error:
            cause = error.__cause__ or error
            raise ShapePropagationError(
                n.name, _describe_target(n), f"{type(cause).__name__}: {cause}"
            ) from error


def _describe_target(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
    """Annotate every node of ``gm`` with ``node.meta["tensor_meta"]`` (eval mode, no grad).

    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    >>> gm = propagate_shapes(gm, torch.ones(5, 3))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    [(5, 2)]
    """
    args = normalize_inputs(gm, example_inputs)
    with torch.no_grad(), evaluation_mode(gm), _torch_traceback_silenced():
        ShapePropagation(gm).propagate(*args)
    return gm


@contextlib.contextmanager
def _torch_traceback_silenced() -> Iterator[None]:
    """torch's ``ShapeProp`` prints a traceback to stderr before re-raising; the library never
    prints, and the :class:`ShapePropagationError` we raise already names the node and the cause."""
    module = sys.modules[ShapeProp.__module__]
    original = getattr(module, "traceback", None)
    if original is None:  # a torch version that does not print
        yield
        return
    module.traceback = types.SimpleNamespace(print_exc=lambda *args, **kwargs: None)
    try:
        yield
    finally:
        module.traceback = original
