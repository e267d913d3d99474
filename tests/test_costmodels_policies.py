"""Cost models and rank policies (issue 5). Decisions never depend on timing: timers are faked."""

import json

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.costmodels import DeviceProfile, MeasuredCostModel, roofline, set_device_profile
from fxfactorize.policies import BudgetItem, allocate_budget, error_curve, rank_for_tolerance


def _mlp(width=64, depth=3, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def _spectral_mlp(seed=0):
    """Two 64→64 layers with decaying (different) spectra, so ranks matter."""
    torch.manual_seed(seed)
    model = _mlp(depth=2, seed=seed)
    for index, decay in ((0, 0.8), (2, 0.9)):
        u, _ = torch.linalg.qr(torch.randn(64, 64))
        v, _ = torch.linalg.qr(torch.randn(64, 64))
        s = decay ** torch.arange(64.0)
        model[index].weight.data = u @ torch.diag(s) @ v.T
    return model


OPTS = {"min_features": 16, "progress": False}


class StubCostModel:
    """Cost = rank (original = 1000); pays only for ranks listed in ``paying``."""

    name, unit, margin = "stub", "units", 0.0

    def __init__(self, paying=None, free_multiple=None):
        self.paying, self.free_multiple = paying, free_multiple

    def cost(self, site, rank):
        if rank is None:
            return 1000.0
        if self.free_multiple and rank % self.free_multiple == 0:
            return float(rank - self.free_multiple)  # a hardware-friendly rank is cheaper
        return float(rank)

    def pays(self, site, rank):
        return self.paying is None or rank in self.paying


def test_macs_model_keeps_composers_rule_and_latency_model_skips_launch_bound_layers():
    x = torch.randn(2, 64)
    macs = ff.plan(_mlp(), x, cost_model="macs", latent_features=16, **OPTS)
    assert all(record.rank == 16 for record in macs.layers)
    set_device_profile(DeviceProfile(5e10, 1e10, launch_s=1e-3))  # launch dominates: 2 calls lose
    latency = ff.plan(_mlp(), x, latent_features=16, **OPTS)
    assert not latency.factorized
    assert all("latency cost model" in record.reason for record in latency.layers)


def test_latency_model_factorizes_compute_bound_layers():
    set_device_profile(DeviceProfile(5e10, 1e10, launch_s=1e-7))
    model = nn.Sequential(nn.Linear(1024, 1024))
    p = ff.plan(model, torch.randn(256, 1024), latent_features=128, progress=False)
    assert [record.rank for record in p.layers] == [128]


def test_a_cost_model_instance_decides():
    p = ff.plan(
        _mlp(),
        torch.randn(2, 64),
        cost_model=StubCostModel(paying=set()),
        latent_features=16,
        **OPTS,
    )
    assert not p.factorized and "stub cost model" in p.layers[0].reason


def test_measured_model_times_both_candidates_with_an_injected_timer():
    seen = []

    def fake_timer(call):
        seen.append(call.rank)
        return 1.0 if call.rank is None else 0.2

    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = MeasuredCostModel(timer=fake_timer)
    p = ff.plan(model, torch.randn(2, 64), cost_model=measured, latent_features=16, **OPTS)
    assert [record.rank for record in p.layers] == [16, 16, 16]
    assert None in seen and 16 in seen
    slow = MeasuredCostModel(timer=lambda call: 1.0 if call.rank is None else 2.0)
    assert not ff.plan(model, torch.randn(2, 64), cost_model=slow, **OPTS).factorized
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_error_curve_and_tolerance_rank_match_the_solved_nmse():
    model = _spectral_mlp()
    curve = error_curve(model[0].weight.detach().unsqueeze(0))
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    assert torch.all(curve[1:] <= curve[:-1])
    rank = rank_for_tolerance(curve, 0.01)
    assert curve[rank] <= 0.01 < curve[rank - 1]
    gm = ff.transform(model, torch.randn(2, 64), tolerance=0.01, cost_model="macs", **OPTS)
    records = {r.target: r for r in gm.meta["fxfactorize"].layers}
    assert records["0"].rank == rank
    assert records["0"].nmse <= 0.01
    assert records["2"].rank > records["0"].rank  # slower spectral decay needs a higher rank


def test_budget_meets_the_mac_budget_and_tighter_budgets_cost_more_error():
    model, x = _spectral_mlp(), torch.randn(2, 64)
    errors = []
    for budget in (0.75, 0.5, 0.25):
        gm = ff.transform(model, x, budget=budget, cost_model="macs", **OPTS)
        report = gm.meta["fxfactorize"]
        totals = report.totals()
        assert totals["macs_after"] <= budget * totals["macs_before"]
        errors.append(sum(r.nmse for r in report.layers if r.factorized))
    assert errors[0] < errors[1] < errors[2]


def test_allocate_budget_spends_on_the_largest_error_reduction_per_cost():
    items = [
        BudgetItem("steep", [1, 2, 3], [0.5, 0.1, 0.05], [1.0, 2.0, 3.0], 10.0),
        BudgetItem("flat", [1, 2, 3], [0.3, 0.25, 0.2], [1.0, 2.0, 3.0], 10.0),
    ]
    assert allocate_budget(items, 3.0) == {"steep": 2, "flat": 1}
    assert allocate_budget(items, 100.0) == {"steep": None, "flat": None}  # originals fit
    assert allocate_budget(items, 0.5) == {"steep": 1, "flat": 1}  # infeasible: smallest ranks


def test_rank_multiple_rounds_up_only_when_the_cost_model_says_it_is_free():
    x = torch.randn(2, 64)
    free = ff.plan(
        _mlp(),
        x,
        cost_model=StubCostModel(free_multiple=8),
        latent_features=13,
        rank_multiple=8,
        **OPTS,
    )
    assert {record.rank for record in free.layers} == {16}
    costly = ff.plan(
        _mlp(), x, cost_model=StubCostModel(), latent_features=13, rank_multiple=8, **OPTS
    )
    assert {record.rank for record in costly.layers} == {13}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("cost_model", "flops", "cost_model must be one of"),
        ("tolerance", 1.5, "tolerance must be None or a float in (0, 1)"),
        ("budget", 0.0, "budget must be None or a float in (0, 1]"),
        ("rank_multiple", 0, "rank_multiple must be an int >= 1"),
    ],
)
def test_config_errors_name_the_argument(option, value, message):
    with pytest.raises(
        ValueError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        ff.FactorizeConfig(**{option: value})
    with pytest.raises(ValueError, match="at most one of tolerance and budget"):
        ff.FactorizeConfig(tolerance=0.1, budget=0.5)


def test_device_profile_is_measured_once_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFACTORIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(roofline.PROFILE_ENV)
    calls = []
    monkeypatch.setattr(
        roofline, "_measure", lambda device, dtype: calls.append(1) or DeviceProfile(1.0, 2.0, 3.0)
    )
    monkeypatch.setattr(roofline, "_MEASURED", {})
    set_device_profile(None)  # unpin the test profile
    assert roofline.device_profile().bytes_per_s == 2.0
    stored = json.loads((tmp_path / "device_profiles.json").read_text())
    assert list(stored.values()) == [{"flops_per_s": 1.0, "bytes_per_s": 2.0, "launch_s": 3.0}]
    monkeypatch.setattr(roofline, "_MEASURED", {})  # a new process reads the file
    assert roofline.device_profile().launch_s == 3.0
    assert calls == [1]


def test_calibrated_budget_predicts_errors_from_the_statistics():
    model, x = _spectral_mlp(), torch.randn(2, 64)
    torch.manual_seed(1)
    mixing = torch.randn(64, 4)  # inputs on a 4-dim subspace: rank 4 is exact on this data
    batches = [torch.randn(32, 4) @ mixing.T for _ in range(4)]
    gm = ff.transform(model, x, budget=0.5, calibration=batches, cost_model="macs", **OPTS)
    report = gm.meta["fxfactorize"]
    assert report.totals()["macs_after"] <= 0.5 * report.totals()["macs_before"]
    first = next(r for r in report.layers if r.target == "0")
    assert first.nmse_source == "calibration" and first.nmse < 1e-6


def test_a_report_with_a_cost_model_instance_serialises_its_name():
    measured = MeasuredCostModel(timer=lambda call: 1.0 if call.rank is None else 0.1)
    gm = ff.transform(_mlp(), torch.randn(2, 64), cost_model=measured, latent_features=8, **OPTS)
    data = json.loads(gm.meta["fxfactorize"].to_json())
    assert data["config"]["cost_model"] == "measured"
