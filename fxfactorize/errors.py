"""Exceptions raised by fxfactorize; each names what the caller has to fix."""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "DistributedError",
    "FactorizeError",
    "FactorizeWarning",
    "ShapePropagationError",
    "TraceError",
]


class FactorizeError(RuntimeError):
    """Base class of the errors fxfactorize raises about a model (not about an argument)."""


class FactorizeWarning(UserWarning):
    """Something a user must know about a result (also listed in its report's ``warnings``): a
    budget that cannot be met, too little calibration data, ..."""


class TraceError(FactorizeError):
    """``torch.fx.symbolic_trace`` could not trace a module.

    ``module_class`` is the class of the module that failed and ``reason`` torch.fx's own message.
    """

    def __init__(self, module_class: str, reason: str, qualified_name: str = "") -> None:
        self.module_class = module_class
        self.reason = reason
        self.qualified_name = qualified_name
        where = f" at {qualified_name!r}" if qualified_name else ""
        super().__init__(f"cannot trace {module_class}{where} with torch.fx: {reason}")


class ShapePropagationError(FactorizeError):
    """Running the example inputs through the traced graph failed at one node."""

    def __init__(self, node_name: str, target: str, reason: str) -> None:
        self.node_name = node_name
        self.target = target
        self.reason = reason
        super().__init__(
            f"shape propagation failed at graph node {node_name!r} (target {target}): {reason}"
        )


class CalibrationError(FactorizeError):
    """A calibration batch could not be run through the model; ``batch_index`` says which one."""

    def __init__(self, batch_index: int, reason: str) -> None:
        self.batch_index = batch_index
        self.reason = reason
        super().__init__(f"calibration batch {batch_index} does not fit the model: {reason}")


class DistributedError(FactorizeError):
    """One or more ranks of a process group failed during ``step``; ``failures`` maps each failed
    rank to its error, ``ranks`` lists them. Raised on every rank, so none waits for the others.

    >>> print(DistributedError("calibration", {1: "ValueError: NaN in batch 0"}))
    rank 1 failed during calibration: ValueError: NaN in batch 0
    """

    def __init__(self, step: str, failures: dict[int, str]) -> None:
        self.step = step
        self.failures = dict(failures)
        self.ranks = sorted(failures)
        super().__init__(
            "; ".join(f"rank {rank} failed during {step}: {failures[rank]}" for rank in self.ranks)
        )
