"""Property tests of `transform`, driven by the `fxfactorize.testing` kit.

Example counts come from the Hypothesis profile: "ci" (default, 8 per property) or
`--hypothesis-profile=thorough` (200 per property: e.g. 200 drawn models without a false alarm).
"""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxfactorize as ff
import fxfactorize.testing as fft

EVERYTHING = {"min_features": 1, "min_channels": 1, "progress": False}


def ranks(rank):
    return {"latent_features": rank, "latent_channels": rank}


@given(fft.models(weight_rank=3), st.integers(3, 5))
def test_exact_when_the_rank_covers_every_weight(drawn, rank):
    gm = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    assert all(r.nmse < 1e-10 for r in gm.meta["fxfactorize"].factorized)
    ff.check_equivalence(drawn.model, gm, drawn.example_inputs, max_examples=4, seed=0)


@given(fft.models(), st.integers(1, 3))
def test_no_false_alarm_on_truncated_models(drawn, rank):
    """The truncated graph equals the reference with the report's layers substituted, and each
    data-free layer's error is what the report says; the unchanged graph agrees with itself."""
    gm = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    ff.check_equivalence(drawn.model, gm, drawn.example_inputs, max_examples=4, seed=0)
    ff.check_equivalence(
        drawn.model, copy.deepcopy(drawn.model), drawn.example_inputs, max_examples=3, seed=0
    )


@given(fft.models(), st.integers(1, 3))
def test_measured_error_is_what_the_report_says_for_a_single_layer(drawn, rank):
    """For each factorized layer alone, the output error on white inputs matches its report."""
    gm = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    for record in gm.meta["fxfactorize"].factorized:
        original = drawn.model.get_submodule(record.target)
        pair = gm.get_submodule(record.target)
        fan_in = original.weight[0].numel()
        x = torch.randn(4000, fan_in, generator=torch.Generator().manual_seed(0))
        w = original.weight.detach().reshape(original.weight.shape[0], -1).double()
        w_hat = (
            pair.module1.weight.detach().reshape(w.shape[0], -1)
            @ pair.module0.weight.detach().reshape(-1, fan_in)
        ).double()
        measured = float(
            ((x.double() @ (w - w_hat).T) ** 2).mean() / (x.double() @ w.T).pow(2).mean()
        )
        assert measured <= record.nmse * 1.2 + 1e-9  # 4000 samples: a few % sampling noise


@given(fft.models(), st.integers(1, 4))
def test_transform_is_deterministic(drawn, rank):
    first = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    second = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    assert str(first.code) == str(second.code)
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@given(fft.models(), st.integers(2, 4))
def test_transforming_again_is_a_no_op_unless_a_lower_rank_is_asked(drawn, rank):
    once = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    twice = ff.transform(once, drawn.example_inputs, **EVERYTHING, **ranks(rank))
    assert not twice.meta["fxfactorize"].factorized
    one, two = once.state_dict(), twice.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    lower = ff.transform(once, drawn.example_inputs, **EVERYTHING, **ranks(rank - 1))
    lowered = {r.target: r.rank for r in lower.meta["fxfactorize"].factorized}
    assert all(lowered[r.target] == rank - 1 for r in once.meta["fxfactorize"].factorized)


@given(fft.models(max_width=8), st.sampled_from([torch.float64, torch.bfloat16]))
def test_dtype_and_device_of_every_parameter_are_kept(drawn, dtype):
    model = copy.deepcopy(drawn.model).to(dtype)
    gm = ff.transform(model, drawn.example_inputs.to(dtype), **EVERYTHING, **ranks(1))
    assert {(p.dtype, p.device) for p in gm.parameters()} == {(dtype, torch.device("cpu"))}


@given(fft.models())
def test_state_dict_round_trips_into_a_fresh_transform(drawn):
    gm = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(2))
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    other = copy.deepcopy(drawn.model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.normal_()
    fresh = ff.transform(other, drawn.example_inputs, **EVERYTHING, **ranks(2))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    ff.check_equivalence(gm, fresh, drawn.example_inputs, max_examples=2, seed=0)


@settings(max_examples=1)  # compiling is slow; one model keeps CI time bounded
@given(fft.models(kinds=("conv",), max_layers=2, max_width=6))
def test_torch_compile_agrees_with_eager(drawn):
    gm = ff.transform(drawn.model, drawn.example_inputs, **EVERYTHING, **ranks(2))
    compiled = torch.compile(gm)
    with torch.no_grad():
        eager, fast = gm(drawn.example_inputs), compiled(drawn.example_inputs)
    assert ff.equivalence.compare_outputs(eager, fast, ff.Tolerance(nmse=1e-8)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=3)
@given(fft.models(max_width=8))
def test_cuda_parameters_stay_on_the_device_and_agree(drawn):
    model = copy.deepcopy(drawn.model).cuda()
    example = drawn.example_inputs.cuda()
    gm = ff.transform(model, example, **EVERYTHING, **ranks(2))
    assert {p.device.type for p in gm.parameters()} == {"cuda"}
    ff.check_equivalence(model, gm, example, max_examples=3, seed=0)
