"""Save a transformed model as data (a JSON plan and a weights file) and load it back.

Nothing is pickled: ``plan.json`` names, per factorized layer, its target, kind, method and the
method's ``describe()`` spec; ``weights.pt`` is a ``state_dict`` read with ``weights_only=True``.
Loading re-traces the *original* architecture, rebuilds each replacement through the method
registry (no solving), loads the weights and checks that every key and shape matches.
"""

from __future__ import annotations

import copy
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
from fxfactorize.modules.factorized import _FactorizedModule
from fxfactorize.passes.cost import describe_module
from fxfactorize.passes.functional import convert_functional_layers
from fxfactorize.passes.rewrite import replace_submodule, rewrite
from fxfactorize.passes.trace import trace
from fxfactorize.report import PartialReport, Report

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
    report = gm.meta.get("fxfactorize")
    if isinstance(report, Report):
        methods = {record.target: record.method for record in report.factorized}
    else:  # a GraphModule built by hand: every fxfactorize pair is a "lowrank" one
        methods = {
            name: "lowrank"
            for name, module in gm.named_modules()
            if isinstance(module, _FactorizedModule)
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
    report = gm.meta.get("fxfactorize")
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
    """The ``plan.json`` of a saved model, checked for format and version (:class:`LoadError`).

    >>> import tempfile, torch, fxfactorize as ff
    >>> gm = ff.transform(torch.nn.Sequential(torch.nn.Linear(512, 512)), torch.randn(2, 512), progress=False)
    >>> read_saved(ff.save(gm, tempfile.mkdtemp()))["layers"][0]["spec"]
    {'rank': 128, 'bias': True}
    """
    plan_path = Path(path) / PLAN_FILE
    try:
        document = json.loads(plan_path.read_text())
    except FileNotFoundError:
        raise LoadError(
            f"{plan_path} not found: not a directory written by fxfactorize.save"
        ) from None
    except json.JSONDecodeError as error:
        raise LoadError(f"{plan_path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != "fxfactorize":
        raise LoadError(f"{plan_path} was not written by fxfactorize.save")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        written_by = document.get("versions", {}).get("fxfactorize", "unknown")
        raise LoadError(
            f"{plan_path} has format_version {version!r} (written by fxfactorize {written_by}); "
            f"this fxfactorize reads format_version <= {FORMAT_VERSION}: upgrade fxfactorize"
        )
    return document


def load(path: str | os.PathLike, original_model: nn.Module) -> fx.GraphModule:
    """Rebuild the model saved by :func:`save` at ``path`` on ``original_model``'s architecture.

    ``original_model`` (whose weights do not matter; it is not changed) is traced, each saved
    layer is replaced by its method's ``rebuild`` (no solving), and the saved weights are loaded.
    The result carries the saved report as ``gm.meta["fxfactorize"]``.

    Raises:
        LoadError: on a missing/incompatible file, a saved layer the original model lacks or that
            has another kind or shape, or state-dict keys/shapes that do not match.

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
    document = read_saved(path)
    try:
        gm = trace(copy.deepcopy(original_model))
    except TraceError:  # saved from a partial transform: put the layers back into the module tree
        gm = copy.deepcopy(original_model)
    saved_config = (document.get("report") or {}).get("config") or {}
    if isinstance(gm, fx.GraphModule) and saved_config.get("functional", False):
        convert_functional_layers(gm)  # as transform did: F.linear & co. on parameters → layers
    replacements = {}
    for entry in document["layers"]:
        target = entry["target"]
        try:
            module = gm.get_submodule(target)
        except AttributeError:
            raise LoadError(
                f"saved layer {target!r} does not exist in the original model"
            ) from None
        out_size = getattr(module, "out_features", getattr(module, "out_channels", 1))
        layer = describe_module(module, output_numel=out_size)  # positions do not matter here
        if layer is None:
            raise LoadError(
                f"saved layer {target!r} is a {entry['kind']} but the original model has a "
                f"{type(module).__name__} there, which fxfactorize does not factorize"
            )
        try:
            replacements[target] = get_method(entry["method"]).rebuild(module, layer, entry["spec"])
        except (ValueError, KeyError, TypeError) as error:
            raise LoadError(f"cannot rebuild saved layer {target!r}: {error}") from error
        if type(replacements[target]).__name__ != entry["kind"]:
            raise LoadError(
                f"saved layer {target!r} is a {entry['kind']} but rebuilding the original "
                f"{type(module).__name__} gives a {type(replacements[target]).__name__}"
            )
    if isinstance(gm, fx.GraphModule):
        rewrite(gm, replacements)
    else:
        for target, module in replacements.items():
            replace_submodule(gm, target, module)
    state = torch.load(Path(path) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    _load_state(gm, state)
    gm.train(bool(document.get("training", False)))
    if document.get("report") is not None:
        saved = document["report"]
        if not isinstance(gm, fx.GraphModule):
            gm.meta = getattr(gm, "meta", None) or {}
        partial = "regions" in saved  # issue 7's PartialReport
        gm.meta["fxfactorize"] = (PartialReport if partial else Report).from_dict(saved)
    return gm


def _load_state(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        key for key in set(expected) & set(state) if expected[key].shape != state[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(
            "shape mismatch "
            + _few(
                [
                    f"{k} (saved {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                    for k in wrong
                ]
            )
        )
    if problems:
        raise LoadError(
            "the saved weights do not match the original model rebuilt from the plan: "
            + "; ".join(problems)
        )
    gm.load_state_dict(state, strict=True)


def _few(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
