"""`transform` and `plan` end to end: exactness, errors, no mutation, compile."""

import copy

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.errors import ShapePropagationError


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference - candidate).norm() / reference.norm())


def low_rank_linear(in_features, out_features, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(
            torch.randn(out_features, rank, generator=gen)
            @ torch.randn(rank, in_features, generator=gen)
            / rank**0.5
        )
    return layer


def low_rank_conv(in_channels, out_channels, kernel, rank, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, kernel, **kwargs)
    fan_in = in_channels * kernel * kernel
    with torch.no_grad():
        weight = torch.randn(out_channels, rank, generator=gen) @ torch.randn(
            rank, fan_in, generator=gen
        )
        conv.weight.copy_(weight.reshape_as(conv.weight) / fan_in**0.5)
    return conv


def test_exact_when_linear_weight_has_the_target_rank():
    model = nn.Sequential(
        low_rank_linear(512, 768, 32), nn.GELU(), low_rank_linear(768, 512, 32, seed=1)
    )
    x = torch.randn(16, 512)
    gm = ff.transform(model, x, latent_features=32, progress=False)
    assert [r.rank for r in gm.meta["fxfactorize"].layers] == [32, 32]
    with torch.no_grad():
        assert relative_error(model(x), gm(x)) < 1e-4
    assert all(r.nmse < 1e-10 for r in gm.meta["fxfactorize"].layers)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 1},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2, "padding_mode": "reflect"},
        {"padding": 0, "bias": False},
    ],
)
def test_exact_when_conv_weight_has_the_target_rank(kwargs):
    model = nn.Sequential(low_rank_conv(256, 256, 3, 24, **kwargs))
    x = torch.randn(2, 256, 9, 9)
    gm = ff.transform(model, x, latent_channels=24, progress=False)
    factorized = gm.get_submodule("0")
    assert isinstance(factorized, ff.FactorizedConv2d)
    assert factorized.module0.stride == model[0].stride
    assert factorized.module0.dilation == model[0].dilation
    assert factorized.module0.padding_mode == model[0].padding_mode
    assert factorized.module1.kernel_size == (1, 1)
    with torch.no_grad():
        assert relative_error(model(x), gm(x)) < 1e-4


def test_truncation_error_matches_the_reported_weight_estimate():
    layer = nn.Linear(512, 512)
    gm = ff.transform(nn.Sequential(layer), torch.randn(1, 512), latent_features=64, progress=False)
    record = gm.meta["fxfactorize"].layers[0]
    pair = gm.get_submodule("0")
    approx = pair.module1.weight @ pair.module0.weight
    with torch.no_grad():
        expected = float((layer.weight - approx).pow(2).sum() / layer.weight.pow(2).sum())
    assert record.nmse_source == "weights"
    assert record.nmse == pytest.approx(expected, rel=1e-4)
    assert 0 < record.nmse < 1


def test_original_model_is_bit_identical_after_transform():
    model = nn.Sequential(
        nn.Conv2d(256, 256, 3), nn.BatchNorm2d(256), nn.Flatten(), nn.LazyLinear(300)
    )
    x = torch.randn(2, 256, 5, 5)
    model(x)
    model.train()
    before = copy.deepcopy(model.state_dict())
    ff.transform(model, x, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model[0], nn.Conv2d) and model.training


def test_inplace_swaps_the_callers_modules():
    model = nn.Sequential(nn.Linear(512, 512))
    gm = ff.transform(model, torch.randn(1, 512), inplace=True, progress=False)
    assert isinstance(model[0], ff.FactorizedLinear)
    assert gm.get_submodule("0") is model[0]


def test_report_table_names_every_layer_and_totals():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    gm = ff.transform(model, torch.randn(4, 512), progress=False)
    report = gm.meta["fxfactorize"]
    text = str(report)
    for header in (
        "node",
        "op",
        "in→out",
        "kernel",
        "rank",
        "MACs before",
        "MACs after",
        "params before",
        "params after",
        "nmse / reason",
    ):
        assert header in text
    assert "skipped: min(in, out)=10 < min_features=256" in text
    assert "total" in text
    totals = report.totals()
    assert totals["macs_before"] == 4 * (512 * 512 + 512 * 10)
    assert totals["macs_after"] == 4 * (128 * 1024 + 512 * 10)
    assert totals["params_after"] == 128 * 1024 + 512 + 512 * 10 + 10


def test_plan_prints_the_same_decisions_without_solving():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    the_plan = ff.plan(model, torch.randn(4, 512))
    transformed = ff.transform(model, torch.randn(4, 512), progress=False).meta["fxfactorize"]
    assert [(r.node, r.rank, r.reason) for r in the_plan.layers] == [
        (r.node, r.rank, r.reason) for r in transformed.layers
    ]
    assert "planned" in str(the_plan)
    assert all(r.nmse is None for r in the_plan.layers)


@pytest.mark.parametrize(
    "name, value",
    [
        ("latent_features", 0),
        ("latent_features", 1.0),
        ("latent_channels", -3),
        ("latent_channels", "big"),
        ("min_features", -1),
        ("min_channels", 2.5),
    ],
)
def test_invalid_sizes_raise_value_error_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        ff.transform(nn.Linear(4, 4), torch.randn(1, 4), **{name: value})


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="latent_feature"):
        ff.transform(nn.Linear(4, 4), torch.randn(1, 4), latent_feature=3)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ff.transform(lambda x: x, torch.randn(1, 4))


def test_shape_failure_names_the_node_and_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(300, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShapePropagationError, match="'_1'"):
        ff.transform(model, torch.randn(2, 512))
    with pytest.raises(ShapePropagationError):
        ff.transform(model, torch.randn(2, 512), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Linear)


def test_dtype_and_device_of_layers_are_kept():
    model = nn.Sequential(nn.Linear(512, 512)).to(torch.float64)
    gm = ff.transform(model, torch.randn(2, 512, dtype=torch.float64), progress=False)
    params = list(gm.parameters())
    assert params and all(p.dtype == torch.float64 for p in params)


def test_state_dict_round_trips_into_a_fresh_transform():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    x = torch.randn(3, 512)
    gm = ff.transform(model, x, progress=False)
    other = ff.transform(
        nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)), x, progress=False
    )
    other.load_state_dict(gm.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), gm(x))


def test_torch_compile_of_a_result_matches_eager():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    x = torch.randn(8, 256)
    gm = ff.transform(model, x, min_features=64, latent_features=32, progress=False)
    compiled = torch.compile(gm)
    with torch.no_grad():
        assert torch.allclose(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
