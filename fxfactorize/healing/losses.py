"""Distillation losses between a student's and a teacher's raw outputs.

Outputs may be tensors or any nesting of tuples, lists, namedtuples, dicts and dataclasses; the
built-in losses match their floating-point tensor leaves by position in that structure and sum a
per-leaf loss over them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "kl_loss", "mse_loss", "normalized_mse", "output_leaves", "resolve_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


def output_leaves(output: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every floating-point tensor leaf of ``output``, in structure order.

    Tuples, lists and namedtuples are walked by index, mappings by key, dataclasses by field;
    integer/bool tensors and other values are skipped.

    >>> out = {"logits": torch.ones(2, 3), "ids": torch.ones(2, dtype=torch.long), "aux": (torch.zeros(1),)}
    >>> [path for path, _ in output_leaves(out)]
    ["output['logits']", "output['aux'][0]"]
    """
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield path, output
    elif isinstance(output, Mapping):
        for key, value in output.items():
            yield from output_leaves(value, f"{path}[{key!r}]")
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for field in dataclasses.fields(output):
            yield from output_leaves(getattr(output, field.name), f"{path}.{field.name}")
    elif isinstance(output, (tuple, list)):
        for index, value in enumerate(output):
            yield from output_leaves(value, f"{path}[{index}]")


def _matched_leaves(student: Any, teacher: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    ours, theirs = dict(output_leaves(student)), dict(output_leaves(teacher))
    if ours.keys() != theirs.keys():
        raise ValueError(
            "the student's and the teacher's outputs have different floating-point leaves: "
            f"student {sorted(ours)}, teacher {sorted(theirs)}"
        )
    if not ours:
        raise ValueError("the model output has no floating-point tensor to compare")
    matched = []
    for path, value in ours.items():
        target = theirs[path]
        if value.shape != target.shape:
            raise ValueError(
                f"{path}: the student gives shape {tuple(value.shape)}, the teacher "
                f"{tuple(target.shape)}"
            )
        matched.append((path, value, target))
    return matched


def normalized_mse(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the (unbiased) variance of all elements of ``target``: 0 is
    exact, 1 no better than predicting the target's mean. Where the target does not vary, the
    plain mean squared error. Computed in at least float32.

    >>> target = torch.tensor([0.0, 2.0])
    >>> float(normalized_mse(torch.ones(2), target))  # variance 2, mse 1
    0.5
    """
    value, target = _upcast(value), _upcast(target)
    mse = (value - target).pow(2).mean()
    if target.numel() < 2:
        return mse
    variance = target.var()
    return mse / variance if float(variance) > 0 else mse


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mse_loss(student: Any, teacher: Any) -> torch.Tensor:
    """:func:`normalized_mse` of each floating-point leaf of ``student`` against the matching leaf
    of ``teacher``, summed over leaves.

    >>> t = (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]))
    >>> float(mse_loss((torch.ones(2), torch.tensor([1.0, 3.0])), t))
    0.5
    """
    return sum(normalized_mse(s, t) for _, s, t in _matched_leaves(student, teacher))


def kl_loss(student: Any, teacher: Any) -> torch.Tensor:
    """``KL(softmax(teacher) ‖ softmax(student))`` over the last dim of each floating-point leaf,
    averaged over the other dims and summed over leaves (leaves are logits).

    Leaves whose last dim has one element (or that are scalars) carry no distribution and are
    skipped; an output with no other leaf is a ``ValueError`` (use ``loss="mse"``).

    >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(kl_loss(logits, logits))
    0.0
    >>> round(float(kl_loss(torch.zeros(1, 2), torch.tensor([[0.0, 1e9]]))), 4)  # log 2
    0.6931
    """
    total = None
    for _, s, t in _matched_leaves(student, teacher):
        if s.dim() == 0 or s.shape[-1] < 2:
            continue
        s, t = _upcast(s).reshape(-1, s.shape[-1]), _upcast(t).reshape(-1, t.shape[-1])
        log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / s.shape[0]
        total = kl if total is None else total + kl
    if total is None:
        raise ValueError(
            "loss='kl' needs an output leaf whose last dim has at least 2 elements (logits); "
            "use loss='mse' for this model"
        )
    return total


#: The losses :func:`resolve_loss` knows by name.
LOSSES: dict[str, LossFn] = {"kl": kl_loss, "mse": mse_loss}


def resolve_loss(loss: str | LossFn) -> tuple[LossFn, str]:
    """``(function, name)`` for ``loss``: ``"kl"``, ``"mse"`` or a callable
    ``loss(student_output, teacher_output) -> scalar tensor``.

    >>> resolve_loss("mse")[1]
    'mse'
    >>> resolve_loss("l1")
    Traceback (most recent call last):
    ...
    ValueError: loss must be 'kl', 'mse' or a callable loss(student_output, teacher_output); got 'l1'
    """
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss], loss
    if callable(loss) and not isinstance(loss, str):
        return loss, getattr(loss, "__name__", type(loss).__name__)
    raise ValueError(
        f"loss must be 'kl', 'mse' or a callable loss(student_output, teacher_output); got {loss!r}"
    )
