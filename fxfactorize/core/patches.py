"""Convolution inputs as patch rows: the matrix view ``y = W · patch + b`` of a 2-d convolution.

A convolution with weight ``[out, in/g, kh, kw]`` is, at each output position, a matrix product of
the flattened weight with the ``in·kh·kw`` input values under the kernel (a *patch*). The rows
produced here follow ``torch.nn.functional.unfold``'s order (channel-major, then kernel row, then
kernel column), which is the order of ``weight.reshape(out, -1)``; channels of group ``g`` are
contiguous, so the columns of one group are one contiguous block.
"""

from __future__ import annotations

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
    if isinstance(value, int):
        return (value, value)
    first, second = tuple(value)
    return (int(first), int(second))


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
    """Yield the patch rows ``[n, in·kh·kw]`` of ``x`` (``[N, in, H, W]``), a few images at a time.

    Every output position of the convolution gives one row; the images are unfolded in chunks of
    at most ``max_rows`` rows (at least one image), so the unfold of the whole batch is never held
    in memory at once. Any stride, dilation, padding (int, pair, ``"same"``, ``"valid"``) and
    padding mode (``zeros``, ``reflect``, ``replicate``, ``circular``) is supported.

    >>> x = torch.randn(2, 3, 5, 5)
    >>> rows = torch.cat(list(conv_patch_rows(x, 3, padding=1, stride=2)))
    >>> w = torch.randn(4, 3, 3, 3)
    >>> y = torch.nn.functional.conv2d(x, w, padding=1, stride=2)  # [2, 4, 3, 3]
    >>> bool(torch.allclose(rows @ w.reshape(4, -1).T, y.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5))
    True
    """
    if x.dim() != 4:
        raise ValueError(f"conv input must be 4-d [N, C, H, W]; got shape {tuple(x.shape)}")
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}; got {padding_mode!r}")
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
