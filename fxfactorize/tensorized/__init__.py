"""TensorLy-Torch-compatible tensorized layers: a Linear held in CP, Tucker, TT or blockTT form.

>>> import torch
>>> from fxfactorize.tensorized import FactorizedLinear
>>> layer = FactorizedLinear.from_linear(torch.nn.Linear(256, 256), rank=0.25, factorization="tucker")
>>> layer.factorization, layer.in_tensorized_features
('tucker', (4, 8, 8))
"""

from fxfactorize.tensorized.contract import cheapest_order, contract
from fxfactorize.tensorized.decompose import decompose
from fxfactorize.tensorized.layer import IMPLEMENTATIONS, FactorizedLinear
from fxfactorize.tensorized.ranks import resolve_ranks
from fxfactorize.tensorized.structure import FORMATS, Structure
from fxfactorize.tensorized.tensorize import tensorize_features

__all__ = [
    "FORMATS",
    "IMPLEMENTATIONS",
    "FactorizedLinear",
    "Structure",
    "cheapest_order",
    "contract",
    "decompose",
    "resolve_ranks",
    "tensorize_features",
]
