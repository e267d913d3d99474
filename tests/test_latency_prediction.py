"""The whole model's predicted latency (issue 17 item 1): arithmetic on injected timings."""

import time

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.conftest import TEST_PROFILE
from fxfactorize.costmodels import (
    LatencyPrediction,
    MeasuredCostModel,
    ModelTiming,
    set_model_timer,
    time_model,
)
from fxfactorize.report import Plan, Report

X = torch.randn(4, 512)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))


def fixed_timer(whole: float, seconds: dict[str, float]):
    """A timer that reports ``whole`` for the model and ``seconds`` for the named layers."""
    calls = []

    def timer(run, layers):
        calls.append(sorted(layers))
        return ModelTiming(whole, {name: seconds.get(name, 0.0) for name in layers})

    timer.calls = calls
    return timer


def roofline_ratio(m: int, k: int, n: int, rank: int) -> float:
    """The pinned test profile's predicted seconds of a rank-``rank`` pair ÷ the layer's."""
    before = TEST_PROFILE.gemm_seconds(m, k, n, 4)
    after = TEST_PROFILE.gemm_seconds(m, k, rank, 4) + TEST_PROFILE.gemm_seconds(m, rank, n, 4)
    return after / before


def test_whole_model_prediction_keeps_the_untouched_part():
    timer = fixed_timer(10.0, {"0": 3.0, "2": 2.0, "3": 0.5})
    set_model_timer(timer)
    plan = ff.plan(mlp(), X)
    assert timer.calls == [["0", "2", "3"]]  # every Linear timed, once
    assert [r.rank for r in plan.layers] == [128, 128, None]
    ratio = roofline_ratio(4, 512, 512, 128)
    assert plan.layers[0].latency_ratio == pytest.approx(ratio, rel=1e-12)
    assert plan.layers[2].latency_ratio is None  # kept: its 0.5 s stays
    # 5 s outside the factorized layers (4.5 s of ReLU and the rest, the kept Linear's 0.5 s)
    assert plan.latency.predicted_s == pytest.approx(5.0 + 5.0 * ratio)
    assert plan.latency.ratio == pytest.approx((5.0 + 5.0 * ratio) / 10.0)
    assert plan.latency.layers_ratio == pytest.approx((0.5 + 5.0 * ratio) / 5.5)
    assert f"predicted latency {plan.latency.ratio:.3f}× of the whole model" in str(plan)


def test_a_model_of_one_layer_predicts_the_layer_ratio():
    set_model_timer(fixed_timer(2.0, {"0": 2.0}))
    plan = ff.plan(nn.Sequential(nn.Linear(512, 512)), X)
    assert plan.latency.ratio == pytest.approx(plan.layers[0].latency_ratio)
    assert plan.latency.ratio == pytest.approx(plan.latency.layers_ratio)


def test_pinned_profile_skips_timing_unless_asked():
    plan = ff.plan(mlp(), X)
    assert plan.latency is None and "predicted latency" not in str(plan)
    set_model_timer(fixed_timer(1.0, {}))
    assert ff.plan(mlp(), X, predict_latency=False).latency is None


def test_predict_latency_is_validated():
    with pytest.raises(ValueError, match="predict_latency must be None or a bool"):
        ff.FactorizeConfig(predict_latency="yes")


def test_macs_plans_are_unchanged_and_priced_by_the_roofline():
    plain = ff.plan(mlp(), X, cost_model="macs")
    set_model_timer(fixed_timer(10.0, {"0": 3.0, "2": 2.0}))
    timed = ff.plan(mlp(), X, cost_model="macs")
    assert [r.rank for r in timed.layers] == [r.rank for r in plain.layers]
    record = timed.layers[0]
    assert record.latency_ratio == pytest.approx(roofline_ratio(4, 512, 512, 128))
    assert record.latency_ratio != pytest.approx(record.macs_after / record.macs_before)


def test_measured_cost_model_uses_its_own_timings():
    layer_timer = lambda fn: 1.0 if fn.rank is None else 0.4  # noqa: E731
    set_model_timer(fixed_timer(10.0, {"0": 5.0}))
    plan = ff.plan(
        nn.Sequential(nn.Linear(512, 512)), X, cost_model=MeasuredCostModel(timer=layer_timer)
    )
    assert plan.layers[0].latency_ratio == pytest.approx(0.4)
    assert plan.latency.predicted_s == pytest.approx(5.0 + 5.0 * 0.4)


def test_transform_report_carries_the_prediction_through_json():
    set_model_timer(fixed_timer(10.0, {"0": 3.0, "2": 2.0}))
    gm = ff.transform(mlp(), X, progress=False)
    report = gm.meta["fxfactorize"]
    assert report.latency == ff.plan(mlp(), X).latency
    again = Report.from_dict(report.to_dict())
    assert again.latency == report.latency
    assert Plan.from_dict(ff.plan(mlp(), X).to_dict()).latency == report.latency


def test_a_small_predicted_gain_is_warned_and_a_large_one_is_not():
    set_model_timer(fixed_timer(100.0, {"0": 3.0, "2": 2.0}))  # 95 s outside the layers
    with pytest.warns(ff.FactorizeWarning, match=r"predicted latency 0\.9\d\d× the whole model"):
        gm = ff.transform(mlp(), X, progress=False)
    (warning,) = gm.meta["fxfactorize"].warnings
    assert ff.plan(mlp(), X).warnings == [warning]
    assert "regenerated graph" in warning
    set_model_timer(fixed_timer(10.0, {"0": 3.0, "2": 2.0}))  # the same layers, half the model
    assert ff.plan(mlp(), X).warnings == []
    set_model_timer(fixed_timer(100.0, {"0": 3.0, "2": 2.0}))
    assert ff.plan(mlp(), X, linears=False).warnings == []  # nothing factorized: nothing to say


def test_hook_overhead_never_makes_the_untouched_part_negative():
    timing = ModelTiming(1.0, {"a": 0.7, "b": 0.6})  # hooks made the layers look slower
    assert LatencyPrediction(1.0, 1.3, 0.65, 0.65).ratio == 0.65
    assert ff.costmodels.predict_latency(timing, {"a": 0.5, "b": 0.5}).predicted_s == pytest.approx(
        0.65
    )


def test_time_model_stops_at_three_repeats_once_the_runs_took_long_enough():
    calls = []

    def run(pause: float) -> None:
        calls.append(pause)
        time.sleep(pause)

    time_model(lambda: run(0.0), {}, repeats=5, warmup=1, enough_s=5.0)
    assert len(calls) == 1 + 2 * 5  # fast: every repeat
    calls.clear()
    time_model(lambda: run(0.05), {}, repeats=5, warmup=1, enough_s=0.2)
    assert len(calls) == 1 + 2 * 3  # 0.3 s after three repeats: the median of three


def test_time_model_times_the_layers_inside_the_call():
    big = nn.Linear(1024, 1024)
    model = nn.Sequential(big, nn.ReLU())
    x = torch.randn(64, 1024)
    timing = time_model(lambda: model(x), {"big": big, "unused": nn.Linear(2, 2)}, repeats=3)
    assert timing.layer_s["unused"] == 0.0
    assert timing.layer_s["big"] > 0.0
    assert timing.whole_s > 0.0
