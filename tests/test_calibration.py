"""Streaming calibration: moments as sums, data-aware transform, errors naming batch and node."""

import pytest
import torch
from torch import fx, nn

import fxfactorize as ff
from fxfactorize.core.composer_api import moments_of_conv_input
from fxfactorize.passes.calibrate import calibrate


def correlated(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, d, generator=gen)  # inputs near a 12-dimensional subspace
    return torch.randn(n, 12, generator=gen) @ basis + 0.01 * torch.randn(n, d, generator=gen) + 0.3


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 64)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x)) * scale)


def test_moments_are_sums_independent_of_batching():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect", groups=2)
    gm = fx.symbolic_trace(nn.Sequential(conv, nn.ReLU()))
    x = torch.randn(6, 6, 9, 9)
    split = calibrate(gm, ["0"], [x[:2], x[2:]], progress=False)["0"]
    whole = calibrate(gm, ["0"], [x], progress=False)["0"]
    direct = moments_of_conv_input(x, 3, groups=2, stride=2, padding=1, padding_mode="reflect")
    assert split.count == whole.count == direct.count == 6 * 5 * 5
    assert torch.allclose(split.xtx, direct.xtx, rtol=1e-5, atol=1e-4)
    assert torch.allclose(whole.xsum, direct.xsum, rtol=1e-5, atol=1e-4)


def test_calibrated_transform_beats_data_free_on_the_data_and_reports_exact_nmse():
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    batches = [correlated(128, 256, seed=s) for s in range(3)]
    free = ff.transform(model, batches[0], latent_features=16, progress=False)
    aware = ff.transform(model, batches[0], calibration=batches, latent_features=16, progress=False)
    record = aware.meta["fxfactorize"].layers[0]
    assert record.nmse_source == "calibration"
    x = torch.cat(batches)
    y = model[0](x).detach()
    y_hat = aware.get_submodule("0")(x).detach()
    measured = float(((y - y_hat) ** 2).mean() / y.var())
    assert record.nmse == pytest.approx(measured, rel=1e-3)
    y_free = free.get_submodule("0")(x).detach()
    assert float((y - y_hat).pow(2).mean()) < 0.5 * float((y - y_free).pow(2).mean())


def test_batches_may_be_tuples_or_dicts():
    model = TwoInputs()
    x, s = correlated(32, 256), torch.tensor(2.0)
    by_tuple = ff.transform(
        model, (x, s), calibration=[(x, s)], latent_features=8, min_features=64, progress=False
    )
    by_dict = ff.transform(
        model,
        (x, s),
        calibration=[{"x": x, "scale": s}],
        latent_features=8,
        min_features=64,
        progress=False,
    )
    assert torch.allclose(by_tuple(x, s), by_dict(x, s))


def test_a_batch_that_does_not_fit_names_its_index():
    model = nn.Sequential(nn.Linear(256, 256))
    good = torch.randn(4, 256)
    with pytest.raises(ff.CalibrationError, match="batch 1") as info:
        ff.transform(model, good, calibration=[good, torch.randn(4, 100)], progress=False)
    assert info.value.batch_index == 1


def test_nan_in_calibration_names_the_node():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    bad = torch.randn(4, 256)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="batch 0 .*node '_0'"):
        ff.transform(
            model, torch.randn(4, 256), calibration=[bad], latent_features=32, progress=False
        )


def test_calibrated_conv_with_stride_keeps_dtype_and_device():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1)).to(torch.bfloat16)
    x = torch.randn(2, 64, 6, 6, dtype=torch.bfloat16)
    gm = ff.transform(
        model, x, calibration=[x], min_channels=64, cost_model="macs", progress=False
    )  # a 9-position conv is launch-bound: only the MAC rule factorizes it
    factorized = gm.get_submodule("0")
    assert factorized.module0.weight.dtype == torch.bfloat16
    assert gm(x).shape == model(x).shape
    assert gm.meta["fxfactorize"].layers[0].nmse < 1


def test_optimizer_follows_the_transformed_model():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1
    )
    gm = ff.transform(
        model, torch.randn(4, 256), optimizers=optimizer, latent_features=32, progress=False
    )
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in gm.parameters()}
    assert all(
        p is q
        for p, q in zip(
            optimizer.param_groups[1]["params"], gm.get_submodule("2").parameters(), strict=True
        )
    )
    gm(torch.randn(4, 256)).sum().backward()
    before = gm.get_submodule("0").module0.weight.clone()
    optimizer.step()
    assert not torch.equal(before, gm.get_submodule("0").module0.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibrated_transform_stays_on_the_gpu_in_half_precision():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).cuda().half()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    gm = ff.transform(model, x, calibration=[x, x], latent_features=32, progress=False)
    weight = gm.get_submodule("0").module0.weight
    assert weight.device.type == "cuda" and weight.dtype == torch.half
    assert gm.meta["fxfactorize"].layers[0].nmse_source == "calibration"


class _QueryKeyValue(nn.Module):
    """Three projections of one input (attention's query, key and value) and one of another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return (
            self.q(x)
            + self.k(x)
            + torch.cat([self.v(x), self.v(x)], -1).relu()
            + self.out(x.relu())
        )


def test_layers_fed_the_same_value_are_summed_once_and_get_their_own_copies(monkeypatch):
    import fxfactorize.passes.calibrate as calibrate_module

    gm = fx.symbolic_trace(_QueryKeyValue())
    batches = [torch.randn(6, 8), torch.randn(5, 8)]
    summed = []
    real = calibrate_module.accumulate_rows
    monkeypatch.setattr(
        calibrate_module, "accumulate_rows", lambda m, rows: (summed.append(1), real(m, rows))
    )
    collector = calibrate_module.MomentCollector(gm, ["q", "k", "v", "out"])
    for batch in batches:
        collector.run(batch)
    folds = collector.folds
    # q and k share one summation; v is called twice (not merged); out sees another value
    assert len(summed) == 3 * 2 * len(batches) + 2 * len(batches)
    assert set(folds) == {"q", "k", "v", "out"}
    for one, other in zip(folds["q"], folds["k"], strict=True):
        assert one is not other and torch.equal(one.xtx, other.xtx) and one.count == other.count
    assert collector.calls["k"] == collector.calls["q"] == 2
    assert folds["v"][0].count + folds["v"][1].count == 2 * 11
    direct = calibrate(
        fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8))), ["0"], batches, progress=False
    )
    assert torch.allclose(collector.moments["k"].xtx, direct["0"].xtx)
