"""Pass 2, shapes: run the example inputs through the graph, recording ``node.meta["tensor_meta"]``."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxfactorize.errors import ShapePropagationError

__all__ = ["ShapePropagation", "check_example_inputs", "normalize_inputs", "propagate_shapes"]


def check_example_inputs(example_inputs: Any, name: str = "example_inputs") -> None:
    """``ValueError`` naming the input if a tensor of ``example_inputs`` is empty: shapes and MAC
    counts taken from zero rows would make every layer look free (nothing would be factorized),
    and a calibration batch of zero rows says nothing.

    >>> check_example_inputs((torch.ones(2, 3), {"mask": torch.ones(2)}))
    >>> check_example_inputs({"x": torch.ones(0, 3)})
    Traceback (most recent call last):
    ...
    ValueError: example_inputs['x'] is empty (shape (0, 3)): give at least one row
    """

    def visit(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                raise ValueError(
                    f"{path} is empty (shape {tuple(value.shape)}): give at least one row"
                )
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]")
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]")

    visit(example_inputs, name)


def normalize_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple[Any, ...]:
    """Turn ``example_inputs`` (a tensor, a tuple/list of positional args, or a dict of keyword
    args) into one positional value per placeholder of ``gm``, using defaults where given.

    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    >>> normalize_inputs(gm, {"input": torch.ones(1, 3)})[0].shape
    torch.Size([1, 3])
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        values = []
        known = {node.target for node in placeholders}
        unknown = sorted(set(example_inputs) - known)
        if unknown:
            raise ValueError(
                f"example_inputs has keyword(s) {unknown} that the model's forward does not take "
                f"(it takes {sorted(known)})"
            )
        for node in placeholders:
            if node.target in example_inputs:
                values.append(example_inputs[node.target])
            elif node.args:
                values.append(node.args[0])
            else:
                raise ValueError(f"example_inputs is missing the model input {node.target!r}")
        return tuple(values)
    if isinstance(example_inputs, (tuple, list)):
        values = list(example_inputs)
        if len(values) > len(placeholders):
            raise ValueError(
                f"example_inputs has {len(values)} positional values but the model takes "
                f"{len(placeholders)}"
            )
        for node in placeholders[len(values) :]:
            if not node.args:
                raise ValueError(f"example_inputs is missing the model input {node.target!r}")
            values.append(node.args[0])
        return tuple(values)
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs; got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (no BatchNorm statistics update), restoring each flag after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
