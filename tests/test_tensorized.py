"""Tensorized layers (issue 9): recovery, implementations, rank policies, layers, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxfactorize.tensorized import FactorizedLinear, resolve_ranks, tensorize_features

FORMATS = ["cp", "tucker", "tt", "blocktt"]
# small explicit ranks at which each format can represent a weight exactly
EXACT = {"cp": 3, "tucker": (2, 3, 2, 3), "tt": (1, 2, 3, 2, 1), "blocktt": (1, 3, 1)}
IN, OUT = (4, 6), (5, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread avoids oversubscription on shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("factorization", FORMATS)
@pytest.mark.parametrize(
    ("dtype", "seed", "cp_kwargs"),
    [
        (torch.float64, 0, {"tol": 1e-14, "n_iter_max": 2000}),
        # a float32 weight takes decompose's float32 path; exact ranks must still be recovered
        (torch.float32, 9, {"n_iter_max": 500}),
    ],
)
def test_from_linear_recovers_exactly_representable_weight(factorization, dtype, seed, cp_kwargs):
    torch.manual_seed(seed)
    source = FactorizedLinear(IN, OUT, factorization=factorization, rank=EXACT[factorization])
    source = source.to(dtype)
    linear = nn.Linear(24, 20).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(source.get_weight())
    layer = FactorizedLinear.from_linear(
        linear,
        rank=EXACT[factorization],
        in_tensorized_features=IN,
        out_tensorized_features=OUT,
        factorization=factorization,
        decomposition_kwargs=cp_kwargs if factorization == "cp" else {},
    )
    assert layer.rank == source.rank
    assert _relative_error(layer.get_weight().detach(), linear.weight.detach()) < 1e-4


@pytest.mark.parametrize("factorization", FORMATS)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_implementations_agree(factorization, n_layers):
    torch.manual_seed(1)
    layer = FactorizedLinear(
        (4, 8), (8, 4), factorization=factorization, rank=0.3, n_layers=n_layers
    ).double()
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    index = n_layers - 1
    outputs = {}
    for implementation in ("factorized", "reconstructed", "auto"):
        layer.implementation = implementation
        outputs[implementation] = layer(x, indices=index)
    dense = x @ layer.get_weight(index).T + layer.bias[index if n_layers > 1 else ...]
    for y in outputs.values():
        assert y.shape == (5, 7, 32)
        assert _relative_error(y, dense) < 1e-5


@pytest.mark.parametrize("factorization", FORMATS)
@pytest.mark.parametrize("rank", ["same", 0.25, 0.5])
def test_rank_policy_parameter_count_within_two_percent(factorization, rank):
    target = (1.0 if rank == "same" else rank) * 1024 * 1024
    layer = FactorizedLinear((8, 8, 16), (8, 8, 16), factorization=factorization, rank=rank)
    assert abs(layer.n_parameters - target) / target < 0.02
    assert layer.n_parameters == sum(p.numel() for p in layer.factors)


def test_explicit_ranks_are_kept():
    assert resolve_ranks("tucker", (4, 4), (4, 4), (2, 3, 4, 1)).ranks == (2, 3, 4, 1)
    assert resolve_ranks("tt", (4, 4), (4, 4), 3).ranks == (1, 3, 3, 3, 1)
    assert resolve_ranks("blocktt", (4, 4), (4, 4), 100).ranks == (1, 16, 1)  # capped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factorization": "ttm"}, "factorization"),
        ({"rank": 0}, "rank"),
        ({"rank": -0.5}, "rank"),
        ({"rank": "half"}, "rank"),
        ({"rank": (2, 2)}, "rank"),
        ({"factorization": "tt", "rank": (2, 2, 2, 2, 2)}, "start and end with 1"),
        ({"implementation": "fast"}, "implementation"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactorizedLinear((4, 4), (4, 4), **kwargs)


def test_bad_shapes_raise_value_error_naming_the_argument():
    linear = nn.Linear(24, 20)
    with pytest.raises(ValueError, match="in_tensorized_features"):
        FactorizedLinear.from_linear(
            linear, in_tensorized_features=(5, 5), out_tensorized_features=(4, 5)
        )
    with pytest.raises(ValueError, match="out_tensorized_features"):
        FactorizedLinear.from_linear(
            linear, in_tensorized_features=(4, 6), out_tensorized_features=(4, 4)
        )
    with pytest.raises(ValueError, match="blocktt"):
        FactorizedLinear((4, 6), (20,), factorization="blocktt")
    with pytest.raises(ValueError, match="last dimension 16"):
        FactorizedLinear((4, 4), (4, 4))(torch.randn(2, 15))
    with pytest.raises(ValueError, match="indices"):
        FactorizedLinear((4, 4), (4, 4), n_layers=2)(torch.randn(2, 16), indices=2)


def test_tensorize_features_is_balanced():
    assert tensorize_features(1024, 3) == (8, 8, 16)
    assert tensorize_features(4096, 2) == (64, 64)
    assert tensorize_features(7, 2) == (1, 7)


@pytest.mark.parametrize("factorization", FORMATS)
def test_from_linear_list_shares_one_tensor_and_get_linear_selects(factorization):
    torch.manual_seed(2)
    linears = [nn.Linear(16, 16) for _ in range(3)]
    # full ranks (capped by the format) are exact; CP is fitted by ALS, so only approximately
    rank = 24 if factorization == "cp" else 1000
    stack = FactorizedLinear.from_linear_list(
        linears, (4, 4), (4, 4), rank=rank, factorization=factorization
    )
    assert stack.n_layers == 3
    x = torch.randn(4, 16)
    for index, linear in enumerate(linears):
        view = stack.get_linear(index)
        assert torch.equal(view(x), stack(x, indices=index))
        assert _relative_error(view(x), linear(x)) < (0.9 if factorization == "cp" else 1e-4)


@pytest.mark.parametrize("factorization", FORMATS)
def test_training_gradients_flow_and_state_dict_round_trips(factorization):
    torch.manual_seed(3)
    layer = FactorizedLinear((4, 4), (4, 4), factorization=factorization, rank=0.5)
    target = nn.Linear(16, 16)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(30):
        loss = ((layer(x) - y) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        optimizer.step()
    assert float(loss.detach()) < first
    clone = FactorizedLinear((4, 4), (4, 4), factorization=factorization, rank=0.5)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x), layer(x))


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    plain = FactorizedLinear((4, 8), (8, 4), factorization="tt", rank=0.5)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    x = torch.randn(8, 32)
    plain(x).square().sum().backward()
    checkpointed(x).square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_eval_cache_is_invalidated_when_factors_change():
    torch.manual_seed(5)
    layer = FactorizedLinear((4, 4), (4, 4), factorization="cp", rank=0.5).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # served from the cache
        layer.factors[0].mul_(2.0)
        after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, x @ layer.get_weight().detach().T + layer.bias.detach())
    layer.load_state_dict({k: v * 0 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(layer(x), torch.zeros(3, 16))


def test_from_linear_does_not_change_the_linear():
    linear = nn.Linear(32, 32)
    before = copy.deepcopy(linear.state_dict())
    FactorizedLinear.from_linear(linear, rank=0.5, factorization="tucker", n_tensorized_modes=2)
    for key, value in linear.state_dict().items():
        assert torch.equal(value, before[key])


def test_torch_compile_matches_eager():
    torch.manual_seed(6)
    model = nn.Sequential(
        FactorizedLinear((4, 8), (4, 8), factorization="blocktt", rank=0.5), nn.ReLU()
    )
    x = torch.randn(4, 32)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("method", ["tucker", "tt"])
def test_transform_with_tensorized_method_replaces_linears_and_keeps_convs_lowrank(method):
    import fxfactorize as ff
    from fxfactorize.tensorized import FactorizedLinear as TensorizedLinear

    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    x = torch.randn(4, 8, 8, 8)
    gm = ff.transform(
        model,
        x,
        method=method,
        min_features=256,
        min_channels=8,
        latent_channels=2,
        cost_model="macs",  # the tiny memory-bound conv is not predicted faster by latency
        progress=False,
    )
    report = gm.meta["fxfactorize"]
    records = {r.target: r for r in report.layers}
    assert records["0"].method == "lowrank" and records["0"].factorized
    linear = records["2"]
    assert linear.method == method and linear.factorized
    assert isinstance(gm.get_submodule("2"), TensorizedLinear)
    assert method in linear.detail and "ranks" in linear.detail
    assert linear.params_after == sum(p.numel() for p in gm.get_submodule("2").parameters())
    assert linear.macs_after < linear.macs_before
    assert 0.0 <= linear.nmse < 1.0
    assert method in str(report)
    assert gm(x).shape == (4, 10)
    assert isinstance(model[2], nn.Linear)  # the caller's model is untouched


def test_unknown_method_is_a_value_error():
    import fxfactorize as ff

    with pytest.raises(ValueError, match="method must be one of"):
        ff.plan(nn.Sequential(nn.Linear(512, 512)), torch.randn(2, 512), method="ttm")


def test_save_load_round_trips_a_tensorized_transform(tmp_path):
    import fxfactorize as ff

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.randn(4, 256)
    gm = ff.transform(model, x, method="tt", latent_features=32, progress=False)
    assert [r.method for r in gm.meta["fxfactorize"].factorized] == ["tt", "tt"]
    ff.save(gm, tmp_path / "saved")
    loaded = ff.load(tmp_path / "saved", model)
    gm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x))


def _exact_tt_error(weight: torch.Tensor, modes: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    """Relative squared error of the TT-SVD with exact (float64 LAPACK) truncated SVDs."""
    tensor = weight.detach().double().T.reshape(*modes)
    rest, left, lefts = tensor.reshape(-1), 1, []
    for size, rank in zip(modes[:-1], ranks[1:-1], strict=True):
        u, s, vh = torch.linalg.svd(rest.reshape(left * size, -1), full_matrices=False)
        lefts.append(u[:, :rank])
        rest, left = s[:rank, None] * vh[:rank], rank
    for u in reversed(lefts):
        rest = u @ rest.reshape(u.shape[1], -1)
    return float((rest.reshape(tensor.shape) - tensor).norm() ** 2 / tensor.norm() ** 2)


def test_tt_krylov_step_is_deterministic_and_near_the_exact_truncation():
    """The 512×512 middle unfolding (bond 70) goes through the randomized block Krylov split:
    two builds are bit-identical and the error is within 0.5 % of exact truncated SVDs'."""
    torch.manual_seed(10)
    linear = nn.Linear(512, 512)
    modes, ranks = (8, 8, 8), (1, 8, 64, 70, 64, 8, 1)
    layers = [
        FactorizedLinear.from_linear(
            linear,
            rank=ranks,
            in_tensorized_features=modes,
            out_tensorized_features=modes,
            factorization="tt",
        )
        for _ in range(2)
    ]
    for a, b in zip(layers[0].factors, layers[1].factors, strict=True):
        assert torch.equal(a, b)
    error = _relative_error(layers[0].get_weight(), linear.weight) ** 2
    exact = _exact_tt_error(linear.weight, modes + modes, ranks)
    assert error <= 1.005 * exact


@pytest.mark.parametrize("factorization", FORMATS)
def test_float32_path_matches_float64_path_error(factorization):
    """The same weight decomposed in float32 (float32 values) and float64 (a 1e-12 nudge makes
    them non-float32) reaches the same error, and repeated builds are bit-identical."""
    torch.manual_seed(11)
    linear = nn.Linear(64, 64)
    nudged = copy.deepcopy(linear).double()
    with torch.no_grad():
        nudged.weight.add_(1e-12 * torch.randn(64, 64, dtype=torch.float64))
    errors = []
    for source in (linear, linear, nudged):
        layer = FactorizedLinear.from_linear(
            source,
            rank=0.3,
            in_tensorized_features=(4, 4, 4),
            out_tensorized_features=(4, 4, 4),
            factorization=factorization,
        )
        errors.append(_relative_error(layer.get_weight(), source.weight))
        if len(errors) == 1:
            first = [f.detach().clone() for f in layer.factors]
        elif len(errors) == 2:
            assert all(torch.equal(a, b) for a, b in zip(first, layer.factors, strict=True))
    assert errors[0] == pytest.approx(errors[2], rel=1e-3)


def test_tt_krylov_step_recovers_a_low_rank_weight():
    """A weight of rank 20 runs the Krylov space out (its blocks fall inside the earlier ones);
    the split must still be an orthogonal projection, so a bond of 70 recovers the weight."""
    torch.manual_seed(12)
    linear = nn.Linear(512, 512)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(512, 20) @ torch.randn(20, 512) / 20)
    layer = FactorizedLinear.from_linear(
        linear,
        rank=(1, 8, 64, 70, 64, 8, 1),
        in_tensorized_features=(8, 8, 8),
        out_tensorized_features=(8, 8, 8),
        factorization="tt",
    )
    assert _relative_error(layer.get_weight(), linear.weight) < 1e-4


def test_cp_float32_fit_of_a_rank_one_weight_is_refined_past_float32_resolution():
    """Float32 sweeps cannot tell errors below ~1e-4 apart; a near-exact fit continues in
    float64, so an (over-parametrized) CP of a rank-1 float32 weight is recovered to float32
    precision."""
    torch.manual_seed(13)
    linear = nn.Linear(64, 64)
    a, b = (torch.kron(torch.kron(*torch.rand(2, 4) + 0.5), torch.rand(4) + 0.5) for _ in "ab")
    with torch.no_grad():
        linear.weight.copy_(torch.outer(a, b))  # CP rank 1: a and b are Kronecker products
    layer = FactorizedLinear.from_linear(
        linear,
        rank=0.25,
        in_tensorized_features=(4, 4, 4),
        out_tensorized_features=(4, 4, 4),
        factorization="cp",
    )
    assert _relative_error(layer.get_weight(), linear.weight) < 1e-6  # float32 sweeps: ~1e-5
