"""Eager CPU latency of a torchvision model before and after ``transform`` (what the CLI's main
job and ``fxfactorize bench`` print), measured side by side in one process.

Forward passes of the two models are interleaved (original, transformed, original, …) so machine
load hits both alike; the medians and their ratio are printed, with the MAC and parameter ratios
from the report. Run: ``uv run python benchmarks/eager_latency.py`` (resnet50, 1×3×224×224, one
thread) or ``--quick`` (resnet18, 1×3×64×64).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torchvision

import fxfactorize as ff
from fxfactorize.cli import measure_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64×64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, size = ("resnet18", 64) if args.quick else ("resnet50", 224)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    gm = ff.transform(model, x, progress=False)
    totals = gm.meta["fxfactorize"].totals()
    times = measure_latency({"original": model, "transformed": gm}, x, repeats=args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s)")  # fmt: skip
    print(f"model: {name} random init, input 1x3x{size}x{size}, {args.repeats} interleaved runs")
    print(f"MACs   {totals['macs_after'] / totals['macs_before']:.3f}x")
    print(f"params {totals['params_after'] / totals['params_before']:.3f}x")
    print(
        f"eager median: original {times['original'] * 1e3:.1f} ms, transformed "
        f"{times['transformed'] * 1e3:.1f} ms ({times['transformed'] / times['original']:.3f}x)"
    )


if __name__ == "__main__":
    main()
