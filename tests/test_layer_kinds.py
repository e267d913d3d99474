"""Issue 7 layer kinds: functional layers, Conv1d/Conv3d, grouped/depthwise convs, N-d Linear inputs,
leaf-module policy, and the regions machinery on small models."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxfactorize as ff
from fxfactorize.passes.functional import convert_functional_layers


def low_rank(shape, rank, seed=0):
    """A weight of ``shape`` ([out, in, *kernel]) whose [out, in·kernel] matrix has rank ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    out, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
    return (
        torch.randn(out, rank, generator=gen) @ torch.randn(rank, fan_in, generator=gen) / fan_in
    ).reshape(shape)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(low_rank((96, 64), 8))
        self.b1 = nn.Parameter(torch.randn(96))
        self.w2 = nn.Parameter(
            low_rank((96, 64), 8, seed=1).T.contiguous()
        )  # used as x @ w2: [in, out]
        self.conv = nn.Parameter(low_rank((64, 32, 3, 3), 8, seed=2))

    def forward(self, x, image):
        hidden = F.gelu(F.linear(x, self.w1, self.b1))
        return hidden[..., :64] @ self.w2, F.conv2d(image, self.conv, padding=1)


def test_functional_layers_are_factorized_and_parameters_drop():
    model = Functional()
    inputs = (torch.randn(4, 64), torch.randn(2, 32, 8, 8))
    gm = ff.transform(
        model,
        inputs,
        min_features=32,
        latent_features=8,
        min_channels=32,
        latent_channels=8,
        progress=False,
    )
    assert [r.op for r in gm.meta["fxfactorize"].factorized] == ["Linear", "Linear", "Conv2d"]
    assert n_params(gm) < n_params(model) / 2
    assert not hasattr(gm, "w1") and not hasattr(gm, "conv")  # moved into the factorized pairs
    with torch.no_grad():
        for got, expected in zip(gm(*inputs), model(*inputs), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert isinstance(model.w1, nn.Parameter)  # the caller's model keeps its parameters


def test_functional_parameter_with_other_uses_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return F.linear(x, self.w) + self.w.sum()

    gm = fx.symbolic_trace(Shared())
    assert convert_functional_layers(gm) == []
    assert any(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes)


def test_functional_can_be_switched_off():
    model = Functional()
    inputs = (torch.randn(4, 64), torch.randn(2, 32, 8, 8))
    the_plan = ff.plan(model, inputs, functional=False, min_features=32, min_channels=32)
    assert the_plan.layers == []


@pytest.mark.parametrize(
    "conv, pair, shape",
    [
        (nn.Conv1d(48, 64, 5, padding=2, stride=2), ff.FactorizedConv1d, (2, 48, 20)),
        (nn.Conv3d(32, 48, 3, padding=1, dilation=1), ff.FactorizedConv3d, (1, 32, 4, 5, 6)),
    ],
)
def test_conv1d_and_conv3d_are_exact_on_truly_low_rank_weights(conv, pair, shape):
    with torch.no_grad():
        conv.weight.copy_(low_rank(conv.weight.shape, 6))
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(shape)
    gm = ff.transform(model, x, min_channels=16, latent_channels=6, progress=False)
    assert isinstance(gm.get_submodule("0"), pair) and gm.get_submodule("0").latent_channels == 6
    (record,) = gm.meta["fxfactorize"].layers
    assert record.rank == 6 and record.nmse < 1e-10 and record.macs_after < record.macs_before
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_grouped_conv_is_factorized_per_group_exactly():
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=4)
    with torch.no_grad():  # each group's [16, 16·9] block has rank 2
        conv.weight.copy_(torch.cat([low_rank((16, 16, 3, 3), 2, seed=g) for g in range(4)]))
    x = torch.randn(2, 64, 6, 6)
    gm = ff.transform(nn.Sequential(conv), x, min_channels=16, latent_channels=8, progress=False)
    pair = gm.get_submodule("0")
    assert isinstance(pair, ff.FactorizedConv2d) and pair.groups == 4 and pair.latent_channels == 8
    torch.testing.assert_close(gm(x), conv(x), atol=1e-5, rtol=1e-5)


def test_depthwise_conv_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv1d(64, 64, 7, groups=64, padding=3))
    (record,) = ff.plan(model, torch.randn(1, 64, 32), min_channels=16).layers
    assert record.rank is None and "depthwise" in record.reason


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 64), (2, 3, 4, 64)])
def test_linear_on_inputs_of_any_rank(shape):
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(low_rank((48, 64), 4))
    x = torch.randn(shape)
    gm = ff.transform(nn.Sequential(layer), x, min_features=32, latent_features=4, progress=False)
    (record,) = gm.meta["fxfactorize"].layers
    positions = x.numel() // 64
    assert record.macs_before == positions * 64 * 48 and record.macs_after == positions * 4 * (
        64 + 48
    )
    torch.testing.assert_close(gm(x), layer(x), atol=1e-5, rtol=1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x)


def test_leaf_modules_by_type_keep_their_layers_whole():
    model = nn.Sequential(Block(), nn.Linear(64, 64))
    x = torch.randn(2, 64)
    default = ff.plan(model, x, min_features=32, latent_features=8)
    assert [r.target for r in default.factorized] == ["0.fc", "1"]
    as_leaf = ff.plan(model, x, min_features=32, latent_features=8, leaf_modules=(Block,))
    assert [r.target for r in as_leaf.layers] == ["1"]


def test_leaf_modules_and_on_untraceable_are_validated():
    with pytest.raises(ValueError, match="leaf_modules"):
        ff.FactorizeConfig(leaf_modules=(3,))
    with pytest.raises(ValueError, match="on_untraceable"):
        ff.FactorizeConfig(on_untraceable="skip")
    assert ff.FactorizeConfig(leaf_modules=Block).leaf_modules == (Block,)


class Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, scale=None):
        y = self.fc(x)
        if scale is not None:  # on a proxy this is always taken; the model passes None
            y = y * scale
        return y


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Optional()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            x = -x
        return self.inner(x)


def test_region_called_with_none_is_traced_for_none_and_guarded():
    model = Root()
    x = torch.randn(2, 64)
    result = ff.transform(model, x, min_features=32, latent_features=8, progress=False)
    assert isinstance(result.inner, fx.GraphModule) and ff.report_of(result).regions == ["inner"]
    assert result(x).shape == (2, 64)
    with pytest.raises(AssertionError, match="specialized"):
        result.inner(x, scale=torch.ones(1))


def test_report_of_names_what_is_missing():
    with pytest.raises(ValueError, match="no fxfactorize report"):
        ff.report_of(nn.Linear(2, 2))


def test_inplace_partial_transform_edits_the_model_itself():
    model = Root()
    result = ff.transform(
        model, torch.randn(2, 64), min_features=32, latent_features=8, inplace=True, progress=False
    )
    assert result is model and isinstance(model.inner, fx.GraphModule)


def test_functional_result_saves_and_loads(tmp_path):
    model = Functional()
    inputs = (torch.randn(4, 64), torch.randn(2, 32, 8, 8))
    options = {"min_features": 32, "latent_features": 8, "min_channels": 32, "latent_channels": 8}
    gm = ff.transform(model, inputs, progress=False, **options)
    loaded = ff.load(ff.save(gm, tmp_path / "functional"), Functional())
    with torch.no_grad():
        for got, expected in zip(loaded(*inputs), gm(*inputs), strict=True):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(16, 24, 5, stride=2, padding=2, padding_mode="reflect"), (3, 16, 40)),
        (nn.Conv3d(8, 24, 3, padding="same", dilation=(1, 2, 1)), (2, 8, 5, 8, 6)),
    ],
)
def test_calibrated_conv1d_and_conv3d_report_the_exact_nmse_on_their_data(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.Tanh())
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(shape[1], 3, generator=gen)  # channels correlated: a 3-d subspace
    batches = [
        torch.einsum("cs,ns...->nc...", basis, torch.randn(shape[0], 3, *shape[2:], generator=gen))
        for _ in range(3)
    ]
    options = {"min_channels": 4, "latent_channels": 4}
    aware = ff.transform(model, batches[0], calibration=batches, progress=False, **options)
    free = ff.transform(model, batches[0], progress=False, **options)
    (record,) = aware.meta["fxfactorize"].factorized
    assert record.nmse_source == "calibration"
    x = torch.cat(batches)
    with torch.no_grad():
        y, y_aware, y_free = conv(x), aware.get_submodule("0")(x), free.get_submodule("0")(x)
    measured = float(((y - y_aware) ** 2).mean() / y.var())
    assert record.nmse == pytest.approx(measured, rel=1e-3, abs=1e-9)  # moments match the conv
    # the optimum on these inputs, so below the data-free solution's error on them
    assert float((y - y_aware).pow(2).mean()) < 0.95 * float((y - y_free).pow(2).mean())


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([1, 3]),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(1, 2),
    st.sampled_from([0, 1, "same", "valid"]),
    st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
)
def test_patch_rows_are_the_matrix_view_of_1d_and_3d_convs(
    dims, kernel, stride, dilation, padding, padding_mode
):
    from fxfactorize.core.patches import conv_patch_rows

    if padding == "same":
        stride = 1  # torch allows "same" only with stride 1
    conv_class = nn.Conv1d if dims == 1 else nn.Conv3d
    conv = conv_class(
        3,
        5,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        bias=False,
    )
    x = torch.randn(2, 3, *([7] * dims), dtype=torch.float64)
    conv = conv.double()
    with torch.no_grad():
        y = conv(x)
    rows = torch.cat(
        list(
            conv_patch_rows(
                x,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                padding_mode=padding_mode,
                max_rows=5,
            )
        )
    )
    expected = y.movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.detach().reshape(5, -1).T, expected)
