"""Save a transformed model as data (a JSON plan and a weights file) and load it back.

Nothing is pickled: ``plan.json`` names, per factorized layer, its target, kind, method and the
method's ``describe()`` spec; ``weights.pt`` is a ``state_dict`` read with ``weights_only=True``.
Loading re-traces the *original* architecture, rebuilds each replacement through the method
registry (no solving), loads the weights and checks that every key and shape matches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxfactorize._version import __version__
from fxfactorize.errors import FactorizeError, TraceError
from fxfactorize.methods import get_method
from fxfactorize.methods.base import Method
from fxfactorize.modules import FactorizedPair
from fxfactorize.passes.cost import LayerShape, describe_module
from fxfactorize.passes.functional import convert_functional_layers
from fxfactorize.passes.rewrite import replace_submodule, rewrite
from fxfactorize.passes.trace import trace
from fxfactorize.report import REPORT_META, LayerRecord, PartialReport, Report

__all__ = ["FORMAT_VERSION", "LoadError", "load", "read_saved", "save"]

log = logging.getLogger("fxfactorize")

#: Version of the saved layout; ``load`` refuses files with a higher one.
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.pt"


class LoadError(FactorizeError):
    """A saved model cannot be loaded onto the given original model (mismatch or version)."""


def _versions() -> dict[str, str]:
    return {"fxfactorize": __version__, "torch": torch.__version__}


def _factorized_layers(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """``[{target, kind, method, spec}]`` for each replaced layer of ``gm``."""
    report = gm.meta.get(REPORT_META)
    if isinstance(report, Report):
        methods = {record.target: record.method for record in report.factorized}
    else:  # a GraphModule built by hand: every fxfactorize pair is a "lowrank" one
        methods = {
            name: "lowrank"
            for name, module in gm.named_modules()
            if isinstance(module, FactorizedPair)
        }
    layers = []
    for target, method_name in methods.items():
        module = gm.get_submodule(target)
        layers.append(
            {
                "target": target,
                "kind": type(module).__name__,
                "method": method_name,
                "spec": get_method(method_name).describe(module),
            }
        )
    return layers


def save(gm: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``gm`` (a result of :func:`~fxfactorize.transform`) to the directory ``path``.

    Writes ``plan.json`` (format version, library and torch versions, config, the factorized
    layers and the report) and ``weights.pt`` (the state dict). Returns the directory.

    >>> import tempfile, torch, fxfactorize as ff
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    >>> gm = ff.transform(model, torch.randn(2, 512), progress=False)
    >>> folder = ff.save(gm, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['plan.json', 'weights.pt']
    """
    if not isinstance(gm, fx.GraphModule) and not isinstance(getattr(gm, "meta", None), dict):
        raise TypeError(  # a partially traced result is the model itself, carrying .meta
            f"gm must be a torch.fx.GraphModule from transform; got {type(gm).__name__}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    report = gm.meta.get(REPORT_META)
    document = {
        "format": "fxfactorize",
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "training": gm.training,
        "layers": _factorized_layers(gm),
        "report": report.to_dict() if isinstance(report, Report) else None,
    }
    (folder / PLAN_FILE).write_text(json.dumps(document, indent=2, default=str) + "\n")
    torch.save(gm.state_dict(), folder / WEIGHTS_FILE)
    log.info("saved %d factorized layers to %s", len(document["layers"]), folder)
    return folder


def read_saved(path: str | os.PathLike) -> dict[str, Any]:
    """The ``plan.json`` of a saved model, checked for format, version, keys and types.

    Every problem is a :class:`LoadError` naming the file, and the layer and key where it is one.

    >>> import tempfile, torch, fxfactorize as ff
    >>> gm = ff.transform(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512), progress=False)
    >>> read_saved(ff.save(gm, tempfile.mkdtemp()))["layers"][0]["spec"]
    {'rank': 128, 'bias': True}
    """
    return _read_plan(Path(path) / PLAN_FILE)[0]


def load(path: str | os.PathLike, original_model: nn.Module) -> fx.GraphModule:
    """Rebuild the model saved by :func:`save` at ``path`` on ``original_model``'s architecture.

    ``original_model`` (whose weights do not matter; it is not changed) is traced, each saved
    layer is replaced by its method's ``rebuild`` (no solving), and the saved weights are loaded.
    The result carries the saved report as ``gm.meta["fxfactorize"]``.

    Everything is checked before any layer is built: the plan's keys and types, the weights
    file, and each layer's spec against the original layer's dimensions and the saved tensors'
    shapes (so a hostile ``plan.json`` cannot make ``load`` allocate more than the weights hold).

    Raises:
        LoadError: naming the file, layer and key, on a missing, damaged or incompatible file,
            a malformed plan, a saved layer the original model lacks or that has another kind
            or shape, or state-dict keys, shapes or dtypes that do not match.

    >>> import tempfile, torch, fxfactorize as ff
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
    >>> x = torch.randn(2, 512)
    >>> gm = ff.transform(model, x, progress=False)
    >>> again = ff.load(ff.save(gm, tempfile.mkdtemp()), model)
    >>> torch.equal(again(x), gm(x))
    True
    """
    if not isinstance(original_model, nn.Module):
        raise TypeError(
            f"original_model must be a torch.nn.Module; got {type(original_model).__name__}"
        )
    folder = Path(path)
    document, report = _read_plan(folder / PLAN_FILE)
    state = _read_weights(folder / WEIGHTS_FILE)
    gm = _prepare_original(original_model, document)
    checked = [
        _check_layer(gm, entry, state, folder / PLAN_FILE, folder / WEIGHTS_FILE)
        for entry in document["layers"]
    ]
    _install(gm, _rebuild(checked))
    _load_state(gm, state, folder / WEIGHTS_FILE)
    gm.train(document["training"])
    if report is not None:
        if not isinstance(gm, fx.GraphModule):
            gm.meta = getattr(gm, "meta", None) or {}
        gm.meta[REPORT_META] = report
    return gm


# -- plan.json ------------------------------------------------------------------------------------


def _read_plan(plan_path: Path) -> tuple[dict[str, Any], Report | None]:
    """The checked document of ``plan_path`` and the report it holds (``None`` if none)."""
    document = _parse_json(plan_path)
    if not isinstance(document, dict) or document.get("format") != "fxfactorize":
        raise LoadError(f"{plan_path} was not written by fxfactorize.save")
    _check_format_version(document, plan_path)
    _field(document, "training", bool, str(plan_path))
    if document.get("versions") is not None:
        _field(document, "versions", dict, str(plan_path))
    for index, entry in enumerate(_field(document, "layers", list, str(plan_path))):
        _check_entry(entry, index, plan_path)
    seen: set[str] = set()
    for entry in document["layers"]:
        if entry["target"] in seen:
            raise LoadError(
                f"{plan_path}: saved layer {entry['target']!r} appears twice in 'layers'"
            )
        seen.add(entry["target"])
    return document, _read_report(document, plan_path)


def _parse_json(plan_path: Path) -> object:
    try:
        data = plan_path.read_bytes()
    except FileNotFoundError:
        raise LoadError(
            f"{plan_path} not found: not a directory written by fxfactorize.save"
        ) from None
    except OSError as error:
        raise LoadError(f"cannot read {plan_path}: {error}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LoadError(f"{plan_path} is not UTF-8 text: {error}") from None
    except RecursionError:
        raise LoadError(f"{plan_path} is nested too deeply to be a saved plan") from None
    except ValueError as error:  # JSONDecodeError, or an int of more digits than Python reads
        raise LoadError(f"{plan_path} is not valid JSON: {error}") from None


def _check_format_version(document: dict[str, Any], plan_path: Path) -> None:
    version = document.get("format_version")
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if is_int and 1 <= version <= FORMAT_VERSION:
        return
    versions = document.get("versions")
    written_by = versions.get("fxfactorize", "unknown") if isinstance(versions, dict) else "unknown"
    if is_int and version > FORMAT_VERSION:
        raise LoadError(
            f"{plan_path} has format_version {version!r} (written by fxfactorize {written_by!s:.40}); "
            f"this fxfactorize reads format_version <= {FORMAT_VERSION}: upgrade fxfactorize"
        )
    raise LoadError(
        f"{plan_path} has format_version {_short(version)}: not a version fxfactorize writes "
        f"(an int from 1 to {FORMAT_VERSION})"
    )


def _check_entry(entry: object, index: int, plan_path: Path) -> None:
    """One item of ``layers``: an object with a str target, kind and method and an object spec."""
    where = f"{plan_path}: layers[{index}]"
    if not isinstance(entry, dict):
        raise LoadError(f"{where} must be an object; got {_short(entry)}")
    target = _field(entry, "target", str, where)
    where = f"{plan_path}: saved layer {target!r}"
    for key, kind in (("kind", str), ("method", str), ("spec", dict)):
        _field(entry, key, kind, where)


def _read_report(document: dict[str, Any], plan_path: Path) -> Report | None:
    """The saved report as a :class:`Report` (or :class:`PartialReport`), its values type-checked."""
    saved = document.get("report")
    if saved is None:
        return None
    where = f"{plan_path}: the report"
    if not isinstance(saved, dict):
        raise LoadError(f"{plan_path}: 'report' must be an object or null; got {_short(saved)}")
    if saved.get("config") is not None:
        _field(saved, "config", dict, where)
    for index, record in enumerate(_field(saved, "layers", list, where)):
        _check_record(record, f"{where}, layers[{index}]")
    try:
        return (PartialReport if "regions" in saved else Report).from_dict(saved)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise LoadError(f"{where} is malformed: {error}") from None


def _check_record(record: object, where: str) -> None:
    """A :class:`LayerRecord` dictionary: each known field of the JSON type its annotation names."""
    if not isinstance(record, dict):
        raise LoadError(f"{where} must be an object; got {_short(record)}")
    for field in dataclasses.fields(LayerRecord):
        if field.name not in record:
            if field.default is dataclasses.MISSING:
                raise LoadError(f"{where} has no {field.name!r}")
            continue
        value = record[field.name]
        if not _json_fits(value, str(field.type)):
            raise LoadError(f"{where}: {field.name!r} must be {field.type}; got {_short(value)}")


_JSON_CHECKS = {
    "None": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple[int, ...]": lambda v: isinstance(v, list) and all(_JSON_CHECKS["int"](i) for i in v),
}


def _json_fits(value: object, annotation: str) -> bool:
    """Whether JSON ``value`` fits ``annotation`` (``"int | None"``...); unknown types fit."""
    parts = [part.strip() for part in annotation.split("|")]
    if any(part not in _JSON_CHECKS for part in parts):
        return True
    return any(_JSON_CHECKS[part](value) for part in parts)


def _field(mapping: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``mapping[key]``, a ``kind``; a :class:`LoadError` naming ``where`` and ``key`` if not."""
    if key not in mapping:
        raise LoadError(f"{where} has no {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise LoadError(f"{where}: {key!r} must be {_KIND_NAMES[kind]}; got {_short(value)}")
    return value


_KIND_NAMES = {str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- weights.pt -----------------------------------------------------------------------------------


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights_path`` (read with ``weights_only=True``): str keys, dense tensors."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LoadError(f"{weights_path} not found: the save is incomplete") from None
    except Exception as error:  # a damaged file: torch.load raises many types (EOFError, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:200] or "empty or truncated file"
        raise LoadError(
            f"cannot read {weights_path} as a weights-only state dict: "
            f"{type(error).__name__}: {reason}"
        ) from None
    if not isinstance(state, dict):
        raise LoadError(
            f"{weights_path} is not a state dict (a dict of tensors); it holds a "
            f"{type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str):
            raise LoadError(f"{weights_path}: key {_short(key)} is not a string")
        if not isinstance(value, torch.Tensor):
            raise LoadError(f"{weights_path}: {key} is a {type(value).__name__}, not a tensor")
        if value.layout is not torch.strided:
            raise LoadError(f"{weights_path}: {key} has layout {value.layout}, not a dense tensor")
    return state


# -- rebuilding -----------------------------------------------------------------------------------


def _prepare_original(original_model: nn.Module, document: dict[str, Any]) -> nn.Module:
    """A traced copy of ``original_model`` (the copy itself when its root does not trace)."""
    try:
        gm = trace(copy.deepcopy(original_model))
    except TraceError:  # saved from a partial transform: put the layers back into the module tree
        gm = copy.deepcopy(original_model)
    saved_config = (document.get("report") or {}).get("config") or {}
    if isinstance(gm, fx.GraphModule) and saved_config.get("functional") is True:
        convert_functional_layers(gm)  # as transform did: F.linear & co. on parameters → layers
    return gm


@dataclasses.dataclass
class _CheckedLayer:
    """A saved layer whose spec fits the original layer and the saved tensors."""

    where: str
    entry: dict[str, Any]
    module: nn.Module
    layer: LayerShape
    method: Method


def _check_layer(
    gm: nn.Module,
    entry: dict[str, Any],
    state: dict[str, torch.Tensor],
    plan_path: Path,
    weights_path: Path,
) -> _CheckedLayer:
    """Check one saved layer against the original model and the weights; allocate nothing."""
    target = entry["target"]
    where = f"{plan_path}: saved layer {target!r}"
    try:
        module = gm.get_submodule(target)
    except AttributeError:
        raise LoadError(f"{where} does not exist in the original model") from None
    out_size = getattr(module, "out_features", getattr(module, "out_channels", 1))
    layer = describe_module(module, output_numel=out_size)  # positions do not matter here
    if layer is None:
        raise LoadError(
            f"{where} is a {entry['kind']} but the original model has a "
            f"{type(module).__name__} there, which fxfactorize does not factorize"
        )
    try:
        method = get_method(entry["method"])
        refused = method.accepts(layer)
        if refused is not None:
            raise ValueError(refused)
        shapes = method.spec_shapes(layer, entry["spec"])
    except ValueError as error:
        raise LoadError(f"{where}: {error}") from None
    _check_shapes(target, shapes, state, f"{where} (method {entry['method']!r})", weights_path)
    return _CheckedLayer(where, entry, module, layer, method)


def _check_shapes(
    target: str,
    shapes: dict[str, tuple[int, ...]],
    state: dict[str, torch.Tensor],
    where: str,
    weights_path: Path,
) -> None:
    """The tensors the spec gives under ``target`` are exactly those saved, shape for shape."""
    planned = {f"{target}.{key}": tuple(shape) for key, shape in shapes.items()}
    saved = {
        key: tuple(value.shape) for key, value in state.items() if key.startswith(f"{target}.")
    }
    if planned == saved:
        return
    problems = [f"missing {key} {planned[key]}" for key in sorted(set(planned) - set(saved))]
    problems += [f"unexpected {key}" for key in sorted(set(saved) - set(planned))]
    problems += [
        f"{key} (plan on this model {planned[key]}, saved {saved[key]})"
        for key in sorted(set(planned) & set(saved))
        if planned[key] != saved[key]
    ]
    raise LoadError(
        f"{where}: the tensors its spec gives do not match {weights_path} (shape mismatch): "
        + _few(problems)
    )


def _rebuild(checked: list[_CheckedLayer]) -> dict[str, nn.Module]:
    """The unsolved replacement of each checked layer, keyed by target; targets naming one module
    object of the original (a layer shared by regions) get one replacement, so sharing is kept."""
    replacements: dict[str, nn.Module] = {}
    rebuilt: dict[int, nn.Module] = {}
    for item in checked:
        if id(item.module) in rebuilt:
            replacements[item.entry["target"]] = rebuilt[id(item.module)]
            continue
        try:
            new = item.method.rebuild(item.module, item.layer, item.entry["spec"])
        except (ValueError, TypeError) as error:
            raise LoadError(f"{item.where}: cannot rebuild it: {error}") from error
        if type(new).__name__ != item.entry["kind"]:
            raise LoadError(
                f"{item.where} is a {item.entry['kind']} but rebuilding the original "
                f"{type(item.module).__name__} gives a {type(new).__name__}"
            )
        replacements[item.entry["target"]] = rebuilt[id(item.module)] = new
    return replacements


def _install(gm: nn.Module, replacements: dict[str, nn.Module]) -> None:
    if isinstance(gm, fx.GraphModule):
        rewrite(gm, replacements)
    else:
        for target, module in replacements.items():
            replace_submodule(gm, target, module)


def _load_state(gm: nn.Module, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(expected) & set(state))
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    for what, attribute in (("shape mismatch", "shape"), ("dtype mismatch", "dtype")):
        wrong = [
            k for k in common if getattr(expected[k], attribute) != getattr(state[k], attribute)
        ]
        if wrong:
            problems.append(
                f"{what} "
                + _few(
                    [
                        f"{k} (saved {_described(state[k], attribute)}, "
                        f"model {_described(expected[k], attribute)})"
                        for k in wrong
                    ]
                )
            )
    if problems:
        hint = (
            " (load onto an original model of the saved dtype)" if "dtype" in problems[-1] else ""
        )
        raise LoadError(
            f"the weights in {weights_path} do not match the original model rebuilt from the "
            "plan: " + "; ".join(problems) + hint
        )
    gm.load_state_dict(state, strict=True)


def _described(tensor: torch.Tensor, attribute: str) -> str:
    return str(tuple(tensor.shape)) if attribute == "shape" else str(tensor.dtype)


def _few(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
