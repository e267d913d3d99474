"""Convolution inputs as patch rows: the matrix view ``y = W · patch + b`` of a convolution.

A convolution with weight ``[out, in/g, *kernel]`` is, at each output position, a matrix product
of the flattened weight with the ``in·prod(kernel)`` input values under the kernel (a *patch*).
The rows produced here are channel-major, then kernel position in row-major order (as
``torch.nn.functional.unfold`` orders them), which is the order of ``weight.reshape(out, -1)``;
channels of group ``g`` are contiguous, so the columns of one group are one contiguous block.
1-d, 2-d and 3-d convolutions are supported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["conv_padding", "conv_patch_rows"]

_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"expected {n} values for a {n}-d convolution; got {value!r}")
    return values


def conv_padding(
    padding: Any, kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """A conv's padding as ``torch.nn.functional.pad`` takes it: ``(before, after)`` per spatial
    dim, last dim first (``(left, right, top, bottom)`` for a 2-d conv).

    ``padding`` is an int, a tuple, ``"valid"`` or ``"same"`` (torch puts the odd element after).

    >>> conv_padding("same", (4, 3), (1, 2))
    (2, 2, 1, 2)
    >>> conv_padding(1, (3, 3), (1, 1))
    (1, 1, 1, 1)
    """
    if padding == "valid":
        return (0,) * (2 * len(kernel_size))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        return tuple(amount for t in reversed(totals) for amount in (t // 2, t - t // 2))
    return tuple(p for p in reversed(_ntuple(padding, len(kernel_size))) for _ in range(2))


def conv_patch_rows(
    x: torch.Tensor,
    kernel_size: Any,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    padding_mode: str = "zeros",
    max_rows: int = 16384,
) -> Iterator[torch.Tensor]:
    """Yield the patch rows ``[n, in·prod(kernel)]`` of ``x`` (``[N, in, *spatial]``, 1 to 3
    spatial dims), a few images at a time.

    Every output position of the convolution gives one row; the images are unfolded in chunks of
    at most ``max_rows`` rows (at least one image), so the unfold of the whole batch is never held
    in memory at once. Any stride, dilation, padding (int, tuple, ``"same"``, ``"valid"``) and
    padding mode (``zeros``, ``reflect``, ``replicate``, ``circular``) is supported.

    >>> x = torch.randn(2, 3, 5, 5)
    >>> rows = torch.cat(list(conv_patch_rows(x, 3, padding=1, stride=2)))
    >>> w = torch.randn(4, 3, 3, 3)
    >>> y = torch.nn.functional.conv2d(x, w, padding=1, stride=2)  # [2, 4, 3, 3]
    >>> bool(torch.allclose(rows @ w.reshape(4, -1).T, y.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5))
    True
    """
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            f"conv input must be [N, C, *spatial] with 1 to 3 spatial dims; got shape {tuple(x.shape)}"
        )
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}; got {padding_mode!r}")
    dims = x.dim() - 2
    kernel, step, dil = _ntuple(kernel_size, dims), _ntuple(stride, dims), _ntuple(dilation, dims)
    pad = conv_padding(padding, kernel, dil)
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dil, strict=True)]
    padded = [
        x.shape[2 + a] + pad[2 * (dims - 1 - a)] + pad[2 * (dims - 1 - a) + 1] for a in range(dims)
    ]
    outputs = [(n - span) // s + 1 for n, span, s in zip(padded, spans, step, strict=True)]
    images = max(1, max_rows // max(math.prod(outputs), 1))
    # [n, C, *outputs, *kernel] -> rows [n·prod(outputs), C·prod(kernel)]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    for start in range(0, x.shape[0], images):
        chunk = x[start : start + images]
        if any(pad):
            chunk = F.pad(chunk, pad, mode=_PAD_MODES[padding_mode])
        for axis in range(dims):  # the windows of each spatial dim, appended as trailing dims
            chunk = chunk.unfold(2 + axis, spans[axis], step[axis])
        chunk = chunk[(..., *(slice(None, None, d) for d in dil))]
        yield chunk.permute(order).reshape(-1, x.shape[1] * math.prod(kernel))
