"""`check_equivalence` trusts nothing in the candidate: every factorized layer is held to the optimum
for its rank, computed from the reference; planted faults that a trusting check let pass fail here."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxfactorize as ff
import fxfactorize.testing as fft
from fxfactorize.equivalence import (
    EquivalenceError,
    Tolerance,
    UnverifiedLayerError,
    check_equivalence,
    compare_outputs,
    default_tolerance,
)
from fxfactorize.tensorized import FactorizedLinear as TensorizedLinear

OPTIONS = {"min_features": 1, "min_channels": 1, "cost_model": "macs", "progress": False}
CHECK = {"max_examples": 4, "seed": 0}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 12)).eval()


X = torch.randn(4, 24, generator=gen(0))
BATCHES = [torch.randn(16, 24, generator=gen(i)) + 0.5 for i in (1, 2)]


def truncated(model: nn.Module = None, calibration=None, rank: int = 4) -> tuple:
    model = model if model is not None else mlp()
    shrinkage = {} if calibration is None else {"shrinkage": 0.0}  # the exact calibrated optimum
    gm = ff.transform(
        model, X, calibration=calibration, latent_features=rank, **OPTIONS, **shrinkage
    )
    assert len(gm.meta["fxfactorize"].factorized) == 2
    return model, gm


def altered(gm: nn.Module, change) -> nn.Module:
    broken = copy.deepcopy(gm)
    with torch.no_grad():
        change(broken)
    return broken


# -- the planted faults of issue 13 ------------------------------------------------------------


def test_a_shifted_bias_on_a_truncated_data_free_layer_is_caught():
    model, gm = truncated()
    check_equivalence(model, gm, X, **CHECK)
    broken = altered(gm, lambda m: m.get_submodule("0").module1.bias.add_(10.0))
    with pytest.raises(EquivalenceError, match=r"'0'.*bias differs .* by up to 10"):
        check_equivalence(model, broken, X, **CHECK)


def test_a_zeroed_calibrated_layer_is_caught_with_or_without_the_calibration_batches():
    model, gm = truncated(calibration=BATCHES)

    def zero(m):
        m.get_submodule("2").module0.weight.zero_()
        m.get_submodule("2").module1.weight.zero_()

    broken = altered(gm, zero)
    with pytest.raises(EquivalenceError, match=r"layer '2' is not the optimum .*calibrated one"):
        check_equivalence(model, broken, X, calibration=BATCHES, **CHECK)
    with pytest.raises(UnverifiedLayerError):
        check_equivalence(model, broken, X, **CHECK)


def test_a_report_that_owns_up_to_a_zeroed_layer_does_not_excuse_it():
    model, gm = truncated()
    broken = altered(gm, lambda m: m.get_submodule("0").module1.weight.zero_())
    report = broken.meta["fxfactorize"]
    records = [dataclasses.replace(r, nmse=1.0) if r.target == "0" else r for r in report.layers]
    broken.meta["fxfactorize"] = type(report)(records, report.config)
    with pytest.raises(EquivalenceError, match="'0'"):
        check_equivalence(model, broken, X, **CHECK)


def test_a_random_pair_whose_report_claims_nmse_zero_is_caught():
    model, gm = truncated()
    broken = altered(
        gm, lambda m: [p.normal_(generator=gen(3)) for p in m.get_submodule("2").parameters()]
    )
    report = broken.meta["fxfactorize"]
    broken.meta["fxfactorize"] = type(report)(
        [dataclasses.replace(r, nmse=0.0) for r in report.layers], report.config
    )
    with pytest.raises(EquivalenceError, match="'2'"):
        check_equivalence(model, broken, X, **CHECK)
    with pytest.raises(EquivalenceError, match="'2'"):
        check_equivalence(model, broken, X, calibration=BATCHES, **CHECK)


def test_a_shifted_bias_on_a_calibrated_layer_is_caught():
    model, gm = truncated(calibration=BATCHES)
    broken = altered(gm, lambda m: m.get_submodule("0").module1.bias.add_(1e-2))
    with pytest.raises(EquivalenceError, match="layer '0' is not the optimum"):
        check_equivalence(model, broken, X, calibration=BATCHES, **CHECK)


# -- calibrated layers need the calibration batches ------------------------------------------------


def test_a_calibrated_transform_is_verified_with_its_batches_and_refused_without():
    model, gm = truncated(calibration=BATCHES)
    check_equivalence(model, gm, X, calibration=BATCHES, **CHECK)
    check_equivalence(model, gm, X, calibration=iter(BATCHES), **CHECK)  # any iterable, once
    with pytest.raises(UnverifiedLayerError, match="calibration=") as caught:
        check_equivalence(model, gm, X, **CHECK)
    assert set(caught.value.layers) == {"0", "2"}
    check_equivalence(model, gm, X, tolerance=Tolerance(nmse=10.0), **CHECK)
    with pytest.raises(ValueError, match="not both"):
        check_equivalence(model, gm, X, calibration=BATCHES, tolerance=Tolerance(), **CHECK)


def test_other_calibration_batches_do_not_verify_a_calibrated_layer():
    model, gm = truncated(calibration=BATCHES)
    other = [torch.randn(16, 24, generator=gen(9)) * 3]
    with pytest.raises(EquivalenceError, match="not the optimum"):
        check_equivalence(model, gm, X, calibration=other, **CHECK)


def test_calibration_batches_as_tuples_and_dicts():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x, scale=1.0):
            return self.body(x * scale)

    model = Keyword().eval()
    tuples = [(b,) for b in BATCHES]
    gm = ff.transform(model, (X,), calibration=tuples, latent_features=4, **OPTIONS)
    check_equivalence(model, gm, (X,), calibration=tuples, **CHECK)
    check_equivalence(model, gm, {"x": X}, calibration=[{"x": b} for b in BATCHES], **CHECK)


# -- convolutions ------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.b = nn.Conv2d(12, 10, 3, padding="same", padding_mode="reflect", bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


XC = torch.randn(2, 8, 9, 9, generator=gen(4))
CONV_BATCHES = [torch.randn(3, 8, 9, 9, generator=gen(5)) + 0.3]


@pytest.mark.parametrize("calibration", [None, CONV_BATCHES], ids=["data-free", "calibrated"])
def test_strided_grouped_convs_are_verified_and_their_faults_caught(calibration):
    model = ConvNet().eval()
    gm = ff.transform(model, XC, calibration=calibration, latent_channels=4, **OPTIONS)
    assert {r.target for r in gm.meta["fxfactorize"].factorized} == {"a", "b"}
    check_equivalence(model, gm, XC, calibration=calibration, **CHECK)
    broken = altered(gm, lambda m: m.a.module0.weight[0].mul_(1.05))
    with pytest.raises(EquivalenceError, match="'a'"):
        check_equivalence(model, broken, XC, calibration=calibration, **CHECK)
    broken = altered(gm, lambda m: m.a.module1.bias.add_(0.1))
    with pytest.raises(EquivalenceError, match="'a'"):
        check_equivalence(model, broken, XC, calibration=calibration, **CHECK)


def test_a_candidate_layer_with_other_padding_than_its_parameters_say_is_caught():
    model = ConvNet().eval()
    gm = ff.transform(model, XC, latent_channels=4, **OPTIONS)
    broken = copy.deepcopy(gm)
    broken.b.module0.padding_mode = "zeros"  # same weights, other function: only end to end shows
    with pytest.raises(EquivalenceError, match="at output"):
        check_equivalence(model, broken, XC, **CHECK)


def test_a_hook_on_a_candidate_layer_is_caught_end_to_end():
    model, gm = truncated()
    broken = copy.deepcopy(gm)
    broken.get_submodule("0").register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.raises(EquivalenceError, match="at output"):
        check_equivalence(model, broken, X, **CHECK)


# -- tensorized layers -------------------------------------------------------------------------


@pytest.mark.parametrize("factorization", ["tt", "blocktt", "tucker"])
def test_tensorized_layers_are_held_to_their_textbook_decomposition(factorization):
    torch.manual_seed(6)
    layer = nn.Linear(64, 64)
    model = nn.Sequential(layer, nn.Tanh()).eval()
    tensorized = TensorizedLinear.from_linear(
        layer, rank=0.3, factorization=factorization, n_tensorized_modes=3
    )
    candidate = nn.Sequential(tensorized, nn.Tanh()).eval()
    example = torch.randn(3, 64, generator=gen(7))
    check_equivalence(model, candidate, example, **CHECK)
    broken = altered(candidate, lambda m: m[0].bias.add_(0.5))
    with pytest.raises(EquivalenceError, match="bias differs"):
        check_equivalence(model, broken, example, **CHECK)
    broken = altered(candidate, lambda m: m[0].factors[-1].mul_(0.5))
    with pytest.raises(EquivalenceError, match="textbook"):
        check_equivalence(model, broken, example, **CHECK)


def test_a_tensorized_transform_is_verified():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    gm = ff.transform(model, torch.randn(2, 64), method="tt", latent_features=4, **OPTIONS)
    assert len(gm.meta["fxfactorize"].factorized) == 2
    check_equivalence(model, gm, torch.randn(2, 64), **CHECK)


def test_a_cp_layer_needs_an_explicit_tolerance():
    torch.manual_seed(8)
    layer = nn.Linear(64, 64)
    candidate = nn.Sequential(TensorizedLinear.from_linear(layer, rank=0.3, factorization="cp"))
    with pytest.raises(UnverifiedLayerError, match="CP layer has no computable optimum"):
        check_equivalence(nn.Sequential(layer), candidate, torch.randn(2, 64), **CHECK)
    check_equivalence(
        nn.Sequential(layer), candidate, torch.randn(2, 64), tolerance=Tolerance(nmse=1.0), **CHECK
    )


# -- partially traced models and functional layers ------------------------------------------------


class Gate(nn.Module):
    """Its root does not trace (a data-dependent branch); ``body`` and ``head`` do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.body = nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 24))
        self.head = nn.Linear(24, 12)

    def forward(self, x):
        h = self.body(x)
        return self.head(h if h.sum() > 0 else -h)


@pytest.mark.parametrize("calibration", [None, BATCHES], ids=["data-free", "calibrated"])
def test_a_partially_traced_model_is_verified(calibration):
    model = Gate().eval()
    gm = ff.transform(model, X, calibration=calibration, latent_features=4, **OPTIONS)
    assert isinstance(ff.report_of(gm), ff.PartialReport)
    assert len(ff.report_of(gm).factorized) == 3
    check_equivalence(model, gm, X, calibration=calibration, **CHECK)
    broken = altered(gm, lambda m: m.body.get_submodule("2").module1.bias.add_(0.1))
    with pytest.raises(EquivalenceError, match=r"'body\.2'"):
        check_equivalence(model, broken, X, calibration=calibration, **CHECK)


def test_a_layer_made_from_a_functional_call_needs_an_explicit_tolerance():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(24, 24, generator=gen(10)) / 5)

        def forward(self, x):
            return F.linear(x, self.w)

    model = Functional().eval()
    gm = ff.transform(model, X, latent_features=4, **OPTIONS)
    assert len(gm.meta["fxfactorize"].factorized) == 1
    with pytest.raises(UnverifiedLayerError, match="functional call"):
        check_equivalence(model, gm, X, **CHECK)
    check_equivalence(model, gm, X, tolerance=Tolerance(nmse=1.0), **CHECK)


# -- the testing kit and the deprecated helper --------------------------------------------------


def test_assert_factorization_equivalent_passes_calibration_through():
    batches = (b for b in BATCHES)  # a one-shot iterator: transform and the check both need it
    gm = fft.assert_factorization_equivalent(
        mlp(), X, calibration=batches, latent_features=4, **CHECK, **OPTIONS
    )
    assert {r.nmse_source for r in gm.meta["fxfactorize"].factorized} == {"calibration"}


def test_default_tolerance_is_deprecated():
    with pytest.warns(DeprecationWarning, match="no longer trusts"):
        assert default_tolerance(mlp()) == Tolerance()


# -- output leaves -------------------------------------------------------------------------------


def test_python_numbers_compare_under_the_tolerance():
    assert compare_outputs(1.0, 1.0 + 1e-7, Tolerance()) is None
    assert compare_outputs(float("nan"), float("nan"), Tolerance()) is None
    assert compare_outputs((3, 2.5j), (3, 2.5j + 1e-9), Tolerance()) is None
    assert compare_outputs(1.0, 1.1, Tolerance()).path == "output"
    assert compare_outputs(float("inf"), 1e308, Tolerance()) is not None
    assert compare_outputs({"n": 2}, {"n": 3}, Tolerance()).path == "output['n']"
    assert compare_outputs(True, False, Tolerance()) is not None
    assert compare_outputs(1.0, "1.0", Tolerance()) is not None


def test_bool_tensors_compare_exactly():
    mask = torch.tensor([[True, False], [False, True]])
    assert compare_outputs(mask, mask.clone(), Tolerance()) is None
    mismatch = compare_outputs(mask, ~mask, Tolerance(nmse=1.0))
    assert mismatch is not None and "4 of 4 bool elements differ" in mismatch.detail
    assert compare_outputs(mask, mask.float(), Tolerance()) is not None


def test_numpy_outputs_compare_like_tensors():
    a = np.linspace(0.0, 1.0, 5)
    assert compare_outputs(a, a + 1e-12, Tolerance()) is None
    assert compare_outputs(a, a + 0.1, Tolerance()) is not None
    assert compare_outputs(np.array([True, False]), np.array([True, False]), Tolerance()) is None
    assert compare_outputs(np.float32(1.0), 1.0 + 1e-7, Tolerance()) is None
    assert compare_outputs(np.array(["a", "b"]), np.array(["a", "c"]), Tolerance()) is not None


def test_models_returning_numbers_bools_and_numpy_are_checked_end_to_end():
    class Summaries(nn.Module):
        def __init__(self, shift: float = 0.0):
            super().__init__()
            self.body, self.shift = mlp(), shift

        def forward(self, x):
            y = self.body(x)
            return {
                "mean": float(y.mean()) + self.shift,
                "positive": y > 0,
                "array": y.numpy(),
                "nan": float("nan"),
            }

    check_equivalence(Summaries(), Summaries(), X, **CHECK)
    with pytest.raises(EquivalenceError, match=r"output\['mean'\]"):
        check_equivalence(Summaries(), Summaries(shift=1.0), X, **CHECK)


# -- no false alarm on drawn models ---------------------------------------------------------------


@given(fft.models(), st.integers(1, 3), st.integers(0, 2**16))
def test_no_false_alarm_on_calibrated_truncated_models(drawn, rank, seed):
    """Calibrated on skewed, correlated batches, every drawn model verifies with its batches."""
    example = drawn.example_inputs
    shape = (8, *example.shape[1:])
    mix = torch.randn(shape[1], shape[1], generator=gen(seed))
    batches = [
        (torch.randn(shape, generator=gen(seed + i)).movedim(1, -1) @ mix).movedim(-1, 1) + 0.3
        for i in range(2)
    ]
    options = {**OPTIONS, "latent_features": rank, "latent_channels": rank}
    gm = ff.transform(drawn.model, example, calibration=batches, **options)
    check_equivalence(drawn.model, gm, example, calibration=batches, max_examples=2, seed=0)
