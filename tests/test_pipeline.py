"""One pipeline: a model whose root traces and the same layers inside an untraceable root get the
same plan and the same weights, whatever the rank policy."""

import pytest
import torch
from torch import nn

import fxfactorize as ff

WIDTH = 96


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(2 * WIDTH, WIDTH))
    with (
        torch.no_grad()
    ):  # spectra that decay at different rates, so the policies tell layers apart
        for index, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            u, _, v = torch.linalg.svd(layer.weight, full_matrices=False)
            decay = torch.exp(-torch.arange(u.shape[1], dtype=torch.float32) / (6 + 10 * index))
            layer.weight.copy_(u @ torch.diag(decay) @ v)
    return model


class Gate(nn.Module):
    """The same layers behind a data-dependent branch: torch.fx cannot trace the root."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.sum() > -1e9:  # always true, but data-dependent
            return self.body(x)
        return x


OPTIONS = {"min_features": 32, "progress": False, "cost_model": "macs"}


@pytest.mark.parametrize("policy", [{"tolerance": 0.05}, {"budget": 0.5}])
def test_traced_root_and_untraceable_root_get_one_plan_and_the_same_weights(policy):
    torch.manual_seed(1)
    x = torch.randn(8, WIDTH)
    batches = [torch.randn(64, WIDTH) @ torch.randn(WIDTH, WIDTH) / 10 for _ in range(3)]
    whole = ff.transform(mlp(), x, calibration=batches, **OPTIONS, **policy)
    partial = ff.transform(Gate(mlp()), x, calibration=batches, **OPTIONS, **policy)
    assert isinstance(ff.report_of(partial), ff.PartialReport)
    whole_rows = [(r.target, r.rank, r.nmse_source) for r in ff.report_of(whole).layers]
    partial_rows = [(r.target, r.rank, r.nmse_source) for r in ff.report_of(partial).layers]
    assert [(f"body.{t}", rank, source) for t, rank, source in whole_rows] == partial_rows
    assert any(rank is not None for _, rank, _ in whole_rows)
    assert len({rank for _, rank, _ in whole_rows}) > 1  # the policy chose per layer
    assert all(source == "calibration" for _, rank, source in whole_rows if rank is not None)
    whole_state = whole.state_dict()
    partial_state = {k.removeprefix("body."): v for k, v in partial.state_dict().items()}
    assert whole_state.keys() == partial_state.keys()
    for key, value in whole_state.items():
        torch.testing.assert_close(partial_state[key], value, rtol=1e-5, atol=1e-6)
