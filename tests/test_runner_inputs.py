"""What the Runner is given: run() arguments, constructor options, data sources that fail, schedulers
that run out, optimizers that need a closure, and evaluation averaged per example."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from helpers import (
    make_batches,
    make_data,
    make_mlp,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn

import tlwidgets as tlw
from tlwidgets import EpochRecord, Stage
from tlwidgets.core.training import evaluate, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- run() arguments
def test_run_epochs_zero_runs_nothing():
    runner = make_runner()
    result = runner.run(epochs=0)
    assert (result.steps, result.epochs) == (0, 0)
    assert runner.global_step == 0 and runner.batch_index == 0 and runner.stage is Stage.FETCH
    assert len(runner.history) == 0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_run_accepts_numpy_and_torch_integer_scalars(kind):
    runner = make_runner()
    as_int = np.int64 if kind == "numpy" else torch.tensor
    assert runner.run(steps=as_int(3)).stopped_by == "steps" and runner.global_step == 3
    assert runner.run(epochs=as_int(1)).stopped_by == "epochs" and runner.epoch == 1


@pytest.mark.parametrize(
    "bad", [-1, True, np.bool_(True), 1.5, np.float64(2.0), torch.tensor(2.0), torch.tensor([1, 2]), "3"]
)
def test_run_rejects_negatives_bools_and_non_integers(bad):
    runner = make_runner()
    with pytest.raises(ValueError):
        runner.run(steps=bad)
    with pytest.raises(ValueError):
        runner.run(epochs=bad)
    assert runner.global_step == 0 and not runner.running


# ---------------------------------------------------------------------- constructor options
def test_device_that_does_not_exist_is_a_value_error():
    with pytest.raises(ValueError, match="device"):
        make_runner(device="nonsense")


@pytest.mark.parametrize(
    "option,value",
    [
        ("grad_budget", -0.1),
        ("grad_budget", 0.0),
        ("grad_budget", float("nan")),
        ("activation_every", -1),
        ("detail_every", -1),
        ("measure_every", 0),
        ("measure_every", -5),
        ("dense_steps", -1),
        ("diagnose_every", 0),
        ("diagnose_every", 1.5),
        ("diagnose_every", True),
        ("max_checkpoints", 0),
        ("max_checkpoints", -2),
        ("sample_size", 0),
        ("history_size", 0),
        ("activation_every", 2.5),
        ("max_checkpoints", True),
    ],
)
def test_out_of_range_options_are_rejected_at_construction(option, value):
    with pytest.raises(ValueError, match=option):
        make_runner(**{option: value})


def test_integer_options_accept_numpy_integers():
    runner = make_runner(
        activation_every=np.int64(5),
        detail_every=np.int32(3),
        measure_every=np.int64(2),
        dense_steps=np.int64(0),
        max_checkpoints=np.int64(2),
        grad_budget=np.float64(0.05),
    )
    runner.run(steps=3)
    for _ in range(3):
        runner.checkpoint()
    assert len(runner.checkpoints) == 2


# ---------------------------------------------------------------------- a data source that raises
class FailOnce:
    """Re-iterable: its iterator (a generator) raises at batch ``at`` the first time through."""

    def __init__(self, batches, at: int) -> None:
        self.batches, self.at, self.failed = batches, at, False

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.at and not self.failed:
                self.failed = True
                raise OSError("corrupt record")
            yield b


def test_loader_raising_mid_epoch_is_a_fetch_error_and_the_retry_resumes_at_that_batch():
    batches = make_batches(4)
    runner = make_runner(make_mlp(), FailOnce(batches, at=2))
    result = runner.run()
    assert result.stopped_by == "error" and result.steps == 2
    assert result.record.stage is Stage.FETCH and not result.record.ok
    assert result.record.error.type == "OSError"
    assert result.finding is not None and result.finding.stage is Stage.FETCH
    assert any(f.stage is Stage.FETCH and f.severity == "error" for f in runner.findings)

    result = runner.run()  # the source recovered: the epoch goes on with batch 3, not an early end
    assert result.stopped_by == "epochs"
    epoch = runner.history.epochs[-1]
    assert epoch.ok and epoch.batches == 4 and runner.global_step == 4

    reference = make_runner(make_mlp(), batches)
    reference.run()
    assert weights_equal(snapshot(reference.model), snapshot(runner.model))
    np.testing.assert_array_equal(reference.history.loss, runner.history.loss)


def test_generator_raising_mid_epoch_does_not_close_the_epoch_silently():
    batches = make_batches(4)

    def gen():
        for i, b in enumerate(batches):
            if i == 2:
                raise OSError("corrupt record")
            yield b

    runner = make_runner(make_mlp(), gen())
    result = runner.run()
    assert result.stopped_by == "error" and result.record.stage is Stage.FETCH
    assert result.record.error.type == "OSError" and result.finding is not None
    # A generator that raised is finished and cannot be replayed: the epoch is cut short, and says so.
    result = runner.run()
    assert result.stopped_by == "error"
    assert isinstance(result.record, EpochRecord) and not result.record.ok
    assert "one-shot" in result.record.error.message and "2 batches" in result.record.error.message
    assert runner.history.epochs[-1].ok is False


# ---------------------------------------------------------------------- schedulers and optimizers
def test_one_cycle_past_total_steps_stops_every_run_with_one_clear_finding():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=3)
    runner = make_runner(model, make_batches(4), optimizer=opt, scheduler=sched, scheduler_interval="step")
    result = runner.run()
    assert result.steps == 4 and result.stopped_by in ("finding", "error")
    found = [f for f in runner.findings if "total_steps" in f.message + f.fix]
    assert len(found) == 1 and found[0].severity == "error" and found[0].stage is Stage.STEP
    assert "total_steps" in found[0].fix and "epochs" in found[0].fix
    # The scheduler keeps failing: every later run() stops at it again instead of training on silently.
    again = runner.run(steps=3)
    assert again.stopped_by in ("finding", "error") and again.steps == 1
    assert again.finding is not None and again.finding.key == found[0].key
    assert len([f for f in runner.findings if "total_steps" in f.message + f.fix]) == 1
    assert runner.global_step == 5
    # Replacing the scheduler is the way on.
    runner.scheduler = None
    assert runner.run(steps=3).stopped_by == "steps"


def _lbfgs_plain(batches, steps):
    model = make_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    losses = []
    for x, y in batches[:steps]:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return model, losses


def test_lbfgs_is_supported_with_a_closure_and_matches_a_plain_loop():
    batches = make_batches(4)
    model = make_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    runner = make_runner(model, batches, optimizer=opt)
    result = runner.run(steps=4)
    assert result.stopped_by == "steps", result
    assert len(runner.history.loss) == 4  # one loss per step however often the closure ran
    plain, losses = _lbfgs_plain(batches, 4)
    assert list(runner.history.loss) == losses
    assert weights_equal(snapshot(plain), snapshot(model))
    assert not [f for f in runner.findings if f.code == "stage-error"]


def test_train_step_steps_an_optimizer_that_needs_a_closure():
    batches = make_batches(2)
    model = make_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    losses = [train_step(model, nn.CrossEntropyLoss(), opt, x, y) for x, y in batches]
    plain, expected = _lbfgs_plain(batches, 2)
    assert losses == expected
    assert weights_equal(snapshot(plain), snapshot(model))


# ---------------------------------------------------------------------- evaluation per example
class NamespaceOut(nn.Module):
    """An MLP that returns its logits in a namespace (as many model libraries do)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x):
        return types.SimpleNamespace(logits=self.net(x))


def _uneven(sizes=(16, 16, 16, 1)):
    x, y = make_data(sum(sizes), seed=5)
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out, x, y


def test_evaluate_averages_per_example_not_per_batch():
    batches, x, y = _uneven()
    model = NamespaceOut()

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.logits, t)

    runner = tlw.Runner(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), batches)
    with torch.no_grad():
        model.eval()
        true = float(loss_fn(model(x), y))
        per_batch = float(np.mean([float(loss_fn(model(a), b)) for a, b in batches]))
        model.train()
    assert abs(true - per_batch) > 1e-3  # the test can tell the two apart
    got = runner.evaluate(batches)["loss"]
    assert got == pytest.approx(true, rel=1e-6)
    assert evaluate(model, loss_fn, batches)["loss"] == pytest.approx(true, rel=1e-6)
    assert model.training  # modes restored


def test_evaluate_accuracy_is_per_example():
    batches, x, y = _uneven()
    model = make_mlp(seed=3)
    with torch.no_grad():
        model.eval()
        logits = model(x)
        model.train()
    out = evaluate(model, nn.CrossEntropyLoss(), batches)
    assert out["accuracy"] == int((logits.argmax(1) == y).sum()) / 49
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)


def test_evaluate_of_no_batches_is_nan():
    out = evaluate(make_mlp(), nn.CrossEntropyLoss(), [])
    assert math.isnan(out["loss"])


class Halving:
    """A scheduler of one's own: only ``step()`` (no ``state_dict``)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.calls = 0

    def step(self) -> None:
        self.calls += 1
        for g in self.optimizer.param_groups:
            g["lr"] *= 0.5


def test_a_scheduler_with_only_step_works_per_step_and_rewinds():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.8)
    sched = Halving(opt)
    runner = make_runner(model, make_batches(8), optimizer=opt, scheduler=sched, scheduler_interval="step")
    assert runner.run(steps=3).stopped_by == "steps"
    assert runner.lrs == [0.1] and sched.calls == 3
    ck = runner.checkpoint()
    runner.run(steps=2)
    runner.rewind(ck)
    assert runner.lrs == [0.1] and sched.calls == 3
