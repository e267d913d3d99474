"""Healing: distillation of a factorized model (the student) toward the original (the teacher).

:func:`heal` runs a local phase (each factorized layer fits the teacher's layer of the same name)
then end-to-end distillation, and returns a :class:`HealReport`. The parts:

- :mod:`~fxfactorize.healing.losses`: the ``"kl"`` and ``"mse"`` losses over structured outputs;
- :mod:`~fxfactorize.healing.local`: the layer-by-layer phase;
- :mod:`~fxfactorize.healing.prefix`: the frozen prefix of a GraphModule, computed once per batch;
- :mod:`~fxfactorize.healing.runs`: the batches, and the forward passes kept per batch;
- :mod:`~fxfactorize.healing.report`: :class:`HealReport`;
- :mod:`~fxfactorize.healing.distill`: :func:`heal` itself.

>>> from fxfactorize.healing import heal, HealReport
>>> heal.__name__, HealReport.__name__
('heal', 'HealReport')
"""

from fxfactorize.healing.distill import heal
from fxfactorize.healing.report import HealReport

__all__ = ["HealReport", "heal"]
