"""Hypothesis strategy of model inputs shaped after example inputs (see
:mod:`fxfactorize.input_strategies`, where it lives so the equivalence check can stand on it)."""

from fxfactorize.input_strategies import describe_inputs, inputs_for, probe_dtypes

__all__ = ["describe_inputs", "inputs_for", "probe_dtypes"]
