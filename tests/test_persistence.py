"""ff.save / ff.load: bit-identical round trips, clear errors, and torch.export of the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.persistence import FORMAT_VERSION, read_saved


class SmallNet(nn.Module):
    """A conv block and a linear head, both large enough to be factorized with small ranks."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 80)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(self.conv(x)))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 64, 4, 4)


@pytest.fixture(scope="module")
def transformed(example: torch.Tensor):
    torch.manual_seed(1)
    model = SmallNet().eval()
    with torch.no_grad():  # non-trivial running statistics, so a lost buffer would show
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    # small widths keep the test fast; the MAC rule makes the plan independent of this CPU's timings
    small = {"min_channels": 32, "min_features": 32, "cost_model": "macs"}
    gm = ff.transform(
        model, example, progress=False, latent_channels=8, latent_features=16, **small
    )
    return model, gm


@pytest.fixture
def saved(transformed, tmp_path: Path) -> Path:
    return ff.save(transformed[1], tmp_path / "saved")


def test_round_trip_gives_bit_identical_outputs(transformed, saved, example) -> None:
    model, gm = transformed
    fresh = SmallNet()  # different random weights: only the architecture is used
    loaded = ff.load(saved, fresh)
    assert torch.equal(loaded(example), gm(example))
    assert type(loaded.get_submodule("conv")).__name__ == "FactorizedConv2d"
    assert loaded.get_submodule("conv").latent_channels == 8
    assert loaded.get_submodule("head").latent_features == 16
    assert not loaded.training
    assert loaded.meta["fxfactorize"].layers == gm.meta["fxfactorize"].layers
    assert type(fresh.conv) is nn.Conv2d  # the original model is left alone


def test_plan_file_names_layers_config_and_versions(saved) -> None:
    document = read_saved(saved)
    assert document["format_version"] == FORMAT_VERSION
    assert set(document["versions"]) == {"fxfactorize", "torch"}
    assert document["versions"]["torch"] == torch.__version__
    layers = {entry["target"]: entry for entry in document["layers"]}
    assert layers["conv"]["kind"] == "FactorizedConv2d" and layers["conv"]["method"] == "lowrank"
    assert layers["conv"]["spec"] == {"rank": 8, "bias": True}
    assert document["report"]["config"]["latent_channels"] == 8


def test_weights_file_loads_without_pickled_code(saved) -> None:
    state = torch.load(saved / "weights.pt", weights_only=True)
    assert "conv.module0.weight" in state and "norm.running_mean" in state


def test_load_rejects_a_model_of_another_width(saved) -> None:
    with pytest.raises(ff.LoadError, match="shape mismatch"):
        ff.load(saved, SmallNet(width=96))


def test_load_rejects_a_model_without_the_saved_layer(saved) -> None:
    other = nn.Sequential(nn.Linear(64, 80))
    with pytest.raises(ff.LoadError, match="saved layer 'conv' does not exist"):
        ff.load(saved, other)


def test_load_rejects_a_layer_of_another_kind(saved) -> None:
    model = SmallNet()
    model.conv = nn.Identity()
    with pytest.raises(ff.LoadError, match="has a Identity there"):
        ff.load(saved, model)


def test_load_rejects_a_newer_format(saved) -> None:
    path = saved / "plan.json"
    document = json.loads(path.read_text())
    document["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(document))
    with pytest.raises(ff.LoadError, match="format_version 2 .*upgrade fxfactorize"):
        ff.load(saved, SmallNet())


def test_load_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(ff.LoadError, match="not found"):
        ff.load(tmp_path, SmallNet())
    (tmp_path / "plan.json").write_text('{"format": "other"}')
    with pytest.raises(ff.LoadError, match="not written by fxfactorize"):
        ff.load(tmp_path, SmallNet())


def test_save_needs_a_graph_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        ff.save(SmallNet(), tmp_path)


def test_torch_export_of_a_transformed_model(transformed, example) -> None:
    _, gm = transformed
    exported = torch.export.export(gm, (example,))
    assert torch.allclose(exported.module()(example), gm(example), atol=1e-5)


def test_calibrated_model_round_trips(example, tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = SmallNet().eval()
    small = {"min_channels": 32, "min_features": 32, "latent_channels": 8, "latent_features": 16}
    small["cost_model"] = "macs"  # the plan must not depend on this CPU's timings
    gm = ff.transform(model, example, calibration=[example], progress=False, **small)
    assert gm.meta["fxfactorize"].factorized[0].nmse_source == "calibration"
    loaded = ff.load(ff.save(gm, tmp_path), SmallNet())
    assert torch.equal(loaded(example), gm(example))
    assert loaded.meta["fxfactorize"].factorized[0].nmse_source == "calibration"
