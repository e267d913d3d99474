"""`apply_factorization`: Composer's functional module surgery (no tracing), in place."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fxfactorize.core.latent import resolve_latent_size, validate_latent_size
from fxfactorize.modules import (
    FactorizedConv2d,
    FactorizedLinear,
    FactorizedPair,
    factorizing_could_speedup,
)
from fxfactorize.sharing import tied_layers
from fxfactorize.surgery import replace_module_classes

__all__ = ["apply_factorization"]

log = logging.getLogger("fxfactorize")


def apply_factorization(
    model: nn.Module,
    factorize_convs: bool = True,
    factorize_linears: bool = True,
    min_channels: int = 512,
    latent_channels: int | float = 0.25,
    min_features: int = 512,
    latent_features: int | float = 0.25,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    init: str = "svd",
) -> None:
    """Replace ``model``'s ``Linear``/``Conv2d`` layers by factorized pairs, in place (Composer's API).

    A Linear is replaced when ``min(in, out) >= min_features`` and the pair at
    ``latent_features`` has fewer multiply-adds; a Conv2d likewise with ``min_channels`` and
    ``latent_channels``. Latent sizes are an int (a rank) or a fraction of ``min(in, out)``.
    Unlike :func:`fxfactorize.transform` no tracing is done, so any model works, and no data is
    used: ``init="svd"`` keeps each trained layer's function as well as the rank allows
    (truncated SVD), ``init="random"`` re-initialises the pairs as Composer does. Layers inside
    already factorized pairs are left alone, and so are layers whose parameter is tied to another
    module (an output layer sharing an embedding's weight: replacing it would untie them). A
    layer reachable under several names gets one replacement, set under every name.
    ``optimizers`` (one) has the replaced parameters swapped for the new ones in the same param
    group. Defaults are Composer's.

    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> apply_factorization(model, min_features=32, latent_features=16)
    >>> type(model[0]).__name__, type(model[2]).__name__
    ('FactorizedLinear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random'; got {init!r}")
    validate_latent_size(latent_channels, "latent_channels")
    validate_latent_size(latent_features, "latent_features")
    left_alone = {
        id(child)
        for module in model.modules()
        if isinstance(module, FactorizedPair)
        for child in module.modules()
    }
    for name, reason in tied_layers(model).items():
        log.info("apply_factorization leaves %s alone: %s", name, reason)
        left_alone.add(id(model.get_submodule(name)))

    def linear_policy(module: nn.Module, index: int) -> nn.Module | None:
        if id(module) in left_alone or type(module) is not nn.Linear:
            return None
        if min(module.in_features, module.out_features) < min_features:
            return None
        if not factorizing_could_speedup(module, latent_features):
            return None
        rank = resolve_latent_size(latent_features, module.in_features, module.out_features)
        return FactorizedLinear.from_linear(module, index, init=init, latent_features=rank)

    def conv_policy(module: nn.Module, index: int) -> nn.Module | None:
        if id(module) in left_alone or type(module) is not nn.Conv2d:
            return None
        if min(module.in_channels, module.out_channels) < min_channels:
            return None
        if not factorizing_could_speedup(module, latent_channels):
            return None
        rank = resolve_latent_size(latent_channels, module.in_channels, module.out_channels)
        if rank < module.groups:
            return None
        return FactorizedConv2d.from_conv2d(module, index, init=init, latent_channels=rank)

    policies = {}
    if factorize_linears:
        policies[nn.Linear] = linear_policy
    if factorize_convs:
        policies[nn.Conv2d] = conv_policy
    replaced = replace_module_classes(model, policies, optimizers=optimizers)
    log.info("apply_factorization replaced %d layer(s)", len(replaced))
