"""Shared modules stay shared, tied parameters stay tied, and a failed transform changes nothing."""

import copy

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.errors import FactorizeWarning
from fxfactorize.modules.factorized import FactorizedLinear

WIDTH = 256
OPTIONS = {"min_features": 64, "latent_features": 32, "progress": False, "cost_model": "macs"}


class TwoParents(nn.Module):
    """One Linear object under two parents."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(WIDTH, WIDTH)
        self.first = nn.Sequential(shared, nn.ReLU())
        self.second = nn.Sequential(shared)

    def forward(self, x):
        return self.second(self.first(x))


class Alias(nn.Module):
    """One Linear object under two names of the same parent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TiedHead(nn.Module):
    """An output layer whose weight is the embedding's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, WIDTH)
        self.body = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 300, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def factorized_params(model: nn.Module) -> int:
    """What a correct factorization of the one shared 256×256 layer at rank 32 holds."""
    return params(model) - (WIDTH * WIDTH + WIDTH) + (WIDTH * 32 + 32 * WIDTH + WIDTH)


SHARED = [TwoParents, Alias]


@pytest.mark.parametrize("model_class", SHARED)
def test_transform_in_place_replaces_a_shared_layer_under_every_name(model_class):
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(4, WIDTH)
    expected_params = factorized_params(model)
    gm = ff.transform(model, x, inplace=True, **OPTIONS)
    replacements = {id(m) for m in model.modules() if isinstance(m, FactorizedLinear)}
    assert len(replacements) == 1
    assert not any(type(m) is nn.Linear and m.in_features == WIDTH for m in model.children())
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))
    assert params(model) == params(gm) == expected_params
    assert len(ff.report_of(gm).factorized) == 1


@pytest.mark.parametrize("model_class", SHARED)
def test_transform_keeps_a_shared_layer_one_module(model_class):
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(4, WIDTH)
    before = copy.deepcopy(model.state_dict())
    gm = ff.transform(model, x, **OPTIONS)
    assert params(gm) == factorized_params(model)
    report = ff.report_of(gm)
    assert report.totals()["params_after"] == 32 * WIDTH * 2 + WIDTH
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_class", SHARED)
def test_apply_factorization_gives_a_shared_layer_one_replacement(model_class):
    torch.manual_seed(0)
    model = model_class()
    expected_params = factorized_params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ff.apply_factorization(model, min_features=64, latent_features=32, optimizers=optimizer)
    pairs = {id(m) for m in model.modules() if isinstance(m, FactorizedLinear)}
    assert len(pairs) == 1
    assert params(model) == expected_params
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    model(torch.randn(2, WIDTH)).sum().backward()  # one set of weights gets every gradient
    optimizer.step()
    names = [n for n, m in model.named_modules(remove_duplicate=False) if id(m) in pairs]
    assert len(names) == 2


@pytest.mark.parametrize("mode", ["transform", "inplace", "apply"])
def test_a_layer_tied_to_an_embedding_is_left_alone_with_a_reason(mode):
    torch.manual_seed(0)
    model, ids = TiedHead(), torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        expected_head = model.head.weight.clone()
    if mode == "apply":
        ff.apply_factorization(model, min_features=64, latent_features=32)
        result = model
    else:
        result = ff.transform(model, ids, inplace=mode == "inplace", **OPTIONS)
        report = ff.report_of(result)
        (head,) = [r for r in report.layers if r.target == "head"]
        assert not head.factorized and head.reason == "weight tied to embed.weight"
        assert report.factorized[0].target == "body"
        assert report.totals()["params_after"] < report.totals()["params_before"]
    assert type(result.get_submodule("head")) is nn.Linear
    assert type(result.get_submodule("body")) is FactorizedLinear
    assert result.get_submodule("head").weight is result.get_submodule("embed").weight
    assert torch.equal(result.get_submodule("head").weight, expected_head)
    assert params(result) == params(TiedHead()) - WIDTH * WIDTH + 32 * WIDTH * 2


class Gate(nn.Module):
    """A root torch.fx cannot trace, around two regions that share one Linear."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(WIDTH, WIDTH)
        self.left = nn.Sequential(shared, nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.right = nn.Sequential(nn.Linear(WIDTH, WIDTH), shared)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the root does not trace
            x = x + 1
        return self.right(self.left(x))


def test_partial_regions_sharing_a_layer_solve_it_once_and_count_it_once():
    torch.manual_seed(0)
    model, x = Gate(), torch.rand(4, WIDTH)
    result = ff.transform(model, x, **OPTIONS)
    assert result.get_submodule("left.0") is result.get_submodule("right.1")
    assert isinstance(result.get_submodule("left.0"), FactorizedLinear)
    report = ff.report_of(result)
    shared = [r for r in report.layers if r.target in ("left.0", "right.1")]
    assert [r.shared_with for r in shared] == [None, "left.0"]
    assert shared[1].nmse == shared[0].nmse and shared[1].rank == shared[0].rank
    assert report.totals()["params_after"] == params(result)
    assert report.totals()["params_before"] == params(model)


def _state(model: nn.Module) -> tuple[list, dict]:
    return [(n, id(m)) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def test_an_error_in_the_last_region_leaves_an_in_place_model_bit_identical():
    torch.manual_seed(0)
    model = Gate()
    with torch.no_grad():
        model.right[0].weight[3, 5] = float("nan")
    modules, state = _state(model)
    with pytest.raises(ValueError, match=r"graph node 'right._0' \(right.0\).* NaN"):
        ff.transform(model, torch.rand(4, WIDTH), inplace=True, **OPTIONS)
    after_modules, after_state = _state(model)
    assert after_modules == modules
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[k].nan_to_num(7.0), after_state[k].nan_to_num(7.0)) for k in state)


def test_a_bad_optimizers_argument_is_refused_before_the_model_changes():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
    modules, _ = _state(model)
    with pytest.raises(TypeError, match="optimizers"):
        ff.transform(model, torch.randn(2, WIDTH), inplace=True, optimizers=["sgd"], **OPTIONS)
    assert _state(model)[0] == modules


def test_an_optimizer_that_cannot_be_updated_leaves_model_and_optimizer_as_they_were():
    model = Gate()
    linear = model.left[0]
    # the shared layer's weight and bias in different groups: the update cannot keep one group
    optimizer = torch.optim.SGD([{"params": [linear.weight]}, {"params": [linear.bias]}], lr=0.1)
    groups = [list(g["params"]) for g in optimizer.param_groups]
    modules, _ = _state(model)
    with pytest.raises(RuntimeError, match="param groups"):
        ff.transform(model, torch.rand(2, WIDTH), inplace=True, optimizers=optimizer, **OPTIONS)
    assert _state(model)[0] == modules
    assert [list(g["params"]) for g in optimizer.param_groups] == groups


def test_empty_example_inputs_and_empty_calibration_batches_are_named():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is empty"):
        ff.transform(model, (torch.randn(0, WIDTH),), **OPTIONS)
    with pytest.raises(ff.CalibrationError, match="calibration batch 1 .* empty"):
        ff.transform(
            model, torch.randn(2, WIDTH), calibration=[torch.randn(300, WIDTH)] * 1
            + [torch.randn(0, WIDTH)], **OPTIONS,
        )  # fmt: skip


@pytest.mark.parametrize(
    "rows", [torch.randn(1, WIDTH), torch.zeros(64, WIDTH), torch.ones(400, WIDTH)]
)
def test_scarce_or_constant_calibration_is_a_visible_warning(rows):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    with pytest.warns(FactorizeWarning, match="layer 0: .*calibration"):
        gm = ff.transform(model, torch.randn(2, WIDTH), calibration=[rows], **OPTIONS)
    report = ff.report_of(gm)
    assert len(report.warnings) == 1 and "layer 0" in report.warnings[0]
    assert "warning: layer 0" in str(report)
    assert ff.Report.from_dict(report.to_dict()).warnings == report.warnings


def test_plenty_of_varied_calibration_rows_give_no_warning(recwarn):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    gm = ff.transform(
        model, torch.randn(2, WIDTH), calibration=[torch.randn(512, WIDTH)], **OPTIONS
    )
    assert ff.report_of(gm).warnings == []
    assert not [w for w in recwarn if issubclass(w.category, FactorizeWarning)]


def test_a_budget_that_cannot_be_met_is_in_the_report_and_warned():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
    with pytest.warns(FactorizeWarning, match="budget=0.01 cannot be met"):
        gm = ff.transform(model, torch.randn(2, WIDTH), budget=0.01, **OPTIONS)
    (warning,) = ff.report_of(gm).warnings
    totals = ff.report_of(gm).totals()
    assert f"{totals['macs_after'] / totals['macs_before']:.4g}×" in warning
    assert ff.plan(model, torch.randn(2, WIDTH), budget=0.01, **OPTIONS).warnings == [warning]


def test_an_unmet_budget_names_the_layers_min_features_kept_out():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 32))
    plan = ff.plan(model, torch.randn(2, WIDTH), budget=0.1, **OPTIONS)
    (warning,) = plan.warnings
    assert "1 layer(s) below min_channels/min_features were not candidates (e.g. 2)" in warning
    wider = ff.plan(model, torch.randn(2, WIDTH), budget=0.1, **{**OPTIONS, "min_features": 16})
    assert wider.warnings == []


@pytest.mark.parametrize("policy", [{"tolerance": 0.1}, {"budget": 0.5}])
def test_nan_weights_with_an_error_policy_name_the_node(policy):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    options = {**OPTIONS, **policy}
    with pytest.raises(ValueError, match=r"graph node '_2' \(2\) has NaN or Inf weights"):
        ff.transform(model, torch.randn(2, WIDTH), **options)


def test_save_and_load_keep_a_layer_shared_by_regions(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(4, WIDTH)
    result = ff.transform(Gate(), x, **OPTIONS)
    ff.save(result, tmp_path)
    loaded = ff.load(tmp_path, Gate())
    assert loaded.get_submodule("left.0") is loaded.get_submodule("right.1")
    assert params(loaded) == params(result)
    with torch.no_grad():
        assert torch.equal(loaded(x), result(x))
