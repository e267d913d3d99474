"""Accuracy of budgeted factorization on scikit-learn's digits, data-free vs calibrated (issue 5).

A small MLP and a small CNN are trained in seconds on ``load_digits`` (1797 real 8×8 images
shipped with scikit-learn); each is transformed at MAC budgets 0.75 / 0.5 / 0.25, data-free and
calibrated on the training images, and scored on the held-out images. Writes a Markdown table and
a Pareto plot (accuracy vs MAC-limit speedup) into ``benchmarks/results/``.

    uv run python benchmarks/accuracy.py
    uv run python benchmarks/accuracy.py --structures   # pair / spatial / Tucker-2 / auto (issue 17)

``--structures`` factorizes the CNN's two dense 3×3 convs with each conv structure at the same
rank knob (``latent_channels``), data-free and calibrated, and writes error (output nmse of the
logits on the held-out images, and accuracy) against MACs: ``results/accuracy_structures.md`` and
``.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tabulate import tabulate
from torch import nn

import fxfactorize as ff

RESULTS = Path(__file__).parent / "results"


def data() -> tuple[torch.Tensor, ...]:
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, test_size=0.3, random_state=0, stratify=labels
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_x(x_test), as_y(y_train), as_y(y_test)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def logit_nmse(model: nn.Module, candidate: nn.Module, x: torch.Tensor) -> float:
    reference = model(x)
    return float((candidate(x) - reference).pow(2).mean() / reference.var())


def structures(args: argparse.Namespace) -> None:
    """Error vs MACs of pair / spatial / Tucker-2 / auto on the digits CNN's dense convs."""
    x_train, x_test, y_train, y_test = data()
    torch.manual_seed(0)
    model = train(SmallCNN(), x_train, y_train, args.epochs)
    base = accuracy(model, x_test, y_test)
    options = {"cost_model": "macs", "min_channels": 32, "linears": False, "progress": False}
    rows, points = [], []
    for method in ("lowrank", "spatial", "tucker2", "auto"):
        for mode in ("data-free", "calibrated"):
            calibration = list(x_train.split(256)) if mode == "calibrated" else None
            for latent in (0.5, 0.25, 0.125, 0.0625):
                gm = ff.transform(
                    model,
                    x_test[:8],
                    method=method,
                    latent_channels=latent,
                    calibration=calibration,
                    **options,
                )
                report = gm.meta["fxfactorize"]
                convs = [r for r in report.layers if r.op == "Conv2d" and r.rank]
                before = sum(r.macs_before for r in convs)
                after = sum(r.macs_after for r in convs)
                chosen = ", ".join(r.detail or f"pair r={r.rank}" for r in convs)
                nmse, score = logit_nmse(model, gm, x_test), accuracy(gm, x_test, y_test)
                rows.append(
                    [
                        method,
                        mode,
                        latent,
                        f"{after / before:.3f}",
                        f"{nmse:.4f}",
                        f"{score:.2f}",
                        chosen,
                    ]
                )
                points.append((method, mode, after / before, nmse))
    headers = [
        "method",
        "solve",
        "latent_channels",
        "conv MACs ×",
        "logit nmse",
        "test acc %",
        "structures",
    ]
    table = tabulate(rows, headers, tablefmt="github")
    text = (
        f"digits CNN (the two dense 3×3 convs 32→64, 64→64; {len(x_test)} held-out images, "
        f"original accuracy {base:.2f} %), {args.epochs} epochs, cost_model='macs'; 1 CPU thread "
        f"of a 2-core CPU VM\n\n{table}\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy_structures.md").write_text(text)
    if args.no_plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, mode in zip(axes, ("data-free", "calibrated"), strict=True):
        for method, marker in (("lowrank", "o"), ("spatial", "s"), ("tucker2", "^"), ("auto", "x")):
            chosen = sorted((p[2], p[3]) for p in points if p[0] == method and p[1] == mode)
            axis.plot([c[0] for c in chosen], [c[1] for c in chosen], marker=marker, label=method)
        axis.set_xlabel("conv MACs after ÷ before")
        axis.set_yscale("log")
        axis.set_title(f"digits CNN, {mode}")
        axis.legend()
    axes[0].set_ylabel("logit nmse on held-out images")
    figure.tight_layout()
    figure.savefig(RESULTS / "accuracy_structures.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--structures", action="store_true", help="pair/spatial/Tucker-2/auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.structures:
        structures(args)
        return
    x_train, x_test, y_train, y_test = data()
    rows, points = [], []
    options = {"cost_model": "macs", "min_features": 32, "min_channels": 32, "progress": False}
    for name, build in (("mlp", mlp), ("cnn", SmallCNN)):
        torch.manual_seed(0)
        model = train(build(), x_train, y_train, args.epochs)
        base = accuracy(model, x_test, y_test)
        rows.append([name, "original", "-", f"{base:.2f}", "1.00", "-"])
        for budget in (0.75, 0.5, 0.25):
            for mode in ("data-free", "calibrated"):
                calibration = list(x_train.split(256)) if mode == "calibrated" else None
                gm = ff.transform(
                    model, x_test[:8], budget=budget, calibration=calibration, **options
                )
                totals = gm.meta["fxfactorize"].totals()
                limit = totals["macs_before"] / totals["macs_after"]
                score = accuracy(gm, x_test, y_test)
                rows.append(
                    [name, mode, budget, f"{score:.2f}", f"{limit:.2f}", f"{score - base:+.2f}"]
                )
                points.append((name, mode, limit, score, base))
    headers = ["model", "solve", "budget", "test accuracy %", "MAC limit ×", "Δ vs original"]
    table = tabulate(rows, headers, tablefmt="github")
    text = (
        f"digits ({len(x_test)} test images), {args.epochs} epochs, cost_model='macs'; "
        f"1 CPU thread\n\n{table}\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.md").write_text(text)
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for name in ("mlp", "cnn"):
            for mode, marker in (("data-free", "o"), ("calibrated", "s")):
                chosen = [p for p in points if p[0] == name and p[1] == mode]
                axis.plot(
                    [p[2] for p in chosen],
                    [p[3] for p in chosen],
                    marker=marker,
                    label=f"{name} {mode}",
                )
            base = next(p[4] for p in points if p[0] == name)
            axis.scatter([1.0], [base], marker="*", s=120)
        axis.set_xlabel("MAC-limit speedup (MACs before ÷ after)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title("digits: accuracy vs speedup at budgets 0.75 / 0.5 / 0.25")
        axis.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "accuracy_pareto.png", dpi=120)


if __name__ == "__main__":
    main()
