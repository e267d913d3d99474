"""Model inputs in one place: checking them, binding them to a graph's placeholders, calling a
model on them, and running a model in eval mode. Every pass and the equivalence check go through
these, so a tensor, a tuple of positional inputs and a dict of keyword inputs work everywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx

__all__ = ["call_model", "check_example_inputs", "evaluation_mode", "normalize_inputs"]


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
def evaluation_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode (no BatchNorm statistics update, no dropout), restoring each
    submodule's flag after.

    >>> model = torch.nn.Sequential(torch.nn.Dropout()).train()
    >>> with evaluation_mode(model):
    ...     model[0].training
    False
    >>> model[0].training
    True
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    >>> call_model(torch.nn.Linear(3, 2), {"input": torch.ones(1, 3)}).shape
    torch.Size([1, 2])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
