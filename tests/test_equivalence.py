"""`check_equivalence` checks itself: planted faults are caught, equivalent pairs pass."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.equivalence import EquivalenceError, Tolerance, check_equivalence, compare_outputs


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 6)).eval()


class TwoHeads(nn.Module):
    """Returns a tuple; ``fault`` perturbs only the second output."""

    def __init__(self, fault: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(12, 16)
        self.left, self.right = nn.Linear(16, 4), nn.Linear(16, 3)
        self.fault = fault

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.left(h), self.right(h) * (1 + self.fault)


class Faulty(nn.Module):
    """Wraps a model; adds ``delta`` to its output wherever ``when(x)`` holds."""

    def __init__(self, model, when, delta=1.0):
        super().__init__()
        self.model, self.when, self.delta = model, when, delta

    def forward(self, x):
        y = self.model(x)
        return y + self.delta if self.when(x) else y


X = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))


def test_passes_on_a_deep_copy():
    model = small_mlp()
    check_equivalence(model, copy.deepcopy(model), X, max_examples=20, seed=0)


def test_catches_a_changed_weight():
    model = small_mlp()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[2].weight[3, 5] += 0.05
    with pytest.raises(EquivalenceError, match=r"at output: nmse"):
        check_equivalence(model, broken, X, max_examples=20, seed=0)


def test_catches_a_fault_only_at_batch_size_one_and_shrinks_to_it():
    model = small_mlp()
    broken = Faulty(copy.deepcopy(model), lambda x: x.shape[0] == 1)
    with pytest.raises(EquivalenceError) as caught:
        check_equivalence(model, broken, X, max_examples=30, seed=0)
    assert caught.value.inputs.shape[0] == 1
    assert "tensor[1, 12]" in str(caught.value)


def test_catches_a_fault_only_for_large_magnitudes():
    model = small_mlp()
    broken = Faulty(copy.deepcopy(model), lambda x: bool(x.abs().max() > 100), delta=1e-2)
    with pytest.raises(EquivalenceError) as caught:
        check_equivalence(model, broken, X, max_examples=50, seed=0)
    assert float(caught.value.inputs.abs().max()) > 100


def test_catches_a_fault_in_one_output_of_a_tuple_and_names_it():
    with pytest.raises(EquivalenceError, match=r"at output\[1\]") as caught:
        check_equivalence(TwoHeads(), TwoHeads(fault=1e-3), X, max_examples=20, seed=0)
    assert caught.value.path == "output[1]"
    assert caught.value.nmse > 1e-8


def test_catches_a_candidate_that_raises_where_the_reference_does_not():
    model = small_mlp()

    def refuses_odd_batches(x):
        if x.shape[0] % 2:
            raise RuntimeError("odd batch")
        return False

    with pytest.raises(EquivalenceError, match="candidate raised RuntimeError: odd batch"):
        check_equivalence(model, Faulty(model, refuses_odd_batches), X, max_examples=20, seed=0)


def test_catches_a_fault_only_on_all_zero_rows():
    model = small_mlp()

    def has_zero_row(x):
        return bool((x == 0).all(dim=1).any())

    with pytest.raises(EquivalenceError, match="all-zero row"):
        check_equivalence(model, Faulty(model, has_zero_row), X, max_examples=50, seed=0)


def test_same_seed_same_counterexample():
    model = small_mlp()
    broken = Faulty(model, lambda x: bool(x.abs().max() > 10), delta=1.0)
    found = []
    for _ in range(2):
        with pytest.raises(EquivalenceError) as caught:
            check_equivalence(model, broken, X, max_examples=30, seed=7)
        found.append(caught.value.inputs)
    assert torch.equal(found[0], found[1])


def test_an_explicit_tolerance_is_respected():
    model = small_mlp()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[2].bias.add_(1e-3)
    check_equivalence(model, broken, X, tolerance=Tolerance(nmse=1e-2), max_examples=10, seed=0)
    with pytest.raises(EquivalenceError):
        check_equivalence(model, broken, X, max_examples=10, seed=0)


def test_modes_are_restored_and_nothing_is_changed():
    model, other = small_mlp().train(), small_mlp().train()
    other[1].eval()
    before = copy.deepcopy(model.state_dict())
    check_equivalence(model, other, X, max_examples=5, seed=0)
    assert model.training and other.training and not other[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled()


def test_dict_inputs_and_integer_ids_keep_their_range():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)

        def forward(self, ids, mask):
            return {"logits": self.head(self.embed(ids)) * mask.unsqueeze(-1)}

    example = {
        "ids": torch.tensor([[0, 9, 4], [1, 1, 2]]),
        "mask": torch.tensor([[1.0, 1, 0], [1, 0, 0]]),
    }
    model = Tagger().eval()
    check_equivalence(model, copy.deepcopy(model), example, max_examples=15, seed=0)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.embed.weight[9] += 1
    with pytest.raises(EquivalenceError, match=r"output\['logits'\]"):
        check_equivalence(model, broken, example, max_examples=30, seed=0)


def test_batch_dim_other_than_zero():
    class TimeMajor(nn.Module):  # input [time, batch, features]
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.fc = nn.Linear(5, 4)

        def forward(self, x):
            return self.fc(x).mean(0)

    model = TimeMajor().eval()
    broken = Faulty(copy.deepcopy(model), lambda x: x.shape[1] == 1)
    example = torch.randn(3, 4, 5)
    check_equivalence(model, copy.deepcopy(model), example, batch_dim=1, max_examples=10, seed=0)
    with pytest.raises(EquivalenceError):
        check_equivalence(model, broken, example, batch_dim=1, max_examples=30, seed=0)


def test_truncated_transform_passes_and_a_fault_inside_a_factorized_layer_is_caught():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    gm = ff.transform(model, X.new_zeros(2, 32), min_features=1, latent_features=12, progress=False)
    assert all(r.nmse > 0.1 for r in gm.meta["fxfactorize"].factorized)  # heavily truncated
    check_equivalence(model, gm, torch.randn(2, 32), max_examples=8, seed=0)
    broken = copy.deepcopy(gm)
    with torch.no_grad():
        broken.get_submodule("0").module1.weight.mul_(1.2)  # a 20% error inside a 10%+ one
    with pytest.raises(EquivalenceError, match="not the data-free optimum"):
        check_equivalence(model, broken, torch.randn(2, 32), max_examples=8, seed=0)
    broken = copy.deepcopy(gm)
    with torch.no_grad():
        broken.get_submodule("4").weight.mul_(1.5)  # a layer the pass left alone
    with pytest.raises(EquivalenceError, match="at output"):
        check_equivalence(model, broken, torch.randn(2, 32), max_examples=8, seed=0)


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor
    extras: tuple


def test_compare_outputs_walks_dataclasses_and_names_the_path():
    a = ModelOutput(torch.ones(2), (torch.zeros(3), 4))
    assert compare_outputs(a, ModelOutput(torch.ones(2), (torch.zeros(3), 4)), Tolerance()) is None
    mismatch = compare_outputs(a, ModelOutput(torch.ones(2), (torch.zeros(3), 5)), Tolerance())
    assert mismatch.path == "output.extras[1]"
    mismatch = compare_outputs(a, ModelOutput(torch.ones(2), (torch.zeros(4), 4)), Tolerance())
    assert mismatch.path == "output.extras[0]" and "shape" in mismatch.detail


def test_compare_outputs_handles_non_finite_and_constant_outputs():
    inf = torch.tensor([1.0, float("inf"), float("nan")])
    assert compare_outputs(inf, inf.clone(), Tolerance()) is None
    assert compare_outputs(inf, torch.tensor([1.0, 2.0, float("nan")]), Tolerance()) is not None
    constant = torch.full((5,), 3.0)  # zero variance: the max-abs criterion decides
    assert compare_outputs(constant, constant + 1e-6, Tolerance()) is None
    assert compare_outputs(constant, constant + 1e-2, Tolerance()) is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_examples": 0}, ValueError, "max_examples must be an int >= 1"),
        ({"seed": "a"}, ValueError, "seed must be an int"),
        ({"batch_dim": -1}, ValueError, "batch_dim must be an int >= 0"),
        ({"tolerance": 1e-3}, TypeError, "tolerance must be a Tolerance"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    model = small_mlp()
    with pytest.raises(error, match=message):
        check_equivalence(model, model, X, **kwargs)


def test_non_module_and_bad_example_inputs():
    with pytest.raises(TypeError, match="candidate must be a torch.nn.Module"):
        check_equivalence(small_mlp(), lambda x: x, X)
    with pytest.raises(RuntimeError):  # the reference's own error on the caller's example
        check_equivalence(small_mlp(), small_mlp(), torch.randn(2, 5))


def test_half_precision_models_are_compared_at_their_precision():
    from fxfactorize.testing.layers import low_rank_tensor

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():  # rank 4: factorizing at rank 4 is exact up to bfloat16 round-off
        model[0].weight.copy_(low_rank_tensor((32, 32), 4, seed=0))
        model[2].weight.copy_(low_rank_tensor((32, 32), 4, seed=1))
    model = model.to(torch.bfloat16).eval()
    example = torch.randn(4, 32, dtype=torch.bfloat16)
    gm = ff.transform(model, example, min_features=1, latent_features=4, progress=False)
    assert len(gm.meta["fxfactorize"].factorized) == 2
    check_equivalence(model, gm, example, max_examples=5, seed=0)
    with pytest.raises(EquivalenceError, match="nmse"):
        strict = Tolerance(dtype_aware=False)
        check_equivalence(model, gm, example, max_examples=5, seed=0, tolerance=strict)


def test_catches_a_fault_only_for_float64_inputs_when_both_models_accept_them():
    class Casting(nn.Module):
        def __init__(self, fault=False):
            super().__init__()
            self.inner, self.fault = small_mlp(), fault

        def forward(self, x):
            y = self.inner(x.float())
            return y + 1 if self.fault and x.dtype == torch.float64 else y

    check_equivalence(Casting(), Casting(), X, max_examples=10, seed=0)
    with pytest.raises(EquivalenceError, match="float64"):
        check_equivalence(Casting(), Casting(fault=True), X, max_examples=30, seed=0)


def test_a_model_transformed_in_place_checks_against_itself_without_recursing():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    gm = ff.transform(
        model, torch.randn(2, 32), min_features=1, latent_features=4, inplace=True, progress=False
    )
    assert model[0] is gm.get_submodule("0")
    check_equivalence(model, gm, torch.randn(2, 32), max_examples=5, seed=0)


def test_a_calibrated_transform_passes_and_a_fault_outside_its_layers_is_caught():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).eval()
    batches = [torch.randn(16, 32) for _ in range(2)]
    gm = ff.transform(
        model, batches[0], calibration=batches, min_features=1, latent_features=6, progress=False
    )
    assert {r.nmse_source for r in gm.meta["fxfactorize"].factorized} == {"calibration"}
    check = {"calibration": batches, "max_examples": 6, "seed": 0}
    check_equivalence(model, gm, batches[0], **check)
    broken = copy.deepcopy(gm)
    with torch.no_grad():
        broken.get_submodule("4").bias.add_(0.1)
    with pytest.raises(EquivalenceError, match="at output"):
        check_equivalence(model, broken, batches[0], **check)
