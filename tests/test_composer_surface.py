"""Composer's module surface: from_linear/from_conv2d, set_rank, apply_factorization, surgery."""

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.surgery import (
    count_module_instances,
    replace_module_classes,
    replace_params_in_optimizer,
    update_params_in_optimizer,
)


def low_rank_linear(d, m, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, m)
    with torch.no_grad():
        layer.weight.copy_(
            torch.randn(m, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
        )
    return layer


def test_from_linear_svd_keeps_a_low_rank_function_and_random_does_not():
    layer = low_rank_linear(64, 48, 6)
    x = torch.randn(10, 64)
    kept = ff.FactorizedLinear.from_linear(layer, latent_features=6)
    fresh = ff.FactorizedLinear.from_linear(layer, latent_features=6, init="random")
    assert torch.allclose(kept(x), layer(x), atol=1e-3)
    assert not torch.allclose(fresh(x), layer(x), atol=1e-1)
    with pytest.raises(ValueError, match="init"):
        ff.FactorizedLinear.from_linear(layer, init="zeros")


def test_from_conv2d_keeps_geometry_and_groups():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=2, groups=4, padding_mode="circular")
    with torch.no_grad():  # rank 1 per group
        conv.weight.copy_(
            (torch.randn(4, 3, 1, generator=gen) @ torch.randn(4, 1, 18, generator=gen)).reshape(
                12, 2, 3, 3
            )
        )
    pair = ff.FactorizedConv2d.from_conv2d(conv, latent_channels=4)
    x = torch.randn(2, 8, 9, 9)
    assert (
        pair.module0.groups == pair.module1.groups == 4 and pair.module0.padding_mode == "circular"
    )
    assert torch.allclose(pair(x), conv(x), atol=1e-4)


def test_set_rank_is_optimal_on_the_input_and_only_lowers_rank():
    layer = ff.FactorizedLinear.from_linear(nn.Linear(64, 64), latent_features=16)
    x = torch.randn(200, 64, dtype=torch.float32)
    y = layer(x).detach()
    solution = layer.solution_for_rank(x, 8)
    assert layer.latent_features == 16  # solution_for_rank changes nothing
    layer.set_rank(x, 8)
    assert layer.latent_features == 8 and layer.module0.weight.shape == (8, 64)
    measured = float(((layer(x).detach() - y) ** 2).mean() / y.var())
    assert measured == pytest.approx(solution.nmse, rel=1e-3)
    with pytest.raises(ValueError, match="exceeds the current rank"):
        layer.set_rank(x, 12)


def test_conv_set_rank_reduces_latent_channels():
    conv = ff.FactorizedConv2d(16, 16, 3, latent_channels=8, padding=1, stride=2)
    x = torch.randn(2, 16, 8, 8)
    conv.set_rank(x, 4)
    assert conv.latent_channels == 4 and conv(x).shape == (2, 16, 4, 4)


def test_apply_factorization_in_place_with_thresholds_and_optimizer():
    model = nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 8)
    )
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 64, 4, 4)
    before = model(x)
    ff.apply_factorization(
        model,
        min_channels=64,
        latent_channels=0.25,
        min_features=64,
        latent_features=32,
        optimizers=optimizer,
    )
    assert [type(m).__name__ for m in model] == [
        "FactorizedConv2d",
        "Flatten",
        "FactorizedLinear",
        "Linear",
    ]
    assert model[0].latent_channels == 16 and model[2].latent_features == 32
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.parameters()
    }
    assert model(x).shape == before.shape
    ff.apply_factorization(
        model, min_channels=8, min_features=8, latent_features=4
    )  # pairs are left alone
    assert type(model[2].module0).__name__ == "Linear"
    with pytest.raises(ValueError, match="latent_features"):
        ff.apply_factorization(model, latent_features=1.5)


def test_surgery_helpers_follow_composer():
    module = nn.Sequential(nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Linear(16, 4))
    policies = {
        nn.Conv2d: lambda m, i: nn.Linear(16, 32),
        nn.Linear: lambda m, i: nn.Linear(32, 64) if m.in_features == 16 else None,
    }
    replaced = replace_module_classes(module, policies, recurse_on_replacements=True)
    assert len(replaced) == 3 and module[0].out_features == 64 and module[2].out_features == 64
    assert count_module_instances(module, nn.Linear) == 2
    assert count_module_instances(module, (nn.Linear, nn.ReLU)) == 3

    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [old.weight]}, {"params": [old.bias], "lr": 1.0}], lr=0.1)
    replace_params_in_optimizer(old.parameters(), new.parameters(), opt)
    assert (
        opt.param_groups[0]["params"][0] is new.weight
        and opt.param_groups[1]["params"][0] is new.bias
    )
    with pytest.raises(RuntimeError, match="split across"):
        update_params_in_optimizer(new.parameters(), [], opt)
    with pytest.raises(RuntimeError, match="new_params has"):
        replace_params_in_optimizer(new.parameters(), [], opt)
    with pytest.raises(NotImplementedError):
        update_params_in_optimizer(new.parameters(), [], [opt, opt])
