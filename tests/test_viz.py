"""fxfactorize.viz: the changed-region listing and its drawing (matplotlib fallback)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize import viz
from fxfactorize.passes.trace import trace


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 8, 1), nn.Flatten())
    gm = ff.transform(model, torch.randn(1, 64, 5, 5), progress=False, min_channels=32)
    return model, gm


def test_changed_nodes_are_the_factorized_ones(models) -> None:
    _, gm = models
    assert viz.changed_nodes(gm) == ["_0"]


def test_region_table_compares_before_and_after(models) -> None:
    model, gm = models
    before = viz.region_table(trace(model), ["_0"], context=1).splitlines()
    after = viz.region_table(gm, ["_0"], context=1).splitlines()
    assert [line.split()[1] for line in after[2:]] == ["input_1", "_0", "_1"]
    assert before[3].split()[-1] == "Conv2d"
    assert after[3].split()[-1] == "FactorizedConv2d(rank=16)"


def test_region_of_unknown_nodes_is_an_error(models) -> None:
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the graph"):
        viz.region_nodes(models[1], ["nope"])


def test_matplotlib_drawing_highlights_changed_nodes(models) -> None:
    import matplotlib.pyplot as plt

    figure = viz.draw_region(models[1], context=2, backend="matplotlib")
    try:
        texts = [t for t in figure.axes[0].texts if t.get_text()]  # arrows are empty texts
        highlighted = [t.get_text() for t in texts if t.get_bbox_patch().get_facecolor()[2] < 0.8]
        assert highlighted == ["_0  FactorizedConv2d(rank=16)"]
        assert len(texts) == 4  # input, _0, _1, _2
    finally:
        plt.close(figure)


def test_draw_region_rejects_unknown_backends(models) -> None:
    with pytest.raises(ValueError, match="backend must be"):
        viz.draw_region(models[1], backend="svg")
