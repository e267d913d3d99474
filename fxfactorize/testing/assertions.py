"""`assert_factorization_equivalent`: factorize a model and check the result, in one call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import fx, nn

from fxfactorize.api import transform
from fxfactorize.equivalence import Tolerance, check_equivalence

__all__ = ["assert_factorization_equivalent"]


def assert_factorization_equivalent(
    model: nn.Module,
    example_inputs: Any,
    *,
    tolerance: Tolerance | None = None,
    calibration: Any = None,
    max_examples: int = 20,
    seed: int | None = None,
    batch_dim: int = 0,
    **config: Any,
) -> fx.GraphModule:
    """``transform(model, example_inputs, **config)``, then :func:`check_equivalence` against ``model``.

    Returns the transformed ``GraphModule``; raises :class:`~fxfactorize.equivalence.EquivalenceError`
    with a shrunk counterexample if it disagrees with ``model``: by default every factorized layer
    must be the optimum for its rank and the rest of the graph must match exactly (see
    :func:`~fxfactorize.check_equivalence`); with ``tolerance``, the outputs must agree within it.
    ``calibration`` goes to both ``transform`` and the check (a one-shot iterator is read into a
    list first). Progress bars are off unless ``progress=True`` is passed.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> gm = assert_factorization_equivalent(model, torch.randn(4, 32), min_features=1, latent_features=8, max_examples=5, seed=0)
    >>> [r.rank for r in gm.meta["fxfactorize"].layers]  # the 32→8 layer would not get cheaper
    [8, None]
    """
    config.setdefault("progress", False)
    if isinstance(calibration, Iterator):  # the check reads the batches again
        calibration = list(calibration)
    candidate = transform(model, example_inputs, calibration=calibration, **config)
    check_equivalence(
        model,
        candidate,
        example_inputs,
        tolerance=tolerance,
        calibration=None if tolerance is not None else calibration,
        max_examples=max_examples,
        seed=seed,
        batch_dim=batch_dim,
    )
    return candidate
