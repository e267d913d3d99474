"""Pass 3, cost: the shape, multiply-adds and parameters of every Linear/Conv node.

Each ``call_module`` node of a supported layer gets ``node.meta[LAYER_META]``, a
:class:`~fxfactorize.layers.LayerShape`. MACs are counted for one forward pass of the example
inputs. (``LayerShape`` and ``describe_module`` live in :mod:`fxfactorize.layers`; they are
re-exported here for existing imports.)
"""

from __future__ import annotations

import math

from torch import fx

from fxfactorize.layers import LayerShape, describe_module

__all__ = ["LAYER_META", "LayerShape", "annotate_costs", "describe_module"]

LAYER_META = "fxfactorize_layer"


def annotate_costs(gm: fx.GraphModule) -> fx.GraphModule:
    """Attach a :class:`LayerShape` to each supported ``call_module`` node (needs shape metadata).

    >>> import torch
    >>> from torch import nn
    >>> from fxfactorize.passes.shapes import propagate_shapes
    >>> gm = propagate_shapes(fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2))), torch.ones(3, 4))
    >>> [n.meta[LAYER_META].macs for n in annotate_costs(gm).graph.nodes if LAYER_META in n.meta]
    [24]
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or "tensor_meta" not in node.meta:
            continue
        meta = node.meta["tensor_meta"]
        shape = getattr(meta, "shape", None)
        if shape is None:  # the module returned a non-tensor
            continue
        layer = describe_module(gm.get_submodule(node.target), math.prod(shape))
        if layer is not None:
            node.meta[LAYER_META] = layer
    return gm
