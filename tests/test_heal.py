"""ff.heal: distillation of a factorized student toward the original model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxfactorize as ff
from fxfactorize.healing.local import factorized_layers
from fxfactorize.healing.losses import kl_loss, mse_loss, output_leaves
from fxfactorize.healing.prefix import split_frozen_prefix
from fxfactorize.modules import FactorizedLinear

# ---------------------------------------------------------------------------------------------
# models and data


def _factorize(model: nn.Module, example: torch.Tensor, **overrides) -> nn.Module:
    return ff.transform(model, example, cost_model="macs", progress=False, **overrides)


@pytest.fixture(scope="module")
def digits():
    """A 64→128→128→10 MLP trained on sklearn's digits, and held-out data."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    train, test = order[:1400], order[1400:1796]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        rows = train[(step * 128) % 1400 :][:128]
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    model.eval()
    accuracy = (model(x[test]).argmax(1) == y[test]).float().mean()
    assert accuracy > 0.9  # the teacher is a real model
    return model, x[train], x[test], y[test]


class CNN(nn.Module):
    """Two frozen conv/BN blocks, then a conv that gets factorized, dropout and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(self.drop(x.mean((2, 3))))


def _cnn_pair(batches: int = 3) -> tuple[nn.Module, fx.GraphModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = CNN()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        teacher.train()(torch.randn(16, 3, 8, 8) * 2 + 1)
    teacher.eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(batches)]
    student = _factorize(teacher, data[0], min_channels=32, latent_channels=4)
    assert isinstance(student.get_submodule("conv3"), ff.FactorizedConv2d)
    assert not isinstance(student.get_submodule("conv2"), ff.FactorizedConv2d)
    return teacher, student, data


def _mlp_pair(out: int = 10) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, out))
    data = [torch.randn(16, 32) for _ in range(3)]
    student = _factorize(teacher, data[0], min_features=32, latent_features=4)
    return teacher, student, data


class Wrapper(nn.Module):
    """Hides a GraphModule behind a plain module: heal then runs the whole model at every step."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        log_s = F.log_softmax(student(x), -1)
        log_t = F.log_softmax(teacher(x), -1)
    return float(F.kl_div(log_s, log_t, log_target=True, reduction="batchmean"))


# ---------------------------------------------------------------------------------------------
# healing works


def test_heal_reduces_the_held_out_error_of_a_trained_model(digits):
    teacher, train, test, labels = digits
    student = _factorize(teacher, train[:8], min_features=64, latent_features=4)
    assert len(factorized_layers(student)) == 2
    before = _kl(student, teacher, test)
    batches = list(train[:1024].split(128))
    report = ff.heal(
        student, teacher, batches, steps=150, lr=3e-3, eval_batches=test.split(198), progress=False
    )
    after = _kl(student, teacher, test)  # measured here, not taken from the report
    assert after < 0.5 * before, (before, after)
    assert report.eval_loss[1] < 0.5 * report.eval_loss[0]
    assert report.eval_loss[0] == pytest.approx(before, rel=1e-4)  # equal-size eval batches
    assert report.local_steps == 50 and len(report.history) == 100  # default: min(steps//2, 50)
    assert report.loss == (report.history[0], report.history[-1])
    assert all(last < first for first, last in report.local_loss.values())
    agree = (student(test).argmax(1) == teacher(test).argmax(1)).float().mean()
    assert agree > 0.9
    assert "held-out loss" in str(report)


def test_local_phase_alone_fits_each_layer_to_the_teachers(digits):
    teacher, train, _, _ = digits
    student = _factorize(teacher, train[:8], min_features=64, latent_features=4)
    report = ff.heal(
        student, teacher, train[:256], steps=30, local_steps=30, lr=3e-3, progress=False
    )
    assert report.loss is None and report.history == []
    assert set(report.local_loss) == {"0", "2"}
    for first, last in report.local_loss.values():
        assert last < 0.8 * first


def test_a_worse_held_out_loss_is_a_warning_in_the_report():
    teacher, student, data = _mlp_pair()
    with pytest.warns(ff.FactorizeWarning, match="raised the held-out loss"):
        report = ff.heal(
            student, teacher, data[0][:2], steps=40, lr=0.3, eval_batches=data[1:], progress=False
        )  # two rows and a large lr: overfits
    assert report.eval_loss[1] > report.eval_loss[0]
    assert "warning: healing raised the held-out loss" in str(report)


def test_generator_batches_are_read_once_and_cycled():
    teacher, student, data = _mlp_pair()
    report = ff.heal(
        student, teacher, (x for x in data), steps=9, local_steps=3, lr=1e-3, progress=False
    )
    assert len(report.history) == 6


# ---------------------------------------------------------------------------------------------
# what must not change


def test_teacher_is_untouched_and_run_in_eval_mode_without_grad():
    teacher, student, data = _cnn_pair()
    teacher.train()
    teacher.bn1.eval()  # a mixed pattern of flags, restored as it was
    teacher.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    modes = {n: m.training for n, m in teacher.named_modules()}
    seen = []
    teacher.fc.register_forward_hook(
        lambda m, a, o: seen.append((m.training, torch.is_grad_enabled()))
    )
    ff.heal(
        student, teacher, data, steps=12, local_steps=4, lr=1e-2, trainable="all", progress=False
    )
    assert seen and set(seen) == {(False, False)}
    after = teacher.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert flags == {n: p.requires_grad for n, p in teacher.named_parameters()}
    assert modes == {n: m.training for n, m in teacher.named_modules()}
    assert all(p.grad is None for p in teacher.parameters())


def test_batchnorm_statistics_do_not_change_and_dropout_is_off():
    teacher, student, data = _cnn_pair()
    student.train()
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    dropout_modes = []
    student.drop.register_forward_pre_hook(lambda m, a: dropout_modes.append(m.training))
    report = ff.heal(
        student, teacher, data, steps=12, local_steps=4, lr=1e-2, trainable="all", progress=False
    )
    assert dropout_modes and not any(dropout_modes)
    assert buffers.keys() == dict(student.named_buffers()).keys()
    assert all(torch.equal(buffers[k], v) for k, v in student.named_buffers())
    assert all(m.training for m in student.modules())  # flags restored
    assert not torch.equal(student.bn1.weight, torch.ones(16))  # its affine parameters trained
    assert all(p.grad is None for p in student.parameters())  # heal leaves no gradients behind
    assert report.trainable_params == sum(p.numel() for p in student.parameters())


def test_trainable_factorized_leaves_every_other_parameter_bitwise_equal():
    teacher, student, data = _cnn_pair()
    student.fc.bias.requires_grad_(False)
    factorized = {n for n, _ in student.conv3.named_parameters(prefix="conv3")}
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    report = ff.heal(student, teacher, data, steps=10, lr=1e-2, progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(state[n], p)}
    assert changed == factorized
    assert flags == {n: p.requires_grad for n, p in student.named_parameters()}
    assert report.trainable_params == sum(p.numel() for p in student.conv3.parameters())


def test_trainable_all_trains_the_other_parameters_too():
    teacher, student, data = _cnn_pair()
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    ff.heal(student, teacher, data, steps=10, lr=1e-2, trainable="all", progress=False)
    for name in ("conv1.weight", "bn2.bias", "fc.weight", "conv3.module0.weight"):
        assert not torch.equal(state[name], student.get_parameter(name)), name


def test_an_error_restores_the_student():
    teacher, student, data = _mlp_pair()
    state = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    calls = []

    def failing(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return mse_loss(s, t)

    with pytest.raises(RuntimeError, match="boom"):
        ff.heal(
            student, teacher, data, steps=10, local_steps=3, lr=1e-2, loss=failing, progress=False
        )
    assert all(torch.equal(state[n], p) for n, p in student.named_parameters())
    assert flags == {n: p.requires_grad for n, p in student.named_parameters()}


# ---------------------------------------------------------------------------------------------
# losses and structured outputs


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor):
        hidden = torch.tanh(self.fc1(x))
        logits = self.fc2(hidden)
        if self.kind == "dict":
            return {"logits": logits, "hidden": hidden, "ids": logits.argmax(-1)}
        if self.kind == "tuple":
            return logits, (hidden,)
        return Output(logits, hidden)


def _structured_pair(kind: str) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = Structured(kind).eval()
    data = [torch.randn(16, 32) for _ in range(3)]
    if kind == "dataclass":  # torch.fx does not trace a dataclass output: factorize by hand
        student = copy.deepcopy(teacher)
        student.fc1 = FactorizedLinear.from_linear(teacher.fc1, latent_features=3)
    else:
        student = _factorize(teacher, data[0], min_features=32, latent_features=3)
    assert isinstance(student.fc1, FactorizedLinear)
    return teacher, student, data


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_a_callable_loss_gets_the_raw_structured_outputs(kind):
    teacher, student, data = _structured_pair(kind)
    seen = []

    def loss(s, t):
        seen.append((type(s), type(t)))
        logits = (lambda o: o["logits"]) if kind == "dict" else (lambda o: o.logits)
        return F.mse_loss(logits(s), logits(t))

    report = ff.heal(
        student, teacher, data, steps=20, local_steps=5, lr=1e-2, loss=loss, progress=False
    )
    expected = dict if kind == "dict" else Output
    assert len(seen) == 15 and set(seen) == {(expected, expected)}
    assert report.objective == "loss"
    assert report.loss[1] < report.loss[0]


def _leaf_loss(loss: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if loss == "kl":
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    return F.mse_loss(s, t) / t.var()


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.filterwarnings("ignore:healing raised the held-out loss")  # a random teacher
def test_default_losses_match_the_leaves_of_structured_outputs(kind, loss):
    teacher, student, data = _structured_pair(kind)
    with torch.no_grad():  # both floating leaves count (logits and hidden), the integer one not
        s, t = student.fc1(data[2]), teacher.fc1(data[2])
        s, t = torch.tanh(s), torch.tanh(t)
        expected = _leaf_loss(loss, student.fc2(s), teacher.fc2(t)) + _leaf_loss(loss, s, t)
    report = ff.heal(
        student,
        teacher,
        data[:2],
        steps=30,
        lr=1e-2,
        loss=loss,
        eval_batches=data[2:],
        progress=False,
    )
    assert report.eval_loss[0] == pytest.approx(float(expected), rel=1e-5)
    assert report.loss[1] < report.loss[0]


def test_kl_and_mse_losses_on_leaves():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    expected = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    assert torch.allclose(kl_loss(s, t), expected)
    assert torch.allclose(kl_loss({"a": s, "b": (s,)}, {"a": t, "b": (t,)}), 2 * expected)
    assert torch.allclose(mse_loss(s, t), F.mse_loss(s, t) / t.var())
    assert [p for p, _ in output_leaves(Output(s, t))] == ["output.logits", "output.hidden"]
    with pytest.raises(ValueError, match="different floating-point leaves"):
        kl_loss({"a": s}, {"b": t})
    with pytest.raises(ValueError, match="output\\[0\\]: the student gives shape"):
        mse_loss((s,), (t[:2],))
    with pytest.raises(ValueError, match="loss='mse'"):
        kl_loss(s[:, :1], t[:, :1])


# ---------------------------------------------------------------------------------------------
# the frozen prefix


def test_the_cached_prefix_gives_the_loss_trajectory_of_a_full_run():
    teacher, student, data = _cnn_pair(batches=2)
    plain_student, plain_teacher = Wrapper(copy.deepcopy(student)), Wrapper(copy.deepcopy(teacher))
    runs = []
    for s, t in ((student, teacher), (plain_student, plain_teacher)):
        calls = {"prefix": 0, "teacher": 0}
        conv1 = s.get_submodule("conv1" if s is student else "inner.conv1")
        conv1.register_forward_hook(lambda *_, c=calls: c.__setitem__("prefix", c["prefix"] + 1))
        t.register_forward_hook(lambda *_, c=calls: c.__setitem__("teacher", c["teacher"] + 1))
        report = ff.heal(s, t, data, steps=16, local_steps=6, lr=1e-2, progress=False)
        runs.append((report, calls))
    (cached, cached_calls), (full, full_calls) = runs
    assert cached.prefix_nodes == 6 and full.prefix_nodes == 0
    assert cached_calls == {"prefix": 2, "teacher": 2}  # once per batch, not per step
    assert full_calls == {"prefix": 16, "teacher": 2}  # the whole student at every step
    assert len(cached.history) == 10
    assert cached.history == pytest.approx(full.history, rel=1e-6, abs=1e-9)
    for name, (first, last) in cached.local_loss.items():
        assert (first, last) == pytest.approx(full.local_loss[f"inner.{name}"], rel=1e-6)
    for name, p in student.named_parameters():
        assert torch.allclose(p, plain_student.get_parameter(f"inner.{name}"), atol=1e-6)


def test_a_data_loader_is_streamed_and_nothing_is_kept_per_batch():
    teacher, student, data = _cnn_pair(batches=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[0]), batch_size=4)
    calls = []
    student.conv1.register_forward_hook(lambda *_: calls.append(1))
    report = ff.heal(student, teacher, loader, steps=5, local_steps=2, lr=1e-2, progress=False)
    assert len(report.history) == 3 and report.prefix_nodes == 6
    assert len(calls) == 5  # a stream's batches may change between passes: nothing is kept
    with pytest.raises(ValueError, match="batches is empty"):
        ff.heal(student, teacher, torch.utils.data.DataLoader([]), steps=5, progress=False)


def test_split_frozen_prefix_cuts_a_graph_and_keeps_its_function():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = fx.symbolic_trace(model)
    split = split_frozen_prefix(gm, {id(p) for p in model[2].parameters()})
    assert split.frontier_names == ["_1"] and split.prefix_nodes == 2
    suffix_params = sorted(n for n, _ in split.suffix.named_parameters())
    assert suffix_params == ["2.bias", "2.weight", "4.bias", "4.weight"]
    x = torch.randn(5, 4)
    assert torch.equal(split.run(split.frontier(x)), gm(x))
    assert split_frozen_prefix(gm, {id(p) for p in model[0].parameters()}) is None  # no prefix


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h.add_(self.second(h))  # writes into a frontier value
        return h


def test_the_suffix_never_writes_into_a_kept_frontier_value():
    model = InPlace()
    gm = fx.symbolic_trace(model)
    split = split_frozen_prefix(gm, {id(p) for p in model.second.parameters()})
    x = torch.randn(3, 4)
    frontier = split.frontier(x)
    kept = frontier[0].clone()
    first, again = split.run(frontier), split.run(frontier)
    assert torch.equal(frontier[0], kept)
    assert torch.equal(first, again) and torch.equal(first, model(x))


# ---------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"steps": -1}, ValueError, "steps must be"),
        ({"steps": 2.5}, ValueError, "steps must be"),
        ({"lr": 0.0}, ValueError, "lr must be"),
        ({"lr": float("nan")}, ValueError, "lr must be"),
        ({"loss": "l1"}, ValueError, "loss must be"),
        ({"trainable": "some"}, ValueError, "trainable must be"),
        ({"local_steps": 11}, ValueError, "local_steps must be"),
        ({"batches": []}, ValueError, "batches is empty"),
        ({"batches": 3}, TypeError, "batches must be"),
        ({"eval_batches": iter([])}, ValueError, "eval_batches is empty"),
        ({"batches": [torch.ones(0, 32)]}, ValueError, r"batches\[0\] is empty"),
        ({"student": "model"}, TypeError, "student must be a torch.nn.Module"),
        ({"teacher": None}, TypeError, "teacher must be a torch.nn.Module"),
        ({"loss": lambda s, t: s.sum(-1)}, TypeError, "scalar tensor"),
    ],
)
def test_arguments_are_checked(change, error, match):
    teacher, student, data = _mlp_pair()
    arguments = {"student": student, "teacher": teacher, "batches": data, "steps": 10}
    arguments.update(change)
    with pytest.raises(error, match=match):
        ff.heal(progress=False, **arguments)


def test_student_must_differ_from_teacher_and_have_factorized_layers():
    teacher, student, data = _mlp_pair()
    with pytest.raises(ValueError, match="same module"):
        ff.heal(student, student, data, progress=False)
    with pytest.raises(ValueError, match="no factorized layer"):
        ff.heal(copy.deepcopy(teacher), teacher, data, progress=False)
    shared = nn.Sequential(teacher[0], FactorizedLinear.from_linear(teacher[2], latent_features=4))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are also the teacher's"):
        ff.heal(
            shared, nn.Sequential(teacher[0], teacher[2]), data, trainable="all", progress=False
        )


def test_the_local_phase_names_a_layer_the_teacher_lacks_or_shapes_differently():
    teacher, student, data = _mlp_pair()
    narrower = nn.Sequential(teacher[0], nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="student layer '2' is a linear 32→32 but the teacher's"):
        ff.heal(student, narrower, data, steps=4, progress=False)
    with pytest.raises(ValueError, match="student layer '2' has no counterpart"):
        ff.heal(student, nn.Sequential(teacher[0]), data, steps=4, local_steps=2, progress=False)
    # pairing by name is the local phase's alone: without it, any teacher of the same function
    with pytest.raises(ValueError, match="student layer '0' has no counterpart"):
        ff.heal(student, Wrapper(teacher), data, steps=4, local_steps=2, progress=False)
    report = ff.heal(student, Wrapper(teacher), data, steps=4, local_steps=0, progress=False)
    assert report.local_steps == 0 and len(report.history) == 4
    # not asked for: a student layer without a teacher module of its name heals end to end only
    report = ff.heal(student, Wrapper(teacher), data, steps=4, progress=False)
    assert report.local_steps == 0 and len(report.history) == 4
