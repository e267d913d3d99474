"""`models()`: Hypothesis strategy of small random DAG models that torch.fx can trace."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st
from torch import nn

from fxfactorize.testing.layers import init_layer

__all__ = ["DrawnModel", "RandomDAG", "models"]

ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class DrawnModel(NamedTuple):
    """A drawn model, example inputs for it, and the rank of every Linear/Conv weight in it."""

    model: nn.Module
    example_inputs: torch.Tensor
    weight_ranks: dict[str, int]


class RandomDAG(nn.Module):
    """A model that replays ``steps`` over a list of values (the input is value 0).

    A step is ``("layer", name, source)`` (apply submodule ``name`` to value ``source``),
    ``("add", a, b)`` or ``("cat", a, b)`` (along dim 1); ``outputs`` are the returned values (one
    index: a tensor, several: a tuple). ``torch.fx`` unrolls the loop into a plain graph.

    >>> net = RandomDAG({"fc": nn.Linear(3, 3)}, [("layer", "fc", 0), ("add", 0, 1)], [2])
    >>> net(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self, layers: dict[str, nn.Module], steps: list[tuple], outputs: list[int]
    ) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.steps = [tuple(step) for step in steps]
        self.outputs = list(outputs)

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for kind, first, second in self.steps:
            if kind == "layer":
                values.append(getattr(self, first)(values[second]))
            elif kind == "add":
                values.append(values[first] + values[second])
            else:
                values.append(torch.cat([values[first], values[second]], dim=1))
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return tuple(values[i] for i in self.outputs)


@st.composite
def models(
    draw: st.DrawFn,
    kinds: tuple[str, ...] = ("linear", "conv"),
    max_layers: int = 4,
    max_width: int = 16,
    weight_rank: int | None = None,
    batch: int = 2,
) -> DrawnModel:
    """Strategy of small random DAGs of Linear or Conv2d layers, activations, residual adds and
    concatenations (sometimes with a Flatten→Linear head, sometimes returning a tuple); the
    first step is always a layer.

    ``weight_rank`` caps the rank of every layer's weight (``min(weight_rank, out, fan_in)``), so
    factorizing at that rank is exact. Draws a :class:`DrawnModel` ``(model, example_inputs,
    weight_ranks)``; the example has ``batch`` rows.

    >>> from hypothesis import find
    >>> drawn = find(models(kinds=("conv",), weight_rank=2), lambda d: len(d.weight_ranks) >= 2)
    >>> drawn.model(drawn.example_inputs) is not None, max(drawn.weight_ranks.values()) <= 2
    (True, True)
    """
    if not kinds or set(kinds) - {"linear", "conv"}:
        raise ValueError(f"kinds must be a non-empty subset of ('linear', 'conv'); got {kinds!r}")
    kind = draw(st.sampled_from(kinds))
    conv = kind == "conv"
    width = st.integers(2, max_width)
    widths = [draw(width)]
    size = draw(st.integers(4, 7)) if conv else 0
    layers: dict[str, nn.Module] = {}
    ranks: dict[str, int] = {}
    steps: list[tuple] = []

    def add_layer(layer: nn.Module, source: int, out_width: int) -> None:
        name = f"layer{len(ranks)}"
        full = min(layer.weight.shape[0], layer.weight[0].numel())
        rank = full if weight_rank is None else min(weight_rank, full)
        layers[name] = init_layer(layer, draw(st.integers(0, 2**32 - 1)), rank)
        ranks[name] = rank
        steps.append(("layer", name, source))
        widths.append(out_width)
        activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
        if activation != "identity":
            act_name = f"act{len(steps)}"
            layers[act_name] = ACTIVATIONS[activation]()
            steps.append(("layer", act_name, len(widths) - 1))
            widths.append(out_width)

    for _ in range(draw(st.integers(1, max_layers))):
        last = len(widths) - 1
        source = draw(st.integers(0, last).map(lambda i, last=last: last - i))  # shrinks to last
        same = [i for i, w in enumerate(widths) if w == widths[source] and i != source]
        op = draw(st.sampled_from(["layer", "layer", "add", "cat"])) if ranks else "layer"
        if op == "add" and same:
            steps.append(("add", source, draw(st.sampled_from(same))))
            widths.append(widths[source])
        elif op == "cat" and widths[source] + widths[-1] <= 2 * max_width:
            steps.append(("cat", source, last))
            widths.append(widths[source] + widths[last])
        else:
            out_width = draw(width)
            bias = draw(st.booleans())
            if conv:
                kernel = draw(st.sampled_from([1, 3]))
                layer = nn.Conv2d(widths[source], out_width, kernel, padding=kernel // 2, bias=bias)
            else:
                layer = nn.Linear(widths[source], out_width, bias=bias)
            add_layer(layer, source, out_width)
    if conv and draw(st.booleans()):  # a classifier head
        layers["flatten"] = nn.Flatten()
        steps.append(("layer", "flatten", len(widths) - 1))
        widths.append(widths[-1] * size * size)
        add_layer(nn.Linear(widths[-1], draw(width)), len(widths) - 1, 0)
    outputs = [len(widths) - 1]
    if len(widths) > 2 and draw(st.booleans()):  # a second output: exercises tuple comparison
        outputs.append(draw(st.integers(1, len(widths) - 2)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    shape = (batch, widths[0], size, size) if conv else (batch, widths[0])
    model = RandomDAG(layers, steps, outputs).eval()
    return DrawnModel(model, torch.randn(shape, generator=gen), ranks)
