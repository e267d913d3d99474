"""`HealReport`: what :func:`fxfactorize.heal` did."""

from __future__ import annotations

import dataclasses

__all__ = ["HealReport"]


@dataclasses.dataclass
class HealReport:
    """What :func:`heal` did.

    Attributes:
        steps: all optimisation steps, local and end-to-end.
        local_steps: steps of the local phase (the rest were end-to-end).
        seconds: wall time of the whole call, evaluation included.
        loss: ``(first, last)`` end-to-end loss on the training batches (``None`` without
            end-to-end steps).
        trainable_params: number of parameters optimised.
        eval_loss: ``(before, after)`` mean loss on ``eval_batches`` (``None`` without them).
        history: the end-to-end loss at every end-to-end step.
        local_loss: per factorized layer, ``(first, last)`` normalized mse of the local phase.
        objective: the loss's name (``"kl"``, ``"mse"`` or the callable's ``__name__``).
        trainable: ``"factorized"`` or ``"all"``.
        prefix_nodes: graph nodes that depend on no trainable parameter and were computed once
            per batch instead of at every step (0: the whole student ran at every step).
        warnings: what a user must know about the result (also raised as
            :class:`~fxfactorize.errors.FactorizeWarning`): a held-out loss that got worse.

    >>> report = HealReport(10, 4, 0.5, (0.25, 0.125), 1000, eval_loss=(0.5, 0.25))
    >>> report.end_to_end_steps
    6
    >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
    heal: 10 steps (4 local, 6 end-to-end) in 0.50 s; 1,000 trainable parameters (factorized); loss kl
      end-to-end loss  0.25 → 0.125
      held-out loss    0.5 → 0.25 (-50.0%)
    """

    steps: int
    local_steps: int
    seconds: float
    loss: tuple[float, float] | None
    trainable_params: int
    eval_loss: tuple[float, float] | None = None
    history: list[float] = dataclasses.field(default_factory=list)
    local_loss: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    objective: str = "kl"
    trainable: str = "factorized"
    prefix_nodes: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def end_to_end_steps(self) -> int:
        """Steps of the end-to-end phase."""
        return self.steps - self.local_steps

    def __str__(self) -> str:
        lines = [
            f"heal: {self.steps} steps ({self.local_steps} local, {self.end_to_end_steps} "
            f"end-to-end) in {self.seconds:.2f} s; {self.trainable_params:,} trainable "
            f"parameters ({self.trainable}); loss {self.objective}"
        ]
        if self.local_loss:
            first = sum(a for a, _ in self.local_loss.values()) / len(self.local_loss)
            last = sum(b for _, b in self.local_loss.values()) / len(self.local_loss)
            worst = max(self.local_loss, key=lambda name: self.local_loss[name][1])
            lines.append(
                f"  local nmse       {first:.4g} → {last:.4g} (mean of {len(self.local_loss)} "
                f"layers; worst {worst}: {self.local_loss[worst][1]:.4g})"
            )
        if self.loss is not None:
            lines.append(f"  end-to-end loss  {self.loss[0]:.4g} → {self.loss[1]:.4g}")
        if self.eval_loss is not None:
            before, after = self.eval_loss
            change = f" ({(after - before) / before:+.1%})" if before > 0 else ""
            lines.append(f"  held-out loss    {before:.4g} → {after:.4g}{change}")
        if self.prefix_nodes:
            lines.append(
                f"  frozen prefix    {self.prefix_nodes} graph nodes computed once per batch"
            )
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)
