"""Keeping the model's function: error-propagating calibration, shrinkage toward data-free on
scarce data, and rank allocation by each layer's effect on the model's output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.core.lowrank import factorize_weight
from fxfactorize.core.moments import InputMoments, PairedMoments
from fxfactorize.core.shrinkage import SHRINKAGE_GRID, choose_shrinkage

CONFIG = dict(min_features=0, min_channels=0, cost_model="macs", progress=False)


def _rank_r_optimum(inputs: torch.Tensor, target: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-r ``M`` and any bias of ``‖target − inputs M − 1bᵀ‖``, by the textbook
    route (least squares, then the rank-r truncation of the fitted values), in float64.
    ``inputs`` may be rank-deficient (the output of a rank-r layer)."""
    x = inputs - inputs.mean(0)
    y = target - target.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    basis = u[:, s > s[0] * 1e-9]  # the column space of x (its numerical rank)
    fitted = basis @ (basis.T @ y)
    u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    return torch.linalg.pinv(x, rtol=1e-9) @ (u[:, :rank] * s[:rank]) @ vh[:rank]


def _effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (layer.module1.weight @ layer.module0.weight).detach().to(torch.float64)
    return weight, layer.module1.bias.detach().to(torch.float64)


def _distance_from_anchored_optimum(model: nn.Module, gm: nn.Module, x: torch.Tensor, rank: int):
    """Per layer of a Linear chain, how far the factorized layer's fit on the inputs it receives
    is from the best rank-r fit of the original layer's output on the original inputs."""
    distances = []
    original, compressed = x, x  # inputs of layer i in the original and in the factorized model
    for index in range(len(model)):
        target = original @ model[index].weight.detach().T + model[index].bias.detach()
        got, bias = _effective_weight(gm.get_submodule(str(index)))
        fit, best = compressed @ got.T, compressed @ _rank_r_optimum(compressed, target, rank)
        gap = fit - fit.mean(0) - best + best.mean(0)  # the ridge moves weak directions only
        distances.append(float(gap.norm() / best.norm()))
        residual = target - (fit + bias)  # the bias keeps the mean on the calibration data
        assert residual.mean(0).abs().max() < 1e-8 * target.abs().max()
        original, compressed = target, fit + bias
    return distances


def test_propagate_error_on_a_linear_chain_is_the_anchored_optimum_layer_by_layer():
    torch.manual_seed(0)
    dim, rank = 24, 4
    model = nn.Sequential(*(nn.Linear(dim, dim) for _ in range(3))).double()
    mix = torch.randn(dim, dim, dtype=torch.float64) + 4 * torch.eye(dim, dtype=torch.float64)
    batches = [torch.randn(64, dim, dtype=torch.float64) @ mix for _ in range(3)]
    distances = {}
    for propagate_error in (True, False):
        gm = ff.transform(
            model,
            batches[0],
            calibration=batches,
            latent_features=rank,
            propagate_error=propagate_error,
            shrinkage=0.0,
            **CONFIG,
        )
        assert [r.rank for r in ff.report_of(gm).factorized] == [rank] * 3
        distances[propagate_error] = _distance_from_anchored_optimum(
            model, gm, torch.cat(batches), rank
        )
    assert max(distances[True]) < 1e-5
    # the independent solve is that optimum for the first layer only (its inputs are exact)
    assert distances[False][0] < 1e-5 and min(distances[False][1:]) > 0.1


def test_reported_nmse_of_a_propagated_layer_is_its_error_against_the_original_layer():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).double()
    batches = [torch.randn(4, 3, 12, 12, dtype=torch.float64) for _ in range(2)]
    gm = ff.transform(
        model,
        batches[0],
        calibration=batches,
        latent_channels=2,
        propagate_error=True,
        shrinkage=0.0,
        **CONFIG,
    )
    records = {r.target: r for r in ff.report_of(gm).factorized}
    assert set(records) == {"0", "2", "4"}
    x = torch.cat(batches)
    with torch.no_grad():
        before, after = model[0](x), gm.get_submodule("0")(x)
        mid_before, mid_after = model[1](before), torch.relu(after)
        y, y_hat = model[2](mid_before), gm.get_submodule("2")(mid_after)
    nmse = float((y - y_hat).pow(2).mean() / y.var())
    assert records["2"].nmse == pytest.approx(nmse, rel=1e-6)


def _scarce_setup(seed: int):
    torch.manual_seed(seed)
    dim = 48
    mix = torch.randn(dim, dim) / dim**0.5
    mix[:, :6] *= 6  # a few strong directions: a covariance that scarce data gets wrong

    def data(rows: int) -> torch.Tensor:
        return torch.randn(rows, dim) @ mix.T + 0.2

    model = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
    return model, data


def _held_out_error(model: nn.Module, gm: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(inputs)
        return float((gm(inputs) - expected).pow(2).mean() / expected.var())


@pytest.mark.parametrize("kind", ["1 row", "all zero", "10 rows"])
@pytest.mark.parametrize("propagate_error", [False, True])
def test_shrinkage_is_never_worse_than_data_free_on_held_out_data(kind, propagate_error):
    for seed in range(3):
        model, data = _scarce_setup(seed)
        calibration = {
            "1 row": [data(1)],
            "all zero": [torch.zeros(8, 48)],
            "10 rows": [data(5), data(5)],
        }[kind]
        held_out = data(4000)
        options = dict(latent_features=6, **CONFIG)
        data_free = _held_out_error(model, ff.transform(model, held_out[:2], **options), held_out)
        with pytest.warns(ff.FactorizeWarning) if kind != "10 rows" else _no_check():
            gm = ff.transform(
                model,
                held_out[:2],
                calibration=calibration,
                shrinkage="auto",
                propagate_error=propagate_error,
                **options,
            )
        assert _held_out_error(model, gm, held_out) <= data_free * 1.001
        report = ff.report_of(gm)
        assert all(record.shrinkage is not None for record in report.factorized)
        if kind == "1 row":  # too few rows: a warning, and never a claimed nmse of 0
            assert all(record.nmse > 0 for record in report.factorized)
            assert any("could not be validated" in text for text in report.warnings)


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_without_shrinkage_one_row_claims_a_perfect_fit_that_does_not_hold():
    """The failure shrinkage exists for: the exact solve on one row reports nmse 0."""
    model, data = _scarce_setup(0)
    gm = ff.transform(
        model,
        data(2),
        calibration=[data(1)],
        latent_features=6,
        shrinkage=0.0,
        propagate_error=False,
        **CONFIG,
    )
    assert ff.report_of(gm).factorized[0].nmse == pytest.approx(0.0, abs=1e-9)


def test_choose_shrinkage_picks_data_free_for_pure_noise_and_none_for_plentiful_data():
    torch.manual_seed(3)
    weight = torch.randn(1, 20, 30, dtype=torch.float64)
    strong = torch.randn(30, 30, dtype=torch.float64)
    strong[:, 3:] *= 0.01  # inputs live near a 3-dimensional subspace

    def folds(rows: int) -> list[InputMoments]:
        parts = [InputMoments.zeros(30), InputMoments.zeros(30)]
        for part in parts:
            part.update(torch.randn(rows, 30, dtype=torch.float64) @ strong.T)
        return parts

    plentiful = choose_shrinkage(weight, None, 3, folds(5000))
    assert plentiful.alpha <= 0.01  # the data's structure is real: use it
    assert plentiful.errors[plentiful.alpha] < 0.5 * plentiful.errors[1.0]
    assert set(plentiful.errors) == set(SHRINKAGE_GRID)
    assert choose_shrinkage(weight, None, 3, folds(1)).alpha == 1.0  # nothing to validate on


def test_paired_moments_add_up_and_the_paired_solve_matches_independent_when_inputs_agree():
    torch.manual_seed(4)
    x = torch.randn(300, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64)
    paired, plain = PairedMoments.zeros(10), InputMoments.zeros(10)
    for chunk in x.split(100):
        part = PairedMoments.zeros(10)
        part.update(chunk, chunk)
        paired = paired + part
    plain.update(x)
    weight = torch.randn(1, 8, 10, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    a = factorize_weight(weight, bias, 3, paired)
    b = factorize_weight(weight, bias, 3, plain)
    assert torch.allclose(a.second @ a.first, b.second @ b.first, atol=1e-8)
    assert a.nmse == pytest.approx(b.nmse, rel=1e-8)


class _Branches(nn.Module):
    """Two layers with the same spectrum; the output keeps one at full scale and damps the other
    by 100 (as a normalisation or a small residual weight would)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.loud = nn.Linear(64, 64)
        self.quiet = nn.Linear(64, 64)
        with torch.no_grad():
            u, _, vh = torch.linalg.svd(torch.randn(64, 64))
            spectrum = torch.linspace(1.0, 0.05, 64)
            self.loud.weight.copy_(u * spectrum @ vh)
            u, _, vh = torch.linalg.svd(torch.randn(64, 64))
            self.quiet.weight.copy_(u * spectrum @ vh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def test_sensitivity_allocation_beats_per_layer_nmse_at_equal_macs():
    model = _Branches()
    torch.manual_seed(6)
    calibration = [torch.randn(128, 64) for _ in range(2)]
    held_out = torch.randn(2000, 64)
    errors, macs, ranks = {}, {}, {}
    for sensitivity in (False, True):
        gm = ff.transform(
            model,
            held_out[:2],
            calibration=calibration,
            budget=0.5,
            sensitivity=sensitivity,
            **CONFIG,
        )
        report = ff.report_of(gm)
        errors[sensitivity] = _held_out_error(model, gm, held_out)
        macs[sensitivity] = report.totals()["macs_after"]
        ranks[sensitivity] = {r.target: r.rank for r in report.layers}
    assert macs[True] <= macs[False] * 1.02
    assert ranks[True]["loud"] > ranks[False]["loud"]
    assert errors[True] < 0.5 * errors[False]


def test_propagate_error_works_through_partial_tracing_and_matches_the_whole_graph():
    class Untraceable(nn.Module):
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # data-dependent control flow: the root does not trace
                return self.body(x)
            return x

    torch.manual_seed(7)
    body = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)
    )
    batches = [torch.randn(40, 32) for _ in range(3)]
    options = dict(latent_features=4, propagate_error=True, shrinkage=0.0, **CONFIG)
    whole = ff.transform(body, batches[0], calibration=batches, **options)
    partial = ff.transform(Untraceable(body), batches[0], calibration=batches, **options)
    assert isinstance(ff.report_of(partial), ff.PartialReport)
    for name in ("0", "2", "4"):
        a = _effective_weight(whole.get_submodule(name))[0]
        b = _effective_weight(partial.get_submodule(f"body.{name}"))[0]
        assert torch.allclose(a, b, atol=1e-5)


def test_the_report_says_which_calibration_ran():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    batches = [torch.randn(40, 32) for _ in range(2)]
    for flag, words in ((True, "propagate_error"), (False, "independent")):
        gm = ff.transform(
            model,
            batches[0],
            calibration=batches,
            latent_features=4,
            propagate_error=flag,
            **CONFIG,
        )
        report = ff.report_of(gm)
        assert report.calibration == words
        assert words in str(report)
    assert (
        ff.report_of(ff.transform(model, batches[0], latent_features=4, **CONFIG)).calibration
        is None
    )


@pytest.mark.parametrize("propagate_error", [False, True])
@pytest.mark.parametrize("shrinkage", [0.0, 0.1, "auto"])
def test_equivalence_check_verifies_every_calibration_mode_and_catches_a_nudge(
    propagate_error, shrinkage
):
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 32),
    )
    batches = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    gm = ff.transform(
        model,
        batches[0],
        calibration=batches,
        latent_channels=4,
        latent_features=8,
        propagate_error=propagate_error,
        shrinkage=shrinkage,
        **CONFIG,
    )
    ff.check_equivalence(model, gm, batches[0], calibration=batches, max_examples=5)
    for name in ("2", "5"):
        nudged = copy.deepcopy(gm)
        with torch.no_grad():
            nudged.get_submodule(name).module1.weight.mul_(1.01)
        with pytest.raises(ff.EquivalenceError, match=f"layer '{name}' is not the optimum"):
            ff.check_equivalence(model, nudged, batches[0], calibration=batches, max_examples=5)


def test_transform_heal_shorthand_distils_on_the_calibration_batches():
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(128, 32) for _ in range(8)]
    held_out = torch.randn(1000, 32)
    options = dict(latent_features=3, shrinkage=0.0, **CONFIG)
    plain = ff.transform(model, batches[0], calibration=batches, **options)
    healed = ff.transform(
        model,
        batches[0],
        calibration=batches,
        heal={"steps": 100, "lr": 1e-3, "loss": "mse"},
        **options,
    )
    report = ff.report_of(healed)
    assert report.heal is not None and report.heal.steps == 100
    assert report.heal.local_steps == 0  # the closed-form solve already fits each layer alone
    assert "healed 100 steps" in report.summary()
    assert _held_out_error(model, healed, held_out) < 0.93 * _held_out_error(model, plain, held_out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # teacher kept
    with pytest.raises(ValueError, match="heal= needs calibration"):
        ff.transform(model, batches[0], heal=10, **options)
