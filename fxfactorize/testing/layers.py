"""Strategies for single layers and their weights: `linear_layers`, `conv2d_layers`, `low_rank_weights`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["conv2d_layers", "init_layer", "linear_layers", "low_rank_tensor", "low_rank_weights"]


def low_rank_tensor(shape: Sequence[int], rank: int, seed: int) -> torch.Tensor:
    """A float32 tensor of ``shape`` whose ``[shape[0], -1]`` matrix has exactly rank ``rank``.

    Scaled like PyTorch's default init (entries of size ~1/√fan_in).

    >>> w = low_rank_tensor((6, 4, 3, 3), 2, seed=0)
    >>> int(torch.linalg.matrix_rank(w.reshape(6, -1).double(), rtol=1e-5))
    2
    """
    rows, cols = shape[0], math.prod(shape[1:])
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(
            f"rank must be in [1, min{(rows, cols)}] for shape {tuple(shape)}; got {rank}"
        )
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=gen, dtype=torch.float64)
    return (left @ right / math.sqrt(rank * cols)).reshape(tuple(shape)).float()


def low_rank_weights(shape: Sequence[int], rank: int | st.SearchStrategy[int]) -> st.SearchStrategy:
    """Strategy of weights of ``shape`` (Linear ``[out, in]`` or conv ``[out, in/groups, kh, kw]``)
    whose matrix ``[out, -1]`` has rank ``rank`` (an int or a strategy of ints).

    >>> from hypothesis import find
    >>> w = find(low_rank_weights((8, 5), 3), lambda w: True)
    >>> tuple(w.shape), int(torch.linalg.matrix_rank(w.double(), rtol=1e-5))
    ((8, 5), 3)
    """
    ranks = rank if isinstance(rank, st.SearchStrategy) else st.just(rank)
    return st.builds(
        lambda r, seed: low_rank_tensor(shape, r, seed), ranks, st.integers(0, 2**32 - 1)
    )


def init_layer(layer: nn.Module, seed: int, rank: int | None = None) -> nn.Module:
    """Give ``layer`` deterministic weights from ``seed`` (of ``rank`` if given); the global RNG is untouched."""
    gen = torch.Generator().manual_seed(seed)
    weight = layer.weight
    with torch.no_grad():
        if rank is None:
            bound = 1.0 / math.sqrt(max(1, weight[0].numel()))
            weight.copy_((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound * math.sqrt(3))
        else:
            weight.copy_(low_rank_tensor(weight.shape, rank, seed))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    return layer


@st.composite
def linear_layers(
    draw: st.DrawFn, min_features: int = 1, max_features: int = 32, bias: bool | None = None
) -> nn.Linear:
    """Strategy of ``nn.Linear`` layers with random in/out features, bias or not, seeded weights.

    >>> from hypothesis import find
    >>> layer = find(linear_layers(max_features=8), lambda m: m.bias is None)
    >>> layer.in_features <= 8, layer.bias is None
    (True, True)
    """
    sizes = st.integers(min_features, max_features)
    in_features, out_features = draw(sizes), draw(sizes)
    has_bias = draw(st.booleans()) if bias is None else bias
    layer = nn.Linear(in_features, out_features, bias=has_bias)
    return init_layer(layer, draw(st.integers(0, 2**32 - 1)))


@st.composite
def conv2d_layers(
    draw: st.DrawFn, max_channels: int = 16, max_kernel: int = 3, groups: bool = True,
    bias: bool | None = None,
) -> nn.Conv2d:  # fmt: skip
    """Strategy of ``nn.Conv2d`` layers: random channels, kernel, stride, padding, dilation, groups, bias.

    Pair a layer with an input of at least ``dilation·(kernel-1)+1`` pixels per side.

    >>> from hypothesis import find
    >>> conv = find(conv2d_layers(), lambda c: c.groups > 1 and c.stride == (2, 2))
    >>> conv.in_channels % conv.groups, conv.out_channels % conv.groups
    (0, 0)
    """
    group_count = draw(st.sampled_from([1, 2, 4])) if groups else 1
    in_channels = group_count * draw(st.integers(1, max(1, max_channels // group_count)))
    out_channels = group_count * draw(st.integers(1, max(1, max_channels // group_count)))
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=draw(st.sampled_from([1, 2])),
        padding=draw(st.integers(0, 2)),
        dilation=draw(st.sampled_from([1, 2])),
        groups=group_count,
        bias=draw(st.booleans()) if bias is None else bias,
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])),
    )
    if conv.padding_mode != "zeros" and max(conv.padding) == 0:
        conv.padding_mode = "zeros"
    return init_layer(conv, draw(st.integers(0, 2**32 - 1)))
