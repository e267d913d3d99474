"""Per-step time of ``ff.heal`` with the frozen prefix computed once per batch vs the whole student
run at every step, on a small CNN whose factorized layers come last.

The CNN has a frozen trunk (four 3×3 conv/BN/ReLU blocks, 32/32/32/64 channels) and one factorized
3×3 conv (64→128, rank 16) before the head; ``transform`` factorizes only that conv. The same student is healed as a GraphModule (the
trunk runs once per batch, the teacher's outputs are kept) and hidden behind a plain wrapper
module (``heal`` then runs the whole student and, since it cannot see the graph, the trunk at
every step); a third run also streams the batches, so the teacher's outputs are recomputed at
every step too (nothing kept). Runs alternate so that machine load hits both alike; medians are printed, with the
end-to-end loss of both (they must agree).

    OMP_NUM_THREADS=1 uv run python benchmarks/heal_prefix.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fxfactorize as ff


class CNN(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 32, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:  # min(in, out) < 64: left alone by min_channels=64
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.last = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.last(self.trunk(x)))
        return self.head(x.mean((2, 3)))


class Stream:
    """A re-iterable that is not a list: ``heal`` streams it and keeps nothing per batch."""

    def __init__(self, items: list[torch.Tensor]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = CNN().eval()
    data = [torch.randn(16, 3, 32, 32) for _ in range(args.batches)]
    student = ff.transform(
        teacher, data[0], min_channels=64, latent_channels=16, cost_model="macs", progress=False
    )
    print(ff.report_of(student))
    modes = {
        "prefix and teacher kept": lambda s: (s, teacher, data),
        "teacher kept, whole student": lambda s: (Wrapper(s), Wrapper(teacher), data),
        "nothing kept": lambda s: (Wrapper(s), Wrapper(teacher), Stream(data)),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    losses: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, make in modes.items():
            s, t, batches = make(copy.deepcopy(student))
            started = time.perf_counter()
            report = ff.heal(
                s, t, batches, steps=args.steps, lr=1e-3, local_steps=0, progress=False
            )
            times[name].append((time.perf_counter() - started) / args.steps)
            losses[name] = report.history
    base = statistics.median(times["nothing kept"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:28s} {1e3 * median:7.1f} ms/step  {base / median:4.2f}x  (median of {len(values)})"
        )
    first = losses["prefix and teacher kept"]
    gap = max(abs(a - b) for other in losses.values() for a, b in zip(first, other, strict=True))
    print(f"loss trajectories agree to {gap:.2e} (max difference)")


if __name__ == "__main__":
    main()
