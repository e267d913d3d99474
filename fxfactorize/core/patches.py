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


def _pair(value: Any) -> tuple[int, int]:
    first, second = _ntuple(value, 2)
    return (first, second)


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"expected {n} values for a {n}-d convolution; got {value!r}")
    return values


def _padding_3d(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last dim first) of a 3-d conv's padding; ``"same"`` puts the odd
    element after, as torch does."""
    if padding == "valid":
        return [0] * 6
    if padding == "same":
        amounts: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts
    return [p for p in reversed(_ntuple(padding, 3)) for _ in range(2)]


def _patch_rows_3d(
    x: torch.Tensor,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    padding_mode: str,
    max_rows: int,
) -> Iterator[torch.Tensor]:
    kernel, step, dil = _ntuple(kernel_size, 3), _ntuple(stride, 3), _ntuple(dilation, 3)
    pad = _padding_3d(padding, kernel, dil)
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dil, strict=True)]
    padded = [x.shape[2 + a] + pad[4 - 2 * a] + pad[5 - 2 * a] for a in range(3)]
    outputs = [(n - span) // s + 1 for n, span, s in zip(padded, spans, step, strict=True)]
    images = max(1, max_rows // max(math.prod(outputs), 1))
    for start in range(0, x.shape[0], images):
        chunk = x[start : start + images]
        if any(pad):
            chunk = F.pad(chunk, pad, mode=_PAD_MODES[padding_mode])
        for axis in range(3):  # windows of each spatial dim, appended as trailing dims
            chunk = chunk.unfold(2 + axis, spans[axis], step[axis])
        chunk = chunk[..., :: dil[0], :: dil[1], :: dil[2]]  # [n, C, oD, oH, oW, kd, kh, kw]
        yield chunk.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, x.shape[1] * math.prod(kernel))


def conv_padding(
    padding: Any, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a conv, as ``torch.nn.functional.pad`` takes it.

    ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` (torch puts the odd pixel on the
    right/bottom).

    >>> conv_padding("same", (4, 3), (1, 2))
    (2, 2, 1, 2)
    >>> conv_padding(1, (3, 3), (1, 1))
    (1, 1, 1, 1)
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        sizes = []
        for k, d in ((kernel_size[1], dilation[1]), (kernel_size[0], dilation[0])):
            total = d * (k - 1)
            sizes += [total // 2, total - total // 2]
        return tuple(sizes)  # type: ignore[return-value]
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


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
    geometry = {"padding_mode": padding_mode, "max_rows": max_rows}
    if x.dim() == 3:  # a 1-d conv is a 2-d conv over images of height 1
        yield from conv_patch_rows(
            x.unsqueeze(2),
            (1, *_ntuple(kernel_size, 1)),
            stride=(1, *_ntuple(stride, 1)),
            padding=padding if isinstance(padding, str) else (0, *_ntuple(padding, 1)),
            dilation=(1, *_ntuple(dilation, 1)),
            **geometry,
        )
        return
    if x.dim() == 5:
        yield from _patch_rows_3d(x, kernel_size, stride, padding, dilation, **geometry)
        return
    kernel, dil, step = _pair(kernel_size), _pair(dilation), _pair(stride)
    pad = conv_padding(padding, kernel, dil)
    out_h = (x.shape[2] + pad[2] + pad[3] - dil[0] * (kernel[0] - 1) - 1) // step[0] + 1
    out_w = (x.shape[3] + pad[0] + pad[1] - dil[1] * (kernel[1] - 1) - 1) // step[1] + 1
    per_image = max(out_h * out_w, 1)
    images = max(1, max_rows // per_image)
    for start in range(0, x.shape[0], images):
        chunk = x[start : start + images]
        if any(pad):
            chunk = F.pad(chunk, pad, mode=_PAD_MODES[padding_mode])
        cols = F.unfold(chunk, kernel, dilation=dil, stride=step)  # [n, C·kh·kw, L]
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1])
