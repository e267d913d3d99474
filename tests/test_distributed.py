"""transform and heal across 2 and 3 gloo processes on localhost: each rank gets a share of the
batches and ends with the plan and weights of one process on all of them, bitwise alike on every
rank; a failing rank makes every rank raise, naming it.

Each group size is spawned once (a module-scoped fixture): every rank runs all scenarios and
saves what it got; the tests compare those files with single-process runs made here.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxfactorize as ff
from fxfactorize.costmodels import DeviceProfile, set_device_profile

WIDTH = 32
BATCHES = 7  # uneven shares (4+3, 3+2+2): later ranks' folds start at odd call indices
OPTIONS = {
    "progress": False,
    "cost_model": "macs",
    "min_features": 16,
    "min_channels": 8,
    "latent_features": 8,
}
#: What each scenario passes to transform besides the model's own options.
SCENARIOS = {
    "mlp": {"budget": 0.6, "shrinkage": "auto"},  # plan from statistics and gains; CV on folds
    "mlp-sequential": {"propagate_error": True, "shrinkage": "auto"},
    "cnn": {"latent_channels": 0.5},
    "cnn-sequential": {"latent_channels": 0.5, "propagate_error": True},
    "untraceable": {"tolerance": 0.05},
    "untraceable-sequential": {"propagate_error": True, "shrinkage": "auto"},
}
HEAL_STEPS = 4
TIMEOUT_S = 30  # the process group's timeout: no collective waits longer


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU()
    )
    model.append(nn.Linear(2 * WIDTH, WIDTH))
    with torch.no_grad():  # decaying spectra, so the rank policies tell layers apart
        for index, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            u, _, v = torch.linalg.svd(layer.weight, full_matrices=False)
            decay = torch.exp(-torch.arange(u.shape[1], dtype=torch.float32) / (4 + 6 * index))
            layer.weight.copy_(u @ torch.diag(decay) @ v)
    return model


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


class Gate(nn.Module):
    """An MLP behind a data-dependent branch: torch.fx cannot trace the root."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        if x.sum() > -1e9:
            return self.body(x)
        return x


def model_and_batches(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    if name.startswith("cnn"):
        batches = [torch.randn(3, 8, 6, 6, generator=generator) for _ in range(BATCHES)]
        return cnn(), batches
    mixing = torch.randn(WIDTH, WIDTH, generator=generator) / 4
    batches = [torch.randn(10, WIDTH, generator=generator) @ mixing for _ in range(BATCHES)]
    return (Gate() if name.startswith("untraceable") else mlp()), batches


def share(items: list, rank: int, size: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (the first ranks get one more)."""
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def outcome(result: nn.Module) -> dict:
    report = ff.report_of(result)
    return {
        "plan": [(r.target, r.rank, r.shrinkage) for r in report.layers],
        "state": {k: v.detach().clone() for k, v in result.state_dict().items()},
    }


def heal_data() -> tuple[nn.Module, nn.Module, list[list[torch.Tensor]]]:
    """A factorized student, its teacher, and per step one batch per rank (3 ranks at most)."""
    teacher = mlp()
    options = {**OPTIONS, "latent_features": 4, "distributed": False}
    student = ff.transform(teacher, torch.randn(2, WIDTH), **options)
    generator = torch.Generator().manual_seed(2)
    steps = [[torch.randn(4, WIDTH, generator=generator) for _ in range(3)] for _ in range(3)]
    return student, teacher, steps


def mean_squared(student_output, teacher_output):
    return (student_output - teacher_output).pow(2).mean()


def _scenarios(rank: int, size: int, group) -> dict:
    """Every scenario on this rank of ``group`` (``size`` ranks; ``None``: the world)."""
    run = {"process_group": group}
    results: dict = {}
    for name, options in SCENARIOS.items():
        model, batches = model_and_batches(name)
        mine = share(batches, rank, size)
        result = ff.transform(model, batches[0], calibration=mine, **OPTIONS, **options, **run)
        results[name] = outcome(result)

    # rank 0's plan is every rank's: the other ranks' machine profile says "not faster"
    launch_s = 0.0 if rank == 0 else 1.0  # a second per call: a pair is never faster
    set_device_profile(DeviceProfile(flops_per_s=5e10, bytes_per_s=1e10, launch_s=launch_s))
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    example = torch.randn(64, 256)
    options = {"min_features": 64, "latent_features": 32, "progress": False}
    alone = ff.transform(model, example, distributed=False, **options)
    results["latency"] = {
        "together": [
            r.rank for r in ff.report_of(ff.transform(model, example, **options, **run)).layers
        ],
        "alone": [r.rank for r in ff.report_of(alone).layers],
    }

    student, teacher, steps = heal_data()
    ff.heal(
        student,
        teacher,
        [step[rank] for step in steps],
        steps=HEAL_STEPS,
        lr=1e-2,
        loss=mean_squared,
        local_steps=0,
        progress=False,
        process_group=group,
    )
    results["heal"] = {k: v.clone() for k, v in student.state_dict().items()}

    # a rank that fails: its batch holds NaN; every rank must raise, naming it
    model, batches = model_and_batches("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mine = [batch.clone() for batch in share(batches, rank, size)]
    if rank == size - 1:
        mine[-1][0, 0] = float("nan")
    started = time.monotonic()
    try:
        ff.transform(model, batches[0], calibration=mine, inplace=True, **OPTIONS, **run)
        results["failure"] = {"error": None}
    except Exception as error:
        results["failure"] = {
            "error": type(error).__name__,
            "message": str(error),
            "ranks": getattr(error, "ranks", None),
            "seconds": time.monotonic() - started,
        }
    after = model.state_dict()
    results["failure"]["untouched"] = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before
    )
    return results


def _job(rank: int, port: int, folder: str) -> None:
    """Rank ``rank`` of 3: every scenario with the 3 ranks, then with ranks 0 and 1 in a group of
    their own (the ``process_group=`` argument), each rank's results saved to ``folder``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=timeout)
    pair = dist.new_group([0, 1], timeout=timeout)  # every rank takes part in making it
    results: dict = {}
    try:
        results[3] = _scenarios(rank, 3, None)
        if rank < 2:
            results[2] = _scenarios(rank, 2, pair)
    finally:
        with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as file:
            pickle.dump(results, file)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(folder: str, size: int = 3, limit_s: float = 300.0) -> list[dict]:
    context = mp.start_processes(
        _job, args=(_free_port(), folder), nprocs=size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{size} ranks did not finish within {limit_s} s")
    results = []
    for rank in range(size):
        with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as file:
            results.append(pickle.load(file))
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    """What each of 3 spawned ranks got (one spawn for the module: processes start slowly)."""
    return run_ranks(str(tmp_path_factory.mktemp("ranks")))


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, spawned) -> list[dict]:
    """Per rank, what it got in a group of 2 (a subgroup) or 3 (the world)."""
    return [found[request.param] for found in spawned[: request.param]]


@pytest.fixture(scope="module")
def single() -> dict:
    """Each scenario in one process on all the batches."""
    found = {}
    for name, options in SCENARIOS.items():
        model, batches = model_and_batches(name)
        found[name] = outcome(
            ff.transform(model, batches[0], calibration=batches, **OPTIONS, **options)
        )
    return found


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_gets_the_plan_and_weights_of_one_process_on_all_batches(ranks, single, name):
    want = single[name]
    assert any(rank is not None for _, rank, _ in want["plan"])  # something was factorized
    for got in ranks:
        assert got[name]["plan"] == want["plan"]
        assert got[name]["state"].keys() == want["state"].keys()
        for key, value in want["state"].items():
            assert relative_error(got[name]["state"][key], value) <= 1e-6, key


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_weights_are_bitwise_identical_on_every_rank(ranks, name):
    first = ranks[0][name]["state"]
    for other in ranks[1:]:
        assert all(torch.equal(first[key], other[name]["state"][key]) for key in first)


def test_rank_0s_plan_is_every_ranks_even_when_their_machines_disagree(ranks):
    agreed = ranks[0]["latency"]["alone"]
    assert any(rank is not None for rank in agreed)
    for got in ranks:
        assert got["latency"]["together"] == agreed
    assert ranks[1]["latency"]["alone"] != agreed  # the other machine alone decides otherwise


def test_heal_averages_gradients_over_the_ranks(ranks):
    student, teacher, steps = heal_data()
    size = len(ranks)
    union = [torch.cat(step[:size]) for step in steps]  # one process, every rank's batch at once
    ff.heal(
        student,
        teacher,
        union,
        steps=HEAL_STEPS,
        lr=1e-2,
        loss=mean_squared,
        local_steps=0,
        progress=False,
    )
    untrained = heal_data()[0].state_dict()
    want = student.state_dict()
    for got in ranks:
        for key, value in want.items():
            assert torch.equal(got["heal"][key], ranks[0]["heal"][key]), key
            assert relative_error(got["heal"][key], value) <= 1e-5, key
    assert any(not torch.equal(want[key], untrained[key]) for key in want)  # it trained


def test_a_failing_rank_makes_every_rank_raise_naming_it(ranks):
    failing = len(ranks) - 1
    for got in ranks:
        failure = got["failure"]
        assert failure["error"] == "DistributedError", failure
        assert failure["ranks"] == [failing]
        assert re.search(rf"rank {failing} failed during .*calibration", failure["message"])
        assert failure["seconds"] < TIMEOUT_S
        assert failure["untouched"]
    assert "NaN or Inf" in ranks[0]["failure"]["message"]  # the failing rank's own error


def test_distributed_false_and_a_process_group_without_one_are_checked():
    with pytest.raises(ValueError, match="distributed must be a bool"):
        ff.FactorizeConfig(distributed="yes")
    with pytest.raises(ValueError, match="process_group"):
        ff.transform(nn.Linear(4, 4), torch.ones(1, 4), process_group=object(), progress=False)
