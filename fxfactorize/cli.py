"""The ``fxfactorize`` command line.

With no subcommand it runs the main job: build a model (torchvision ``resnet50``, random init,
fixed seed), print the plan, transform, print the report, check the outputs, and time both models.
Subcommands do one part each: ``plan``, ``transform --out DIR``, ``report DIR``, ``bench``,
``profile`` (the latency cost model's device profile: show, ``--remeasure``, ``--clear``).

Exit codes: 0 ok, 2 usage error, 1 failure (one line on stderr; a traceback with ``--debug``).

Under ``torchrun --nproc-per-node N -m fxfactorize transform ... --calibration FILE`` the processes
join one gloo process group, each calibrates on its contiguous share of the file's batches, and
all get the same model (see :mod:`fxfactorize.passes.distributed`); only rank 0 prints and writes
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch import nn

from fxfactorize.errors import DistributedError

__all__ = ["build_model", "check_output_dir", "main", "measure_latency", "parse_input_shape"]

log = logging.getLogger("fxfactorize")

DEFAULT_MODEL = "torchvision:resnet50"
DEFAULT_INPUT_SHAPE = "1x3x224x224"


class UsageError(Exception):
    """A bad command-line value; reported with exit code 2."""


# --- building blocks (also usable from Python) ------------------------------------------------


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` (or commas) → ``(1, 3, 224, 224)``; ``UsageError`` otherwise.

    >>> parse_input_shape("2x3x32x32"), parse_input_shape("4,512")
    ((2, 3, 32, 32), (4, 512))
    """
    parts = [p for p in re.split(r"[x,×\s]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise UsageError(f"--input-shape must look like 1x3x224x224 (positive ints); got {text!r}")
    return shape


def build_model(spec: str) -> nn.Module:
    """A model from ``torchvision:NAME`` (random init) or ``package.module:factory`` (called with no
    arguments), in eval mode.

    >>> type(build_model("torch.nn:Identity")).__name__
    'Identity'
    """
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise UsageError(
            f"--model must be torchvision:NAME or package.module:factory; got {spec!r}"
        )
    if source == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as error:
            raise UsageError(f"--model {spec!r}: {error}") from None
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as error:
            raise UsageError(
                f"--model {spec!r}: cannot import {name!r} from {source!r}: {error}"
            ) from None
        model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def measure_latency(
    models: dict[str, Callable[[Any], Any]],
    example: torch.Tensor,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per forward pass of each model, timed interleaved (round-robin) so that
    machine load affects all of them alike.

    >>> times = measure_latency({"id": nn.Identity()}, torch.ones(1), repeats=3, warmup=1)
    >>> list(times), times["id"] >= 0
    (['id'], True)
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(example)
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(example)
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


# --- argument parsing ---------------------------------------------------------------------------


def _config_help() -> dict[str, str]:
    """Per-field help, taken from the ``Args:`` section of FactorizeConfig's docstring."""
    from fxfactorize.config import FactorizeConfig

    helps: dict[str, str] = {}
    current = None
    in_args = False
    for line in (FactorizeConfig.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if not stripped or stripped.startswith(">>>"):
            if helps:
                break
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        if match and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = match.group(1)
            helps[current] = match.group(2)
        elif current:
            helps[current] += " " + stripped
    return helps


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for ints ``>= minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value

    return parse


def _parse_any(text: str) -> Any:
    """For config fields of other types: a JSON value (number, list, null…) or else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per FactorizeConfig field (so fields added later appear without CLI changes).

    Unset options stay out of the namespace: the config's own defaults apply.
    """
    from fxfactorize.config import FactorizeConfig

    group = parser.add_argument_group("factorization options (FactorizeConfig fields)")
    helps = _config_help()
    for field in dataclasses.fields(FactorizeConfig):
        flag = "--" + field.name.replace("_", "-")
        annotation = str(field.type)
        default = field.default if field.default is not dataclasses.MISSING else None
        text = f"{helps.get(field.name, field.name)} (default: {default!r})".replace("%", "%%")
        common = {"dest": f"config_{field.name}", "help": text, "default": argparse.SUPPRESS}
        if annotation == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif annotation == "int":
            group.add_argument(flag, type=int, metavar="INT", **common)
        elif "int" in annotation and "float" in annotation:
            group.add_argument(flag, type=_parse_number, metavar="N", **common)
        elif annotation == "float":
            group.add_argument(flag, type=float, metavar="X", **common)
        elif annotation == "str":
            group.add_argument(flag, metavar="NAME", **common)
        else:
            group.add_argument(flag, type=_parse_any, metavar="VALUE", **common)


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options shared by the main job and every subcommand.

    On subcommands the defaults are suppressed so that a value given before the subcommand is not
    overwritten by the subcommand's default (an argparse pitfall).
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document instead of tables",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="only errors on stderr; no progress bars",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more logging (-v info, -vv debug)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the full traceback on failure",
    )


def _add_model_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default(DEFAULT_MODEL),
        help=f"torchvision:NAME (random init) or package.module:factory (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--input-shape",
        default=default(DEFAULT_INPUT_SHAPE),
        help=f"example input shape, e.g. 1x3x224x224 (default: {DEFAULT_INPUT_SHAPE})",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=default(0),
        help="seed for the random weights and input (default: 0)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=default(None),
        help="torch CPU threads (default: torch's own choice)",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        default=default(False),
        help="run the model and its 4-d example input in channels_last memory format (faster "
        "convolutions on CPU; the timings compare both models in it)",
    )
    group.add_argument(
        "--calibration",
        default=default(None),
        metavar="FILE",
        help="calibration inputs saved with torch.save: one tensor (split into batches of the "
        "example's batch size) or a list of batches (tensors, tuples or dicts); transform, bench "
        "and the main job then solve the layers on them (default: data-free)",
    )


def _add_bench_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("timing")
    group.add_argument(
        "--repeats",
        type=_int_at_least(1),
        metavar="N",
        default=default(10),
        help="timed forward passes per model, interleaved (default: 10)",
    )
    group.add_argument(
        "--warmup",
        type=_int_at_least(0),
        metavar="N",
        default=default(2),
        help="untimed forward passes per model first (default: 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfactorize",
        description="Factorize the Linear/Conv layers of a model into low-rank pairs. With no "
        "subcommand: plan, transform, report, check and time a model (torchvision resnet50, "
        "random init, by default).",
        epilog="Exit codes: 0 ok, 2 usage error, 1 failure (one line; --debug for a traceback).",
    )
    _add_common(parser, suppress=False)
    _add_model_options(parser, suppress=False)
    _add_bench_options(parser, suppress=False)
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="also save the transformed model to DIR (see `transform --out`)",
    )
    parser.add_argument(
        "--no-bench", dest="bench", action="store_false", help="skip the latency measurement"
    )
    _add_config_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, model: bool = True, bench: bool = False):
        command = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(command, suppress=True)
        if model:
            _add_model_options(command, suppress=True)
            _add_config_options(command)
        if bench:
            _add_bench_options(command, suppress=True)
        return command

    add("plan", "print what transform would do, per layer (nothing is solved)")
    transform = add("transform", "transform the model, print the report and save it to --out DIR")
    transform.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for plan.json and weights.pt (load with fxfactorize.load)",
    )
    report = add(
        "report", "print the report of a model saved by `transform --out DIR`", model=False
    )
    report.add_argument("directory", metavar="DIR", help="a directory written by fxfactorize.save")
    add("bench", "median eager latency of the original vs the transformed model", bench=True)
    profile = add(
        "profile",
        "show the latency cost model's device profile for this machine (measured and cached "
        "if there is none yet), re-measure it, or clear the cache",
        model=False,
    )
    profile.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    profile.add_argument(
        "--dtype", default="float32", help="dtype the profile is for (default: float32)"
    )
    profile.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="torch CPU threads (part of the key; default: torch's own choice)",
    )
    action = profile.add_mutually_exclusive_group()
    action.add_argument(
        "--remeasure", action="store_true", help="measure again and store it in the cache"
    )
    action.add_argument(
        "--clear",
        action="store_true",
        help="delete the cache file (every machine's entries; each re-measures on next use)",
    )
    return parser


# --- commands -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """The resolved inputs of a command: model, example input, config."""

    model_spec: str
    model: nn.Module
    example: torch.Tensor
    config: Any
    calibration: list | None = None


def _prepare(args: argparse.Namespace) -> _Run:
    from fxfactorize.config import FactorizeConfig

    overrides = {
        key.removeprefix("config_"): value
        for key, value in vars(args).items()
        if key.startswith("config_")
    }
    if args.quiet or args.json:
        overrides.setdefault("progress", False)
    try:
        config = FactorizeConfig.build(None, **overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "out", None) is not None:
        check_output_dir(args.out)
    shape = parse_input_shape(args.input_shape)
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    example = torch.randn(shape)
    if args.channels_last:
        if len(shape) != 4:
            raise UsageError(f"--channels-last needs a 4-d --input-shape (N×C×H×W); got {shape}")
        model = model.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    calibration = load_calibration(args.calibration, shape[0]) if args.calibration else None
    if calibration is not None and dist.is_initialized():
        calibration = share_of_batches(calibration, dist.get_rank(), dist.get_world_size())
    return _Run(args.model, model, example, config, calibration)


def share_of_batches(batches: list, rank: int, size: int) -> list:
    """Rank ``rank``'s contiguous share of ``batches`` among ``size`` ranks (the first ranks get
    one more), so that the ranks' shares in rank order are ``batches``; ``UsageError`` when
    there are fewer batches than ranks.

    >>> [share_of_batches(list(range(5)), rank, 2) for rank in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    if len(batches) < size:
        raise UsageError(
            f"--calibration has {len(batches)} batch(es) for {size} processes; give at least "
            "one batch per process"
        )
    base, extra = divmod(len(batches), size)
    start = rank * base + min(rank, extra)
    return batches[start : start + base + (rank < extra)]


def _join_torchrun() -> bool:
    """Initialise the default process group (gloo: the command line's models run on the CPU)
    when launched by ``torchrun`` with several processes; return whether it was done here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _is_rank_zero() -> bool:
    """Whether this process prints and writes: always, unless it is a later rank of a group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_output_dir(path: str) -> None:
    """``UsageError`` naming ``--out`` unless ``path`` is, or can be made, a writable directory.

    Checked before any work, so that a bad ``--out`` does not fail after a long transform.

    >>> import tempfile
    >>> check_output_dir(tempfile.mkdtemp() + "/new/folder")
    >>> check_output_dir("")
    Traceback (most recent call last):
    ...
    fxfactorize.cli.UsageError: --out must name a directory; got ''
    """
    if not path:
        raise UsageError("--out must name a directory; got ''")
    folder = Path(path)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UsageError(f"--out {path!r}: {str(existing)!r} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path!r}: {str(existing)!r} is not writable")


def load_calibration(path: str, batch_size: int) -> list:
    """Calibration batches from a ``torch.save`` file (loaded with ``weights_only=True``).

    A tensor is split along its first dimension into batches of ``batch_size``; a list or tuple
    is taken as the batches themselves.

    >>> import tempfile, os
    >>> file = os.path.join(tempfile.mkdtemp(), "calibration.pt")
    >>> torch.save(torch.randn(10, 3), file)
    >>> [tuple(b.shape) for b in load_calibration(file, 4)]
    [(4, 3), (4, 3), (2, 3)]
    """
    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--calibration: no such file: {path!r}") from None
    except Exception as error:  # unpickling refused or a corrupt file: say which, in one line
        raise UsageError(f"--calibration: cannot load {path!r}: {error}") from None
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise UsageError(f"--calibration: the tensor in {path!r} has no rows to batch")
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)) and data:
        return list(data)
    raise UsageError(
        f"--calibration: {path!r} must hold a tensor or a non-empty list of batches; "
        f"got {type(data).__name__}"
    )


def _emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    if not _is_rank_zero():  # under torchrun, rank 0 speaks for all
        return 0
    if args.json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print(text)


def _check_outputs(original: nn.Module, transformed: nn.Module, example: torch.Tensor) -> dict:
    with torch.inference_mode():
        before, after = original(example), transformed(example)
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return {"checked": False, "reason": "outputs are not single tensors"}
    if before.shape != after.shape:
        raise RuntimeError(
            f"transformed output shape {tuple(after.shape)} != original {tuple(before.shape)}"
        )
    if not torch.isfinite(after).all():
        raise RuntimeError("transformed model produced non-finite outputs")
    variance = before.double().var().item()
    nmse = (after.double() - before.double()).pow(2).mean().item() / variance if variance else 0.0
    return {"checked": True, "shape": list(after.shape), "finite": True, "output_nmse": nmse}


def _latency_table(times: dict[str, float]) -> str:
    base = times["original"]
    rows = [
        [name, f"{seconds * 1e3:.1f}", f"{seconds / base:.3f}×"] for name, seconds in times.items()
    ]
    return tabulate(rows, headers=["model", "median ms", "vs original"], tablefmt="simple")


def _cmd_plan(args: argparse.Namespace) -> int:
    import fxfactorize as ff

    run = _prepare(args)
    the_plan = ff.plan(run.model, run.example, config=run.config)
    _emit(args, {"model": run.model_spec, "plan": the_plan.to_dict()}, str(the_plan))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fxfactorize.persistence import read_saved
    from fxfactorize.report import Report

    document = read_saved(args.directory)
    if document.get("report") is None:
        raise RuntimeError(
            f"{args.directory} holds no report (saved from a hand-built GraphModule)"
        )
    report = Report.from_dict(document["report"])
    versions = document.get("versions", {})
    header = (
        f"saved by fxfactorize {versions.get('fxfactorize', '?')} with torch "
        f"{versions.get('torch', '?')}"
    )
    _emit(args, {"directory": args.directory, **document}, f"{header}\n{report}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import fxfactorize as ff

    run = _prepare(args)
    gm = ff.transform(run.model, run.example, config=run.config, calibration=run.calibration)
    times = measure_latency(
        {"original": run.model, "transformed": gm}, run.example, args.repeats, args.warmup
    )
    document = {
        "model": run.model_spec,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "median_seconds": times,
    }
    _emit(
        args,
        document,
        f"{_latency_table(times)}\n(eager, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved runs)",
    )
    return 0


def _cmd_transform(args: argparse.Namespace, *, full_job: bool = False) -> int:
    import fxfactorize as ff

    run = _prepare(args)
    text: list[str] = []
    document: dict[str, Any] = {"model": run.model_spec, "input_shape": list(run.example.shape)}
    if full_job:
        the_plan = ff.plan(run.model, run.example, config=run.config)
        text.append(str(the_plan))
        document["plan"] = the_plan.to_dict()
    started = time.perf_counter()
    gm = ff.transform(run.model, run.example, config=run.config, calibration=run.calibration)
    report = ff.report_of(gm)
    text.append(str(report))
    document["report"] = report.to_dict()
    document["transform_seconds"] = time.perf_counter() - started
    if full_job:
        check = _check_outputs(run.model, gm, run.example)
        document["check"] = check
        if check["checked"]:
            text.append(
                f"outputs: shape {tuple(check['shape'])} as before, all finite, "
                f"output nmse {check['output_nmse']:.3g}"
            )
        if args.bench:
            times = measure_latency(
                {"original": run.model, "transformed": gm}, run.example, args.repeats, args.warmup
            )
            document["median_seconds"] = times
            document["threads"] = torch.get_num_threads()
            text.append(
                f"{_latency_table(times)}\n(eager, {torch.get_num_threads()} threads, "
                f"median of {args.repeats} interleaved runs)"
            )
    if args.out is not None and _is_rank_zero():
        folder = ff.save(gm, args.out)
        document["saved_to"] = str(folder)
        text.append(f"saved to {folder} (load with fxfactorize.load(path, original_model))")
    _emit(args, document, "\n\n".join(text))
    return 0


_SOURCES = {
    "pinned": "pinned in this process (set_device_profile)",
    "environment": "$FXFACTORIZE_DEVICE_PROFILE",
    "process": "measured earlier in this process",
    "cache": "cache file {cache_file}",
    "measured": "measured now, stored in {cache_file}",
}


def _cmd_profile(args: argparse.Namespace) -> int:
    from fxfactorize.costmodels import roofline

    if args.clear:
        where = roofline.profile_cache_file()
        removed = roofline.clear_profile_cache()
        document = {"cleared": str(removed) if removed else None, "cache_file": str(where)}
        text = f"removed {removed}" if removed else f"no cache file at {where}"
        _emit(args, document, text)
        return 0
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"--dtype must name a torch dtype such as float32; got {args.dtype!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device {args.device!r}: {error}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    found = roofline.resolve_device_profile(str(device), dtype, remeasure=args.remeasure)
    source = _SOURCES[found.source].format(cache_file=found.cache_file)
    numbers = dataclasses.asdict(found.profile)
    document = {
        "key": found.key,
        **numbers,
        "source": found.source,
        "cache_file": str(found.cache_file),
        "remeasured": args.remeasure,
    }
    rows = [
        ["FLOP/s (large matrix product)", f"{numbers['flops_per_s']:.3g}"],
        ["bytes/s (streamed weight)", f"{numbers['bytes_per_s']:.3g}"],
        ["seconds per call", f"{numbers['launch_s']:.3g}"],
    ]
    lines = [f"device profile {found.key}", tabulate(rows, tablefmt="plain"), f"from: {source}"]
    if args.remeasure and found.source in ("pinned", "environment"):
        lines.append(f"(re-measured and stored in {found.cache_file}; used when not overridden)")
    _emit(args, document, "\n".join(lines))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be swapped)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


def _configure_logging(args: argparse.Namespace) -> logging.Handler:
    """Send the library's log records to stderr at the level -q/-v ask for; returns the handler."""
    level = (
        logging.ERROR
        if args.quiet
        else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    )
    logger = logging.getLogger("fxfactorize")
    logger.setLevel(level)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("fxfactorize: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    >>> main(["plan", "--model", "torch.nn:Identity", "--input-shape", "2x4", "--json"]) == 0
    ...  # doctest: +ELLIPSIS
    {...}
    True
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage line
        return int(exit_.code or 0)
    handler = _configure_logging(args)
    joined = False
    commands = {
        "plan": _cmd_plan,
        "transform": _cmd_transform,
        "report": _cmd_report,
        "bench": _cmd_bench,
        "profile": _cmd_profile,
        None: lambda a: _cmd_transform(a, full_job=True),
    }
    try:
        joined = _join_torchrun()
        return commands[args.command](args)
    except UsageError as error:
        print(f"fxfactorize: error: {error} (see fxfactorize --help)", file=sys.stderr)
        return 2
    except Exception as error:  # the CLI's contract: one line, exit 1, traceback on request
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if _is_rank_zero() or not isinstance(error, DistributedError):  # said once, by rank 0
            print(f"fxfactorize: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    finally:  # main() may be called repeatedly in one process (tests, notebooks)
        if joined:
            dist.destroy_process_group()
        logging.getLogger("fxfactorize").removeHandler(handler)
        logging.getLogger("fxfactorize").setLevel(logging.NOTSET)
