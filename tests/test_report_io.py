"""Report/Plan serialisation: the JSON schema, Markdown/HTML rendering and plotting."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.report import SCHEMA_VERSION, LayerRecord, Plan, Report

RECORD_KEYS = {
    "node", "target", "op", "in_features", "out_features", "kernel", "groups", "macs_before",
    "params_before", "rank", "macs_after", "params_after", "reason", "nmse", "nmse_source", "method",
}  # fmt: skip


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return ff.transform(model, torch.randn(4, 512), progress=False).meta["fxfactorize"]


def test_report_dict_follows_the_documented_schema(report: Report) -> None:
    data = json.loads(report.to_json())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["kind"] == "report"
    assert set(data["totals"]) == {"macs_before", "macs_after", "params_before", "params_after"}
    assert data["totals"]["macs_after"] < data["totals"]["macs_before"]
    assert data["config"]["latent_features"] == 128 and data["config"]["method"] == "lowrank"
    assert isinstance(data["seconds"], float)
    assert [layer["target"] for layer in data["layers"]] == ["0", "2"]
    assert set(data["layers"][0]) >= RECORD_KEYS
    first, second = data["layers"]
    assert first["rank"] == 128 and first["nmse_source"] == "weights" and 0 < first["nmse"] < 1
    assert second["rank"] is None and "min_features" in second["reason"]
    assert first["kernel"] == []


def test_report_round_trips_through_json(report: Report) -> None:
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.layers == report.layers
    assert again.config == report.config
    assert again.seconds == pytest.approx(report.seconds)
    assert str(again) == str(report)


def test_plan_round_trips_and_says_it_is_a_plan() -> None:
    the_plan = ff.plan(nn.Sequential(nn.Conv2d(256, 256, 3)), torch.randn(1, 256, 6, 6))
    data = the_plan.to_dict()
    assert data["kind"] == "plan" and "seconds" not in data
    assert data["layers"][0]["kernel"] == [3, 3]
    again = Plan.from_dict(data)
    assert again.layers == the_plan.layers and again.layers[0].kernel == (3, 3)


def test_from_dict_refuses_a_newer_schema_and_ignores_unknown_keys(report: Report) -> None:
    data = report.to_dict()
    data["layers"][0]["added_in_a_later_version"] = 1
    assert Report.from_dict(data).layers == report.layers
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema_version 2 is not readable"):
        Report.from_dict(data)
    with pytest.raises(ValueError, match="'layers' list"):
        Report.from_dict({"schema_version": 1})


def test_layer_record_round_trip() -> None:
    record = LayerRecord("c", "c", "Conv2d", 8, 16, (3, 3), 1, 100, 10, rank=2, nmse=0.5)
    assert LayerRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_markdown_and_html_show_every_layer(report: Report) -> None:
    markdown = report.to_markdown()
    lines = markdown.splitlines()
    assert lines[0].startswith("| node") and lines[1].startswith("|---")
    assert sum(line.startswith("| ") for line in lines) == 1 + 2 + 1  # header, 2 layers, total
    assert report.summary() in markdown
    page = report._repr_html_()
    assert page.count("<tr>") == 1 + 2 + 1 and "fxfactorize report" in page


def test_plot_has_macs_params_and_nmse_panels(report: Report) -> None:
    import matplotlib.pyplot as plt

    figure = report.plot()
    try:
        labels = [ax.get_ylabel() for ax in figure.axes]
        assert labels == ["MACs", "parameters", "nmse"]
        assert len(figure.axes[0].patches) == 2  # one factorized layer: before and after bars
    finally:
        plt.close(figure)


def test_plot_without_matplotlib_names_the_extra(
    report: Report, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"fxfactorize\[plot\]"):
        report.plot()
