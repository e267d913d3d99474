"""Partial-tracing benchmark: a BERT-shaped encoder whose root torch.fx cannot trace.

Builds the encoder (nn.MultiheadAttention with a padding mask, MLP, LayerNorm, a data-dependent
``if`` at the root, keyword inputs, dict output), transforms it data-free and calibrated, and
prints, side by side in one run on one thread: parameters and MACs (from the report) before/after,
the median forward time of the original and of the result (ratio), the time ``transform`` took,
and the pooled-output nmse on held-out inputs. Run: ``uv run python benchmarks/partial_tracing.py``
(``--quick`` for a smaller model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fxfactorize as ff


class Layer(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 8, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, padding_mask=None):
        x = self.norm1(
            x + self.attention(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0]
        )
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, vocab: int, width: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width, hidden) for _ in range(depth))
        self.pooler = nn.Linear(width, width)

    def forward(self, input_ids, attention_mask=None):
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # untraceable
            mask = attention_mask == 0
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, padding_mask=mask)
        return {"last_hidden_state": x, "pooled": torch.tanh(self.pooler(x[:, 0]))}


def batch(vocab: int, size: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def median_seconds(model: nn.Module, inputs: dict, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, width, hidden, depth, length, repeats = (1000, 512, 2048, 4, 64, 15)
    if args.quick:
        vocab, width, hidden, depth, length, repeats = (200, 256, 1024, 2, 32, 5)
    model = Encoder(vocab, width, hidden, depth).eval()
    with torch.no_grad():  # token embeddings on a 32-d subspace, as trained embeddings are roughly
        model.embed.weight.copy_(torch.randn(vocab, 32) @ torch.randn(32, width) / 32**0.5)
    example = batch(vocab, 8, length, 0)
    held_out = batch(vocab, 8, length, 99)
    calibration = [batch(vocab, 8, length, seed) for seed in range(1, 9)]
    original_time = median_seconds(model, held_out, repeats)
    with torch.no_grad():
        reference = model(**held_out)["pooled"]
    print(
        f"encoder width={width} hidden={hidden} depth={depth}, batch 8 x {length} tokens, 1 thread"
    )
    for name, data in (("data-free", None), ("calibrated", calibration)):
        start = time.perf_counter()
        result = ff.transform(
            model, example, calibration=data, latent_features=0.25, progress=False
        )
        seconds = time.perf_counter() - start
        report = ff.report_of(result)
        totals = report.totals()
        with torch.no_grad():
            pooled = result(**held_out)["pooled"]
        nmse = float(((pooled - reference) ** 2).mean() / reference.var())
        ratio = median_seconds(result, held_out, repeats) / original_time
        print(
            f"{name:>10}: regions {len(report.regions)}, layers factorized {len(report.factorized)}; "
            f"Linear params {totals['params_after'] / totals['params_before']:.3f}x, "
            f"Linear MACs {totals['macs_after'] / totals['macs_before']:.3f}x; "
            f"forward time {ratio:.3f}x of original; transform {seconds:.1f}s; pooled nmse {nmse:.4f}"
        )


if __name__ == "__main__":
    main()
