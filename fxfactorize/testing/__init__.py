"""Hypothesis strategies and assertions for testing factorized models, here and downstream.

Strategies speak the library's vocabulary: :func:`linear_layers`, :func:`conv2d_layers`,
:func:`models` (small random DAGs torch.fx traces), :func:`inputs_for` (inputs shaped after example
inputs) and :func:`low_rank_weights`; :func:`assert_factorization_equivalent` transforms a model and
checks the result with :func:`~fxfactorize.check_equivalence`.

No pytest plugin is registered: the kit has no fixture to offer, and a plugin that installed
Hypothesis profiles would override the downstream project's own.
"""

from fxfactorize.testing.assertions import assert_factorization_equivalent
from fxfactorize.testing.inputs import describe_inputs, inputs_for
from fxfactorize.testing.layers import conv2d_layers, linear_layers, low_rank_weights
from fxfactorize.testing.models import DrawnModel, RandomDAG, models

__all__ = [
    "DrawnModel",
    "RandomDAG",
    "assert_factorization_equivalent",
    "conv2d_layers",
    "describe_inputs",
    "inputs_for",
    "linear_layers",
    "low_rank_weights",
    "models",
]
