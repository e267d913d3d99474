"""Speed of transformed models against the originals and against the MAC limit (issue 5).

For each model and batch size, in one process: ``transform`` (timed), then original and
transformed forward passes interleaved, median over repeats, eager and (``--compile``) under
``torch.compile``. "MAC limit" is MACs before ÷ after over the Linear/Conv layers: the speedup
if time were proportional to MACs. "realized ÷ limit" is the measured speedup divided by it.
"predicted ratio" is the report's whole-model latency prediction (``report.latency.ratio``: the
original timed once inside ``transform``, each planned layer at the cost model's ratio);
"measured ratio" the interleaved medians' transformed ÷ original; "|pred−meas|/meas" the
prediction's relative error (issue 17 target: ≤ 15 %). The prediction is of eager time: compiled
rows compare it with a different execution. "regenerated ÷ original" (eager rows) times the graph
``transform`` returns with nothing factorized (``linears=False, convs=False``) in the same
interleaved loop: the regenerated code's own cost, which no plan can remove.

    uv run python benchmarks/speed.py --quick            # wide MLP + resnet50 at batch 1, eager
    uv run python benchmarks/speed.py --device cuda --compile
    uv run python benchmarks/speed.py --models resnet18 resnet50 wide_mlp --batch-sizes 1 8 \
        --mlp-batch 0 --threads 1 2 --budget 0.538     # issue 17's predicted-vs-measured table
    uv run --group bench python benchmarks/speed.py --models minilm --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxfactorize as ff


def wide_mlp() -> nn.Module:
    """Two blocks 2048→8192→2048 (the issue's wide MLP)."""
    blocks = []
    for _ in range(2):
        blocks += [nn.Linear(2048, 8192), nn.GELU(), nn.Linear(8192, 2048)]
    return nn.Sequential(*blocks)


def minilm() -> nn.Module:
    """MiniLM-L6's encoder with mean pooling (needs the ``bench`` uv group)."""
    from real_models import MeanPooledEncoder, load_minilm

    return MeanPooledEncoder(load_minilm()[0].auto_model)


def minilm_inputs(batch: int) -> dict[str, torch.Tensor]:
    """``batch`` × 64 random tokens (the issue's 32 × 64)."""
    shape = (batch, 64)
    return {
        "input_ids": torch.randint(1000, 30000, shape),
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "token_type_ids": torch.zeros(shape, dtype=torch.long),
    }


def image(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224)


MODELS = {
    "wide_mlp": (wide_mlp, lambda batch: torch.randn(batch, 2048)),
    "resnet18": (torchvision.models.resnet18, image),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, image),
    "minilm": (minilm, minilm_inputs),
    "vit_b_16": (torchvision.models.vit_b_16, lambda batch: torch.randn(batch, 3, 224, 224)),
    "resnet50": (torchvision.models.resnet50, lambda batch: torch.randn(batch, 3, 224, 224)),
    "convnext_tiny": (
        torchvision.models.convnext_tiny,
        lambda batch: torch.randn(batch, 3, 224, 224),
    ),
}


def call(fn, x):
    return fn(**x) if isinstance(x, dict) else fn(x)


def interleaved_medians(models, x, repeats: int, sync) -> list[float]:
    """Median seconds of each of ``models`` on ``x``, calling them in turn so load hits all."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for fn in models:  # warm-up (and compilation)
            call(fn, x)
            call(fn, x)
        for _ in range(repeats):
            for fn, samples in zip(models, times, strict=True):
                sync()
                start = time.perf_counter()
                call(fn, x)
                sync()
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def run(args: argparse.Namespace, threads: int) -> list[list[object]]:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    for name in args.models:
        build, make_input = MODELS[name]
        for batch in args.batch_sizes:
            fixed = {"wide_mlp": args.mlp_batch, "minilm": 32}.get(name)
            if fixed and batch != args.batch_sizes[0]:
                continue
            batch = fixed or batch
            torch.manual_seed(0)
            model = build().eval().to(args.device)
            x = make_input(batch)
            x = {k: v.to(args.device) for k, v in x.items()} if isinstance(x, dict) else x
            x = x if isinstance(x, dict) else x.to(args.device)
            options = {"progress": False, "cost_model": args.cost_model, "predict_latency": True}
            if args.budget is not None:
                options["budget"] = args.budget
            if args.rank_multiple > 1:
                options["rank_multiple"] = args.rank_multiple
            if args.min_channels is not None:
                options["min_channels"] = args.min_channels
            if args.channels_last:  # the planner times the model in the format it will run in
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            start = time.perf_counter()
            gm = ff.transform(model, x, **options)
            seconds = time.perf_counter() - start
            report = gm.meta["fxfactorize"]
            totals = report.totals()
            predicted = report.latency.ratio
            limit = totals["macs_before"] / totals["macs_after"]
            # the graph the pass returns with nothing factorized: its own cost, apart from the plan's
            regenerated = ff.transform(
                model, x, linears=False, convs=False, progress=False, predict_latency=False
            )
            modes = [("eager", [model, gm, regenerated])]
            if args.compile:
                modes.append(("compile", [torch.compile(model), torch.compile(gm)]))
            for mode, models in modes:
                before, after, *graph = interleaved_medians(models, x, args.repeats, sync)
                speedup = before / after
                measured = after / before
                rows.append(
                    [
                        name,
                        batch,
                        threads,
                        mode,
                        f"{before * 1e3:.1f}",
                        f"{after * 1e3:.1f}",
                        f"{predicted:.3f}",
                        f"{measured:.3f}",
                        f"{abs(predicted - measured) / measured:.0%}",
                        f"{report.latency.layers_ratio:.3f}",
                        f"{1 / limit:.3f}",
                        f"{limit:.2f}",
                        f"{speedup / limit:.2f}",
                        f"{graph[0] / before:.3f}" if graph else "-",
                        f"{len(gm.meta['fxfactorize'].factorized)}",
                        f"{seconds:.1f}",
                    ]
                )
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    return rows


HEADERS = [
    "model",
    "batch",
    "threads",
    "mode",
    "original ms",
    "transformed ms",
    "predicted ratio",
    "measured ratio",
    "|pred−meas|/meas",
    "layers' predicted ratio",
    "MAC ratio",
    "MAC limit ×",
    "realized ÷ limit",
    "regenerated ÷ original",
    "layers factorized",
    "transform s",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--mlp-batch", type=int, default=64, help="0: the --batch-sizes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    parser.add_argument("--cost-model", default="latency")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--rank-multiple", type=int, default=1)
    parser.add_argument("--min-channels", type=int, default=None, help="default: transform's")
    parser.add_argument(
        "--channels-last", action="store_true", help="images and convs in channels_last"
    )
    parser.add_argument(
        "--threads", nargs="+", type=int, default=[1], help="CPU thread counts (0: torch's default)"
    )
    parser.add_argument("--quick", action="store_true", help="wide MLP and resnet50, batch 1")
    parser.add_argument("--out", default=None, help="write the table as Markdown here")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_sizes, args.repeats = ["wide_mlp", "resnet50"], [1], 5
    default_threads = torch.get_num_threads()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        rows += run(args, torch.get_num_threads())
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    table = tabulate(rows, HEADERS, tablefmt="github")
    text = (
        f"{machine}; torch {torch.__version__}; cost_model={args.cost_model}, "
        f"budget={args.budget}, rank_multiple={args.rank_multiple}, "
        f"min_channels={args.min_channels or 'default'}, "
        f"{'channels_last' if args.channels_last else 'contiguous'}; medians of {args.repeats} "
        f"interleaved repeats\n\n{table}\n"
    )
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
