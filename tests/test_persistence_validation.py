"""ff.load on malformed, hostile or damaged saves: every problem is a LoadError naming it,
found before anything is allocated for the rebuilt layers."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxfactorize as ff
from fxfactorize.methods.lowrank import LowRankMethod
from fxfactorize.methods.tensorized import TensorizedMethod
from fxfactorize.persistence import FORMAT_VERSION, read_saved

RANK = r"spec 'rank' must be an int in \[1, 32\]; got"  # both layers' full rank is 32
SMALL = {"min_channels": 16, "min_features": 16, "cost_model": "macs", "progress": False}


class Net(nn.Module):
    """A conv and a linear head, factorized as rank-8 pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU())


@pytest.fixture(scope="module")
def lowrank_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    x = torch.randn(2, 32, 4, 4)
    gm = ff.transform(Net(), x, latent_channels=8, latent_features=8, **SMALL)
    assert [r.target for r in gm.meta["fxfactorize"].factorized] == ["conv", "head"]
    return ff.save(gm, tmp_path_factory.mktemp("lowrank"))


@pytest.fixture(scope="module")
def tt_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    gm = ff.transform(mlp(), torch.randn(2, 64), method="tt", latent_features=16, **SMALL)
    assert [r.detail for r in gm.meta["fxfactorize"].factorized] == [
        "tt (4, 4, 4)→(4, 4, 4) ranks (1, 4, 14, 14, 14, 4, 1)"
    ]
    return ff.save(gm, tmp_path_factory.mktemp("tt"))


def copy_of(save: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(save, tmp_path / "copy"))


def edit_plan(folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = folder / "plan.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return folder


def spy_on_rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``rebuild`` (the step that allocates the new layers' parameters)."""
    calls: list[str] = []
    for cls in (LowRankMethod, TensorizedMethod):
        original = cls.rebuild

        def spy(self, module, layer, spec, _original=original):
            calls.append(self.name)
            return _original(self, module, layer, spec)

        monkeypatch.setattr(cls, "rebuild", spy)
    return calls


def set_at(document: dict[str, Any], path: tuple, value: Any) -> None:
    *parents, last = path
    for key in parents:
        document = document[key]
    document[last] = value


def delete_at(document: dict[str, Any], path: tuple) -> None:
    *parents, last = path
    for key in parents:
        document = document[key]
    del document[last]


# -- plan.json: missing keys and wrong types ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("format_version",), "format_version"),
        (("layers",), "'layers'"),
        (("training",), "'training'"),
        (("layers", 0, "target"), r"layers\[0\].*'target'"),
        (("layers", 0, "kind"), r"'conv'.*'kind'"),
        (("layers", 0, "method"), r"'conv'.*'method'"),
        (("layers", 0, "spec"), r"'conv'.*'spec'"),
        (("layers", 0, "spec", "rank"), r"'conv'.*'rank'"),
        (("layers", 1, "spec", "bias"), r"'head'.*'bias'"),
        (("report", "layers"), "report"),
        (("report", "layers", 0, "target"), "report"),
    ],
)
def test_a_missing_key_is_a_load_error_naming_it(lowrank_save, tmp_path, path, message) -> None:
    folder = edit_plan(copy_of(lowrank_save, tmp_path), lambda d: delete_at(d, path))
    with pytest.raises(ff.LoadError, match=message) as caught:
        ff.load(folder, Net())
    assert "plan.json" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format_version",), -1, "format_version -1"),
        (("format_version",), 0, "format_version 0"),
        (("format_version",), "1", "format_version '1'"),
        (("format_version",), True, "format_version True"),
        (("format_version",), 1.0, "format_version 1.0"),
        (("format_version",), None, "format_version None"),
        (("format_version",), FORMAT_VERSION + 1, "upgrade fxfactorize"),
        (("versions",), [], "'versions'"),
        (("training",), "no", "'training'"),
        (("layers",), {"conv": {}}, "'layers' must be a list"),
        (("layers", 0), ["conv"], r"layers\[0\] must be an object"),
        (("layers", 0, "target"), 5, r"layers\[0\].*'target' must be a string"),
        (("layers", 0, "method"), ["lowrank"], r"'conv'.*'method' must be a string"),
        (("layers", 0, "method"), "svd++", r"'conv'.*method must be one of"),
        (("layers", 0, "kind"), 7, r"'conv'.*'kind' must be a string"),
        (("layers", 0, "spec"), [8, True], r"'conv'.*'spec' must be an object"),
        (("layers", 0, "spec", "rank"), 128.9, rf"'conv': {RANK} 128\.9"),
        (("layers", 0, "spec", "rank"), 8.0, rf"'conv': {RANK} 8\.0"),
        (("layers", 0, "spec", "rank"), "8", rf"'conv': {RANK} '8'"),
        (("layers", 0, "spec", "rank"), True, rf"'conv': {RANK} True"),
        (("layers", 0, "spec", "rank"), None, rf"'conv': {RANK} None"),
        (("layers", 0, "spec", "rank"), 0, rf"'conv': {RANK} 0"),
        (("layers", 0, "spec", "rank"), -8, rf"'conv': {RANK} -8"),
        (("layers", 0, "spec", "rank"), 10**6, rf"'conv': {RANK} 1000000"),
        (("layers", 1, "spec", "rank"), 10**6, rf"'head': {RANK} 1000000"),
        (("layers", 0, "spec", "rank"), 4, r"'conv'.*conv\.module0\.weight"),
        (
            ("layers", 0, "spec", "bias"),
            "yes",
            r"'conv': spec 'bias' must be true or false; got 'yes'",
        ),
        (("layers", 0, "spec", "bias"), False, r"'conv'.*unexpected conv\.module1\.bias"),
        (("layers", 1, "target"), "conv", r"'conv' appears twice"),
        (("layers", 1, "target"), "nowhere", r"'nowhere' does not exist"),
        (("report",), [], "'report' must be an object"),
        (("report", "config"), [], r"the report: 'config' must be an object"),
        (("report", "seconds"), "fast", "report"),
        (("report", "schema_version"), 99, "report"),
        (("report", "layers", 0, "rank"), "eight", r"report.*'rank'"),
        (("report", "layers", 0, "kernel"), 3, r"report.*'kernel'"),
        (("report", "layers", 0, "macs_before"), None, r"report.*'macs_before'"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_a_load_error(
    lowrank_save, tmp_path, monkeypatch, path, value, message
) -> None:
    folder = edit_plan(copy_of(lowrank_save, tmp_path), lambda d: set_at(d, path, value))
    rebuilds = spy_on_rebuilds(monkeypatch)
    with pytest.raises(ff.LoadError, match=message) as caught:
        ff.load(folder, Net())
    assert "plan.json" in str(caught.value)
    assert rebuilds == []  # found before any layer was built


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe{\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": "fxfactorize", "format_version": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b"[]", "not written by fxfactorize"),
        (b'"fxfactorize"', "not written by fxfactorize"),
    ],
)
def test_plan_bytes_that_are_not_a_plan_are_a_load_error(
    lowrank_save, tmp_path, text, message
) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    (folder / "plan.json").write_bytes(text)
    with pytest.raises(ff.LoadError, match=message):
        ff.load(folder, Net())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"format_version": 1', '"format_version": 1e999', "format_version inf"),
        ('"format_version": 1', '"format_version": NaN', "format_version nan"),
        ('"format_version": 1', '"format_version": Infinity', "format_version inf"),
        ('"spec": {"rank": 8', '"spec": {"rank": 1e999', rf"{RANK} inf"),
        ('"spec": {"rank": 8', '"spec": {"rank": NaN', rf"{RANK} nan"),
        ('"spec": {"rank": 8', '"spec": {"rank": -Infinity', rf"{RANK} -inf"),
    ],
)
def test_non_finite_numbers_are_a_load_error(lowrank_save, tmp_path, old, new, message) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    path = folder / "plan.json"
    text = json.dumps(json.loads(path.read_text()))  # one line: each key once per layer
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(ff.LoadError, match=message):
        ff.load(folder, Net())


def test_a_kind_other_than_the_rebuilt_one_is_a_load_error(lowrank_save, tmp_path) -> None:
    folder = edit_plan(
        copy_of(lowrank_save, tmp_path),
        lambda d: set_at(d, ("layers", 0, "kind"), "FactorizedLinear"),
    )
    with pytest.raises(ff.LoadError, match=r"'conv' is a FactorizedLinear .*FactorizedConv2d"):
        ff.load(folder, Net())


def test_plan_json_that_is_a_directory_is_a_load_error(lowrank_save, tmp_path) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    (folder / "plan.json").unlink()
    (folder / "plan.json").mkdir()
    with pytest.raises(ff.LoadError, match="cannot read"):
        ff.load(folder, Net())


def test_an_infinite_nmse_in_the_report_still_loads(lowrank_save, tmp_path) -> None:
    """save writes an infinite nmse (zero-variance output) as JSON ``Infinity``: it must load."""
    folder = edit_plan(
        copy_of(lowrank_save, tmp_path),
        lambda d: set_at(d, ("report", "layers", 0, "nmse"), float("inf")),
    )
    loaded = ff.load(folder, Net())
    assert loaded.meta["fxfactorize"].layers[0].nmse == float("inf")


# -- tensorized specs: bounded before anything is allocated ---------------------------------------


BLOCKTT = {"method": "blocktt", "factorization": "blocktt"}  # the same (4, 4, 4) modes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({**BLOCKTT, "rank": [1, 1500, 1500, 1]}, r"36,\d+,\d+ parameters.*more than"),
        ({**BLOCKTT, "rank": [1, 10**6, 10**6, 1]}, r"parameters.*more than"),
        ({"rank": [1, 4, 1500, 1500, 1500, 4, 1]}, r"parameters.*more than"),
        ({"rank": [1, 4, 0, 14, 14, 4, 1]}, r"rank must contain ints >= 1; got 0"),
        ({"rank": [1, 4, 4.5, 14, 14, 4, 1]}, r"rank must contain ints >= 1; got 4\.5"),
        ({"rank": [1, 4, True, 14, 14, 4, 1]}, r"rank must contain ints >= 1; got True"),
        ({"rank": [1, 4, 1]}, r"rank for 'tt' must have 7 entries"),
        ({"rank": 16}, r"'rank' must be a list"),
        ({"in_tensorized_features": [4, 4, 8]}, "product 128"),
        ({"in_tensorized_features": "444"}, r"'in_tensorized_features' must be a list"),
        ({"out_tensorized_features": [8, 8]}, r"rank for 'tt' must have 6 entries"),
        ({**BLOCKTT, "out_tensorized_features": [8, 8]}, r"same number of modes"),
        ({"factorization": "ttm"}, r"factorization must be one of"),
        ({"factorization": "cp"}, r"'cp'.*'tt'"),
        ({"bias": 1}, r"'bias' must be true or false"),
        ({"in_tensorized_features": [1] * 40 + [64]}, r"41 entries; at most 32"),
    ],
)
def test_a_tensorized_spec_is_checked_before_the_layer_is_built(
    tt_save, tmp_path, monkeypatch, changes, message
) -> None:
    def edit(document: dict[str, Any]) -> None:
        entry = document["layers"][0]
        if "method" in changes:
            entry["method"] = changes["method"]
        entry["spec"].update({k: v for k, v in changes.items() if k != "method"})

    folder = edit_plan(copy_of(tt_save, tmp_path), edit)
    rebuilds = spy_on_rebuilds(monkeypatch)
    with pytest.raises(ff.LoadError, match=message) as caught:
        ff.load(folder, mlp())
    assert "'0'" in str(caught.value)  # the layer's target
    assert rebuilds == []  # e.g. the rank-1500 blockTT layer (144 MB) was never allocated


def test_a_tensorized_spec_must_match_the_saved_tensors(tt_save, tmp_path) -> None:
    def smaller(document: dict[str, Any]) -> None:
        document["layers"][0]["spec"]["rank"][1] -= 1

    folder = edit_plan(copy_of(tt_save, tmp_path), smaller)
    with pytest.raises(ff.LoadError, match=r"'0'.*0\.factors\.0"):
        ff.load(folder, mlp())


def test_a_grouped_conv_rank_must_split_evenly_across_groups(tmp_path, monkeypatch) -> None:
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=4))
    gm = ff.transform(model, torch.randn(2, 32, 6, 6), latent_channels=8, **SMALL)
    assert gm.meta["fxfactorize"].factorized[0].rank == 8
    folder = edit_plan(ff.save(gm, tmp_path), lambda d: set_at(d, ("layers", 0, "spec", "rank"), 6))
    rebuilds = spy_on_rebuilds(monkeypatch)
    with pytest.raises(ff.LoadError, match=r"'0'.*multiple of groups=4; got 6"):
        ff.load(folder, model)
    assert rebuilds == []


def test_a_tensorized_method_on_a_conv_is_a_load_error(lowrank_save, tmp_path) -> None:
    folder = edit_plan(
        copy_of(lowrank_save, tmp_path), lambda d: set_at(d, ("layers", 0, "method"), "tt")
    )
    with pytest.raises(ff.LoadError, match=r"'conv'.*handles Linear layers only"):
        ff.load(folder, Net())


# -- weights.pt -----------------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "weights.pt not found"),
        (lambda p: p.write_bytes(b""), "cannot read"),
        (_truncated, "cannot read"),
        (lambda p: p.write_bytes(b"\x80\x04garbage" * 50), "cannot read"),
        (lambda p: (p.unlink(), p.mkdir()), "cannot read"),
        (lambda p: torch.save([torch.zeros(2)], p), "not a state dict"),
        (lambda p: torch.save(torch.zeros(2), p), "not a state dict"),
        (lambda p: torch.save({"head.module1.bias": NotATensor()}, p), "cannot read"),
        (lambda p: torch.save({**torch.load(p), 1: torch.zeros(2)}, p), "key 1 .*not a string"),
        (lambda p: torch.save({**torch.load(p), "conv.module1.bias": 3}, p), "conv.module1.bias"),
        (
            lambda p: torch.save(
                {**torch.load(p), "head.module1.bias": torch.zeros(40).to_sparse()}, p
            ),
            r"head\.module1\.bias .*layout",
        ),
    ],
)
def test_damaged_weights_are_a_load_error_naming_the_file(
    lowrank_save, tmp_path, damage, message
) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    damage(folder / "weights.pt")
    with pytest.raises(ff.LoadError, match=message) as caught:
        ff.load(folder, Net())
    assert "weights.pt" in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_weights_of_another_dtype_are_a_load_error(lowrank_save, tmp_path, dtype) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    state = torch.load(folder / "weights.pt")
    state["head.module0.weight"] = state["head.module0.weight"].to(dtype)
    torch.save(state, folder / "weights.pt")
    with pytest.raises(ff.LoadError, match=rf"head\.module0\.weight \(saved {dtype}"):
        ff.load(folder, Net())


def test_weights_with_a_shape_the_plan_does_not_give_are_found_before_rebuilding(
    lowrank_save, tmp_path, monkeypatch
) -> None:
    folder = copy_of(lowrank_save, tmp_path)
    state = torch.load(folder / "weights.pt")
    state["conv.module0.weight"] = torch.zeros(500, 32, 3, 3)
    torch.save(state, folder / "weights.pt")
    rebuilds = spy_on_rebuilds(monkeypatch)
    with pytest.raises(ff.LoadError, match=r"'conv'.*conv\.module0\.weight.*\(500, 32, 3, 3\)"):
        ff.load(folder, Net())
    assert rebuilds == []


def test_valid_saves_still_load_bit_identically(lowrank_save, tt_save) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 32, 4, 4)
    state = torch.load(lowrank_save / "weights.pt")
    loaded = ff.load(lowrank_save, Net())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert loaded(x).shape == (2, 40)
    loaded = ff.load(tt_save, mlp())
    state = torch.load(tt_save / "weights.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# -- fuzz: a mutated plan loads or is a LoadError, never another exception ------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into ``value`` (dict keys and list indices)."""
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    out = []
    for key, child in children:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


@st.composite
def mutated_plans(draw: st.DrawFn, text: str) -> bytes:
    document = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["delete", "replace", "nudge"]))
        if action == "delete":
            delete_at(document, path)
        elif action == "replace":
            set_at(document, path, draw(JSON_VALUES))
        else:  # a nearby value of the same kind: the mutations most likely to slip through
            *parents, last = path
            holder = document
            for key in parents:
                holder = holder[key]
            old = holder[last]
            if isinstance(old, bool) or not isinstance(old, int):
                set_at(document, path, draw(JSON_VALUES))
            else:
                set_at(document, path, old + draw(st.integers(-3, 3)))
    data = json.dumps(document).encode()
    if draw(st.booleans()):  # then some raw byte damage
        position = draw(st.integers(0, len(data)))
        data = data[:position] + draw(st.binary(max_size=4)) + data[position + 1 :]
    return data


@pytest.mark.parametrize("which", ["lowrank", "tt"])
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_plan_loads_or_is_a_load_error(
    lowrank_save, tt_save, tmp_path, which, data
) -> None:
    save, model = (lowrank_save, Net) if which == "lowrank" else (tt_save, mlp)
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(save, folder)
    (folder / "plan.json").write_bytes(data.draw(mutated_plans((save / "plan.json").read_text())))
    with contextlib.suppress(ff.LoadError):  # any other exception fails the test
        ff.load(folder, model())


def test_read_saved_is_checked_too(lowrank_save, tmp_path) -> None:
    folder = edit_plan(
        copy_of(lowrank_save, tmp_path), lambda d: set_at(d, ("layers", 0, "spec"), None)
    )
    with pytest.raises(ff.LoadError, match=r"'conv'.*'spec' must be an object"):
        read_saved(folder)
