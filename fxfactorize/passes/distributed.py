"""The pipeline across the ranks of a ``torch.distributed`` process group.

Every rank calibrates on its own batches; the statistics (sums) are all-reduced, so each rank
holds those of the union of all ranks' batches, taken in rank order (rank 0's batches first).
Each planned layer gets an owner rank (:func:`assign_owners`, balanced by solve cost); the owner
solves it and every rank receives the owner's solution (:func:`solve_owned`), so the weights are
bitwise identical on all ranks. Rank 0's plan is authoritative (:func:`agree`): a cost model that
measures the machine (``"latency"``) may decide differently on another rank's machine.

Each local step runs inside :func:`step`: once it ends, the ranks exchange whether it failed, so a
rank that fails (a bad batch, NaN, an exception) makes every rank raise a
:class:`~fxfactorize.errors.DistributedError` naming it, at the next step boundary. A rank that
dies or hangs is caught by the process group's own timeout (``init_process_group(timeout=...)``).

With the ``nccl`` backend, tensors are moved to this rank's CUDA device
(``torch.cuda.current_device()``, which the caller sets) for each collective and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fxfactorize.core.moments import InputMoments, PairedMoments, Statistics
from fxfactorize.core.shrinkage import sum_statistics
from fxfactorize.errors import DistributedError
from fxfactorize.layers import LayerShape

__all__ = [
    "Group",
    "agree",
    "assign_owners",
    "average_gradients",
    "broadcast_parameters",
    "first_index",
    "process_group",
    "reduce_folds",
    "reduce_sums",
    "solve_cost",
    "solve_owned",
    "step",
]

log = logging.getLogger("fxfactorize")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Group:
    """The process group the pipeline runs in: ``handle`` (``None``: the default group), this
    process's ``rank`` in it and its ``size``."""

    handle: Any
    rank: int
    size: int

    @property
    def root(self) -> int:
        """The global rank of the group's rank 0 (collectives name sources by global rank)."""
        return 0 if self.handle is None else dist.get_global_rank(self.handle, 0)

    @property
    def device(self) -> torch.device:
        """Where tensors must be for a collective: this rank's CUDA device under nccl."""
        if dist.get_backend(self.handle) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def process_group(distributed: bool = True, group: Any = None) -> Group | None:
    """The group to run in, or ``None`` (one process): ``distributed=False``, ``torch.distributed``
    not initialised, or a group of one rank. ``group`` is a process group (default: the world).

    >>> process_group() is None  # no process group initialised here
    True
    """
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be a bool; got {distributed!r}")
    if not distributed:
        return None
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if group is not None:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised "
                "(call torch.distributed.init_process_group first)"
            )
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return Group(group, dist.get_rank(group), size)


@contextlib.contextmanager
def step(group: Group | None, name: str) -> Iterator[None]:
    """Run one local step (no collective inside); then every rank learns whether any failed, and
    all raise a :class:`~fxfactorize.errors.DistributedError` naming the failed rank(s) if so.
    With ``group=None`` the step just runs.

    >>> with step(None, "calibration"):
    ...     pass
    """
    if group is None:
        yield
        return
    try:
        yield
    except Exception as error:
        failures = _failures(group, f"{type(error).__name__}: {error}")
        raise DistributedError(name, failures) from error
    failures = _failures(group, None)
    if failures:
        raise DistributedError(name, failures)


def _failures(group: Group, message: str | None) -> dict[int, str]:
    everyone: list[Any] = [None] * group.size
    dist.all_gather_object(everyone, message, group=group.handle)
    return {rank: text for rank, text in enumerate(everyone) if text is not None}


def _gather(group: Group, value: Any) -> list[Any]:
    everyone: list[Any] = [None] * group.size
    dist.all_gather_object(everyone, value, group=group.handle)
    return everyone


def agree(group: Group | None, value: T) -> T:
    """Rank 0's ``value``, on every rank (pickled; identity without a group).

    >>> agree(None, [1, 2])
    [1, 2]
    """
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=group.root, group=group.handle)
    return box[0]


def first_index(group: Group | None, count: int) -> int:
    """How many items the ranks before this one hold (``count`` each): this rank's first index
    in the union taken in rank order.

    >>> first_index(None, 5)
    0
    """
    if group is None:
        return 0
    return sum(_gather(group, int(count))[: group.rank])


def solve_cost(layer: LayerShape) -> float:
    """What solving a layer costs, up to a constant: its decompositions are cubic in the width.

    >>> solve_cost(LayerShape("linear", 512, 256, (), 1, positions=1, bias=True))
    134217728.0
    """
    width = max(layer.fan_in, layer.out_per_group)
    return float(layer.groups * width**3)


def assign_owners(costs: Mapping[str, float], ranks: int) -> dict[str, int]:
    """An owner rank per target: greedily, the costliest first, each to the least loaded rank
    (ties: the lower rank; equal costs in name order), so every rank computes the same answer.

    >>> assign_owners({"a": 8.0, "b": 1.0, "c": 1.0, "d": 6.0}, 2)
    {'a': 0, 'd': 1, 'b': 1, 'c': 1}
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1; got {ranks}")
    load = [0.0] * ranks
    owners = {}
    for target in sorted(costs, key=lambda name: (-costs[name], name)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[target] = rank
        load[rank] += costs[target]
    return owners


# --- statistics ----------------------------------------------------------------------------------


def _leaves(stats: Statistics) -> list[torch.Tensor]:
    if isinstance(stats, PairedMoments):
        return [*_leaves(stats.inputs), *_leaves(stats.original), stats.cross]
    count = torch.tensor([float(stats.count)], dtype=torch.float64, device=stats.xtx.device)
    return [stats.xtx, stats.xsum, count]


def _rebuilt(like: Statistics, leaves: list[torch.Tensor]) -> Statistics:
    if isinstance(like, PairedMoments):
        inputs = _rebuilt(like.inputs, leaves[:3])
        original = _rebuilt(like.original, leaves[3:6])
        return PairedMoments(inputs, original, leaves[6])
    return InputMoments(leaves[0], leaves[1], round(float(leaves[2])))


def _all_reduce(group: Group, parts: list[Statistics]) -> list[Statistics]:
    """The sums over all ranks of ``parts``, in one collective."""
    leaves = [leaf for part in parts for leaf in _leaves(part)]
    home = leaves[0].device
    flat = torch.cat([leaf.reshape(-1).to(torch.float64) for leaf in leaves]).to(group.device)
    dist.all_reduce(flat, group=group.handle)
    flat = flat.to(home)
    out, start, per = [], 0, len(_leaves(parts[0]))
    pieces = []
    for leaf in leaves:
        pieces.append(flat[start : start + leaf.numel()].reshape(leaf.shape))
        start += leaf.numel()
    for index, part in enumerate(parts):
        out.append(_rebuilt(part, pieces[index * per : (index + 1) * per]))
    return out


def reduce_folds(
    group: Group | None,
    folds: Mapping[str, list[Statistics]],
    calls: Mapping[str, int],
    empty: Callable[[str], list[Statistics]],
    keep_folds: bool,
) -> dict[str, list[Statistics]]:
    """Every layer's statistics summed over the ranks, ``{target: folds}`` on every rank.

    ``calls[target]`` is how many calls of the layer this rank collected: a call's fold depends
    on its index (see :func:`~fxfactorize.passes.calibrate.add_rows`), so this rank's folds are
    rotated by the calls of the ranks before it and match one process's folds on the union.
    ``empty(target)`` gives zero statistics for a layer this rank never reached. Without
    ``keep_folds`` (no shrinkage cross-validation) only the sums travel: ``[sum]`` per layer.

    >>> m = InputMoments.zeros(2); m.update(torch.ones(3, 2))
    >>> reduce_folds(None, {"fc": [m]}, {"fc": 1}, None, keep_folds=True)["fc"][0].count
    3
    """
    if group is None:
        return dict(folds)
    everyone = _gather(group, {target: int(calls.get(target, 0)) for target in folds})
    targets = sorted(set().union(*everyone))
    reduced = {}
    for target in targets:
        local = list(folds.get(target) or empty(target))
        if keep_folds:
            shift = sum(counts.get(target, 0) for counts in everyone[: group.rank]) % len(local)
            local = [local[(index - shift) % len(local)] for index in range(len(local))]
        else:
            local = [sum_statistics(local)]
        reduced[target] = _all_reduce(group, local)
        size = sum(leaf.numel() for part in local for leaf in _leaves(part)) * 8
        log.debug("all-reduced the statistics of %s: %d bytes", target, size)
    return reduced


def reduce_sums(group: Group | None, values: Mapping[str, tuple[float, ...]]) -> dict[str, tuple]:
    """``values`` (the same keys and lengths on every rank) summed over the ranks, in float64.

    >>> reduce_sums(None, {"fc": (1.0, 4.0)})
    {'fc': (1.0, 4.0)}
    """
    if group is None or not values:
        return dict(values)
    keys = sorted(values)
    flat = torch.tensor([v for key in keys for v in values[key]], dtype=torch.float64)
    flat = flat.to(group.device)
    dist.all_reduce(flat, group=group.handle)
    numbers = flat.cpu().tolist()
    out, start = {}, 0
    for key in keys:
        out[key] = tuple(numbers[start : start + len(values[key])])
        start += len(values[key])
    return out


# --- solutions -----------------------------------------------------------------------------------


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def solve_owned(
    group: Group | None,
    jobs: Mapping[str, Callable[[], Any]],
    layers: Mapping[str, tuple[nn.Module, LayerShape]],
    progress: bool = True,
    desc: str = "solve",
) -> dict[str, Any]:
    """Run each of ``jobs`` (``{target: solve}``, each returning a
    :class:`~fxfactorize.methods.Solved`) on its owner rank (see :func:`assign_owners`, costs from
    ``layers[target]``'s geometry) and give every rank every result, its module on the device of
    the rank's own layer. Without a group, all run here.

    >>> solve_owned(None, {"fc": lambda: "solved"}, {}, progress=False)
    {'fc': 'solved'}
    """
    rank = 0 if group is None else group.rank
    if group is None:
        owners = dict.fromkeys(jobs, 0)
    else:
        owners = assign_owners({t: solve_cost(layers[t][1]) for t in jobs}, group.size)
    mine = [target for target in jobs if owners[target] == rank]
    local = {}
    with step(group, "solve"):
        for target in tqdm(mine, desc=desc, unit="layer", disable=not progress or not mine):
            local[target] = jobs[target]()
    if group is None:
        return local
    for result in local.values():  # sent from the CPU: received on any rank's own device
        result.module.to("cpu")
    everyone = _gather(group, local)
    merged = {}
    for target in jobs:
        result = everyone[owners[target]][target]
        result.module.to(_device(layers[target][0]))
        merged[target] = result
    log.debug(
        "rank %d solved %d of %d layer(s); the others came from their owners",
        rank,
        len(mine),
        len(jobs),
    )
    return merged


# --- training ------------------------------------------------------------------------------------


def average_gradients(
    group: Group | None,
    params: list[nn.Parameter],
    value: float,
    error: BaseException | None = None,
    name: str = "a training step",
) -> float:
    """DDP's gradient averaging, in one collective: each parameter's ``.grad`` becomes its mean
    over the ranks (a rank without one counts zero), and the mean of ``value`` (a loss) is
    returned. A rank passes the ``error`` that stopped its step instead of gradients; then every
    rank raises a :class:`~fxfactorize.errors.DistributedError` naming it (the flags travel in
    the same collective).

    >>> p = nn.Parameter(torch.ones(2)); p.grad = torch.full((2,), 3.0)
    >>> average_gradients(None, [p], 0.5), p.grad.tolist()
    (0.5, [3.0, 3.0])
    """
    if group is None:
        if error is not None:
            raise error
        return value
    failed = error is not None
    grads = [torch.zeros_like(p) if failed or p.grad is None else p.grad.detach() for p in params]
    flags = torch.zeros(group.size, dtype=torch.float64)
    flags[group.rank] = float(failed)
    flat = torch.cat(
        [
            *(grad.reshape(-1).to(group.device, torch.float64) for grad in grads),
            torch.tensor([0.0 if failed else value], dtype=torch.float64, device=group.device),
            flags.to(group.device),
        ]
    )
    dist.all_reduce(flat, group=group.handle)
    flat = flat.cpu()
    ranks = [rank for rank in range(group.size) if flat[-group.size + rank] > 0]
    if ranks:
        message = "see the error on that rank" if not failed else f"{type(error).__name__}: {error}"
        failures = {rank: message for rank in ranks}
        if failed:
            failures[group.rank] = f"{type(error).__name__}: {error}"
        raise DistributedError(name, failures) from error
    start = 0
    for p, grad in zip(params, grads, strict=True):
        mean = flat[start : start + grad.numel()].reshape(grad.shape) / group.size
        p.grad = mean.to(p.device, p.dtype)
        start += grad.numel()
    return float(flat[start]) / group.size


def broadcast_parameters(group: Group | None, params: list[nn.Parameter]) -> None:
    """Rank 0's values of ``params`` on every rank (in place), as DDP does at construction.

    >>> broadcast_parameters(None, [nn.Parameter(torch.ones(1))])
    """
    if group is None:
        return
    with torch.no_grad():
        for p in params:
            buffer = p.detach().to(group.device).contiguous()
            dist.broadcast(buffer, src=group.root, group=group.handle)
            p.copy_(buffer.to(p.device))
