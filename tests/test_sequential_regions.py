"""What ``propagate_error=True`` computes, and what it spares: on a model that traces only in parts
the regions' inputs come from one forward pass per batch, paused at each region (not from
re-running the model for every region); layers fed the same values share one summation; the
original inputs' statistics of the planning pass are not summed again. Each with the same
result as the plain route."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.passes import region_inputs

OPTIONS = dict(
    min_features=0,
    latent_features=0.25,
    cost_model="macs",
    propagate_error=True,
    sensitivity=False,
    shrinkage=0.0,
    progress=False,
    predict_latency=False,
)


class _Blocks(nn.Module):
    """A root that does not trace (data-dependent control flow) over two traced blocks and a bare
    Linear between them; ``again`` calls the first block a second time at the end."""

    def __init__(self, again: bool = False) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32))
        self.middle = nn.Linear(32, 32)
        self.last = nn.Sequential(nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16))
        self.again = again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = self.last(torch.tanh(self.middle(self.first(x))))
            if self.again:
                x = self.first(x)
        return x


def _transform(model: nn.Module, batches: list[torch.Tensor], calls: list[int]) -> nn.Module:
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        return ff.transform(model, batches[0], calibration=batches, **OPTIONS)
    finally:
        counter.remove()


def _rerun_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(region_inputs.PausedRuns, "inputs_of", lambda self, region, root: None)


@pytest.mark.parametrize("again", [False, True])
def test_paused_runs_give_what_rerunning_the_model_per_region_gives(again, monkeypatch):
    torch.manual_seed(0)
    model = _Blocks(again)
    batches = [torch.randn(24, 16) for _ in range(3)]
    held_out = torch.randn(64, 16)
    paused_calls: list[int] = []
    paused = _transform(copy.deepcopy(model), batches, paused_calls)
    assert isinstance(ff.report_of(paused), ff.PartialReport)
    assert len(ff.report_of(paused).factorized) == 5
    _rerun_only(monkeypatch)
    rerun_calls: list[int] = []
    rerun = _transform(copy.deepcopy(model), batches, rerun_calls)
    for (name, a), (_, b) in zip(
        paused.state_dict().items(), rerun.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(paused(held_out), rerun(held_out), atol=1e-6)
    # three regions with layers, three batches: re-running costs a pass per region and batch
    # (cut short at the region); a model that calls them in order is run once per batch. With
    # `first` called again at the end, the first paused run stops at `middle` before `first`'s
    # last call: the pass falls back to re-running, one cut-short run later.
    saved = len(rerun_calls) - len(paused_calls)
    assert saved == (-1 if again else 2 * len(batches))


def test_layers_fed_the_same_values_share_one_paired_summation(monkeypatch):
    from fxfactorize.core.moments import PairedMoments

    class QueryKeyOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.q(x) * self.k(x)))

    torch.manual_seed(2)
    batches = [torch.randn(20, 16) for _ in range(2)]
    updates: list[int] = []
    real = PairedMoments.update
    monkeypatch.setattr(
        PairedMoments, "update", lambda self, *rows: (updates.append(1), real(self, *rows))[1]
    )
    gm = ff.transform(QueryKeyOut(), batches[0], calibration=batches, **OPTIONS)
    report = ff.report_of(gm)
    assert {record.target for record in report.factorized} == {"q", "k", "out"}
    assert len(updates) == 2 * 2 * len(batches)  # {q, k} and out; two folds per batch
    q, k = gm.q, gm.k
    assert q.module0.weight.data_ptr() != k.module0.weight.data_ptr()


def test_the_original_inputs_statistics_of_the_planning_pass_are_reused_exactly(monkeypatch):
    from fxfactorize.core.moments import InputMoments
    from fxfactorize.passes import pipeline

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)
    )
    batches = [torch.randn(30, 16) for _ in range(3)]
    options = {**OPTIONS, "budget": 0.6, "shrinkage": "auto"}
    del options["latent_features"]

    def run() -> tuple[nn.Module, int]:
        updates: list[int] = []
        real = InputMoments.update
        with monkeypatch.context() as patch:
            patch.setattr(
                InputMoments, "update", lambda self, rows: (updates.append(1), real(self, rows))[1]
            )
            gm = ff.transform(copy.deepcopy(model), batches[0], calibration=batches, **options)
        return gm, len(updates)

    reused, reused_updates = run()
    solve = pipeline.solve_sequentially
    monkeypatch.setattr(
        pipeline,
        "solve_sequentially",
        lambda *args, original_folds=None, **kwargs: solve(*args, **kwargs),
    )
    summed, summed_updates = run()
    factorized = len(ff.report_of(reused).factorized)
    assert factorized >= 2
    assert summed_updates - reused_updates == factorized * 2 * len(batches)  # per fold and batch
    for (name, a), (_, b) in zip(
        reused.state_dict().items(), summed.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
    nmse = [
        (r.nmse, s.nmse)
        for r, s in zip(
            ff.report_of(reused).factorized, ff.report_of(summed).factorized, strict=True
        )
    ]
    assert all(abs(a - b) <= 1e-9 + 1e-6 * abs(b) for a, b in nmse)
