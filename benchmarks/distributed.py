"""Distributed benchmark: calibration + solve wall time on 1, 2, 3 gloo processes, same data.

An MLP of ``--layers`` Linear layers of width ``--width`` is factorized at rank width/4 on
``--batches`` calibration batches of ``--rows`` rows, shared among the processes (contiguous
shares, as the CLI gives them). Each process uses one thread, so P processes use P cores. The
time is ``ff.transform`` from a barrier to a barrier, the slowest rank's. Bytes are what the
collectives carry per layer, measured: the statistics' all-reduce buffer (logged by
:func:`fxfactorize.passes.distributed.reduce_folds`) and the solved pair's parameters sent by its
owner. Run: ``uv run python benchmarks/distributed.py`` (``--quick``: small sizes, seconds).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxfactorize as ff


def model(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    parts: list[nn.Module] = []
    for _ in range(layers):
        parts += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*parts)


def batches(width: int, count: int, rows: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    return [torch.randn(rows, width, generator=generator) @ mixing for _ in range(count)]


def share(items: list, rank: int, size: int) -> list:
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


class _Bytes(logging.Handler):
    """Collects the statistics bytes that reduce_folds logs per layer."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.per_layer: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"all-reduced the statistics of (\S+): (\d+) bytes", record.getMessage())
        if found:
            self.per_layer[found[1]] = int(found[2])


def _job(rank: int, size: int, port: int, options: dict, out: str) -> None:
    torch.set_num_threads(1)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        timeout = datetime.timedelta(seconds=600)
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timeout)
    logger = logging.getLogger("fxfactorize")
    logger.setLevel(logging.DEBUG)
    counter = _Bytes()
    logger.addHandler(counter)
    net = model(options["width"], options["layers"])
    data = batches(options["width"], options["batches"], options["rows"])
    config = {
        "cost_model": "macs",
        "min_features": 64,
        "latent_features": options["width"] // 4,
        "progress": False,
    }
    warm = ff.transform(model(64, 1), torch.randn(4, 64), distributed=False, **config)  # imports
    del warm
    if size > 1:
        dist.barrier()
    started = time.perf_counter()
    gm = ff.transform(net, data[0], calibration=share(data, rank, size), **config)
    if size > 1:
        dist.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        solution = {
            record.target: sum(
                p.numel() * p.element_size() for p in gm.get_submodule(record.target).parameters()
            )
            for record in ff.report_of(gm).factorized
        }
        torch.save({"seconds": seconds, "statistics": counter.per_layer, "solution": solution}, out)
    if size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(size: int, options: dict) -> dict:
    out = os.path.join(tempfile.mkdtemp(), "result.pt")
    mp.start_processes(
        _job, args=(size, _free_port(), options, out), nprocs=size, start_method="spawn"
    )
    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--quick", action="store_true", help="width 256, 3 layers, 6 batches")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.batches, args.rows, args.repeats = 256, 3, 6, 256, 1
    options = {k: getattr(args, k) for k in ("width", "layers", "batches", "rows")}
    print(
        f"MLP {args.layers} x Linear({args.width}, {args.width}) at rank {args.width // 4}; "
        f"{args.batches} batches x {args.rows} rows; {os.cpu_count()} CPUs; gloo; 1 thread each"
    )
    times, found = {}, {}
    for size in args.processes:
        runs = [measure(size, options) for _ in range(args.repeats)]
        times[size] = min(run["seconds"] for run in runs)
        found[size] = runs[0]
        print(
            f"{size} process(es): {times[size]:.2f} s (calibration + solve, best of {args.repeats})"
        )
    base = times[args.processes[0]]
    for size in args.processes[1:]:
        print(f"speed-up {args.processes[0]} -> {size} processes: {base / times[size]:.2f}x")
    several = [size for size in args.processes if size > 1]
    if several:
        result = found[several[0]]
        layer = next(iter(result["solution"]))
        print(
            f"bytes per layer ({several[0]} processes): statistics all-reduce "
            f"{result['statistics'][layer]:,} B (sums only: shrinkage is fixed), "
            f"solution sent by its owner {result['solution'][layer]:,} B"
        )


if __name__ == "__main__":
    main()
