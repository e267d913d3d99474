"""The `fxfactorize.testing` strategies draw what they promise."""

import pytest
import torch
from hypothesis import find, given
from hypothesis import strategies as st
from torch import fx

import fxfactorize.testing as fft
from fxfactorize.testing.layers import low_rank_tensor


@given(fft.linear_layers(max_features=12), st.integers(1, 3))
def test_linear_layers_run(layer, batch):
    assert 1 <= layer.in_features <= 12 and 1 <= layer.out_features <= 12
    assert layer(torch.randn(batch, layer.in_features)).shape == (batch, layer.out_features)


@given(fft.conv2d_layers(max_channels=8))
def test_conv2d_layers_run_on_a_large_enough_input(conv):
    assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
    reach = max(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    out = conv(torch.randn(1, conv.in_channels, reach + 3, reach + 3))
    assert out.shape[1] == conv.out_channels and torch.isfinite(out).all()


@given(st.sampled_from([(6, 4), (5, 2, 3, 3)]), st.data())
def test_low_rank_weights_have_the_rank(shape, data):
    full = min(shape[0], torch.Size(shape[1:]).numel())
    rank = data.draw(st.integers(1, full))
    weight = data.draw(fft.low_rank_weights(shape, rank))
    assert tuple(weight.shape) == shape
    assert int(torch.linalg.matrix_rank(weight.reshape(shape[0], -1).double(), rtol=1e-5)) == rank


def test_low_rank_tensor_rejects_an_impossible_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        low_rank_tensor((3, 4), 5, seed=0)


@given(fft.models())
def test_models_trace_run_and_report_their_ranks(drawn):
    gm = fx.symbolic_trace(drawn.model)
    expected = drawn.model(drawn.example_inputs)
    got = gm(drawn.example_inputs)
    pairs = zip(expected, got, strict=True) if isinstance(expected, tuple) else [(expected, got)]
    assert all(torch.equal(a, b) for a, b in pairs)
    for name, rank in drawn.weight_ranks.items():
        weight = drawn.model.get_submodule(name).weight.detach()
        assert (
            int(torch.linalg.matrix_rank(weight.reshape(weight.shape[0], -1).double(), rtol=1e-5))
            == rank
        )


def test_models_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kinds must be"):
        find(fft.models(kinds=("lstm",)), lambda drawn: True)


EXAMPLE = {"x": torch.randn(3, 5), "ids": torch.tensor([[2, 9], [4, 4], [3, 5]]), "flag": True}


@given(fft.inputs_for(EXAMPLE, dtypes=[torch.float32, torch.float64]))
def test_inputs_for_keeps_structure_ranges_and_a_shared_batch(drawn):
    assert drawn.keys() == EXAMPLE.keys() and drawn["flag"] is True
    assert drawn["x"].shape[0] == drawn["ids"].shape[0] >= 1 and drawn["x"].shape[1] == 5
    assert (
        drawn["ids"].dtype == torch.int64
        and 2 <= int(drawn["ids"].min()) <= int(drawn["ids"].max()) <= 9
    )
    assert drawn["x"].dtype in (torch.float32, torch.float64) and torch.isfinite(drawn["x"]).all()


def test_inputs_for_reaches_batch_one_large_batches_big_magnitudes_and_zero_rows():
    strategy = fft.inputs_for(torch.randn(4, 3))
    assert find(strategy, lambda x: x.shape[0] == 1).shape == (1, 3)
    assert find(strategy, lambda x: x.shape[0] > 4).shape[0] > 4
    assert float(find(strategy, lambda x: bool(x.abs().max() > 500)).abs().max()) > 500
    assert find(strategy, lambda x: bool((x == 0).all(dim=1).any())) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"batch_dim": -1}, "batch_dim"), ({"max_batch": 0}, "max_batch")]
)
def test_inputs_for_names_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fft.inputs_for(torch.randn(2, 2), **kwargs)
    with pytest.raises(TypeError, match="example_inputs must be"):
        fft.inputs_for("not a tensor")


def test_assert_factorization_equivalent_returns_the_checked_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    gm = fft.assert_factorization_equivalent(
        model, torch.randn(2, 16), min_features=1, latent_features=4, max_examples=5, seed=0
    )
    assert isinstance(gm, fx.GraphModule) and len(gm.meta["fxfactorize"].factorized) == 2
