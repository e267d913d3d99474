"""Solved pairs have balanced factors: each rank component has the same norm in module0 and module1,
so training after `transform` (healing, or the caller's own optimizer) is stable."""

import copy

import pytest
import torch
from torch import nn

import fxfactorize as ff

WIDTH = 256


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 16))


def _inputs(rows: int, seed: int) -> torch.Tensor:
    """Large, correlated inputs: their whitening makes an unbalanced split lopsided."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(99))
    return 3000.0 * torch.randn(rows, WIDTH, generator=gen) @ mixing / WIDTH**0.5


def _component_norms(pair: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = pair.module0.weight.detach(), pair.module1.weight.detach()
    return first.norm(dim=1), second.norm(dim=0)


@pytest.mark.parametrize("calibrated", [False, True])
def test_each_rank_component_has_equal_norms_on_both_sides(calibrated):
    model = _model()
    calibration = [_inputs(512, seed) for seed in range(2)] if calibrated else None
    gm = ff.transform(
        model, _inputs(4, 5), calibration=calibration, min_features=64, latent_features=100,
        cost_model="macs", progress=False,
    )  # fmt: skip
    rows, columns = _component_norms(gm.get_submodule("0"))
    torch.testing.assert_close(rows, columns, rtol=1e-4, atol=0.0)


def _error(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((student(x) - teacher(x)).pow(2).mean() / teacher(x).var())


def test_twenty_adam_steps_after_a_calibrated_transform_do_not_raise_held_out_error():
    teacher = _model().eval()
    batches = [_inputs(512, seed) for seed in range(2)]
    held_out = _inputs(512, 7)
    student = ff.transform(
        copy.deepcopy(teacher), _inputs(4, 5), calibration=batches, min_features=64,
        latent_features=100, cost_model="macs", progress=False,
    )  # fmt: skip
    before = _error(student, teacher, held_out)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    for step in range(20):
        x = batches[step % len(batches)]
        loss = (student(x) - teacher(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert _error(student, teacher, held_out) <= 1.1 * before
