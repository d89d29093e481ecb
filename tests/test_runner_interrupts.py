"""Interrupts: a KeyboardInterrupt anywhere in a stage, then ``run()`` again, equals an uninterrupted run.

Each test trains the same seeded setup twice: once straight through, once with a
``KeyboardInterrupt`` (raised by user code, or a real SIGINT) at one point of
one step, after which ``run()`` is simply called again. Losses, weights,
optimizer and scheduler state and the global RNG must then be equal bit for
bit, the interrupt must reach the caller, and no finding may be left behind
by it.
"""

from __future__ import annotations

import copy
import os
import signal
import threading

import numpy as np
import pytest
import torch
from helpers import (
    make_data,
    make_mlp,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import tlwidgets as tlw
from tlwidgets import Stage

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12


class Trigger:
    """Fires once, at its ``at``-th call (0-based); ``how`` is "raise" or "signal"."""

    def __init__(self, at: int | None = None, how: str = "raise") -> None:
        self.at, self.how, self.calls, self.fired = at, how, 0, 0

    def __call__(self) -> None:
        n, self.calls = self.calls, self.calls + 1
        if self.at is not None and n == self.at:
            self.fired += 1
            if self.how == "signal":
                os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode boundary
                for _ in range(1000):  # give the interpreter bytecodes to deliver it at
                    pass
            else:
                raise KeyboardInterrupt


class KIFunction(torch.autograd.Function):
    """Identity; its backward calls the trigger (a Ctrl-C half-way through BACKWARD)."""

    @staticmethod
    def forward(ctx, x, trigger):
        ctx.trigger = trigger
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.trigger()
        return g, None


class Net(nn.Module):
    """Linear - BatchNorm - ReLU - Dropout - [trigger points] - Linear: buffers and RNG both matter."""

    def __init__(self, fwd: Trigger, bwd: Trigger) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 3)
        self.fwd, self.bwd = fwd, bwd

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        if self.training:  # training forwards only (validation calls the model too)
            self.fwd()  # after the batch-norm statistics moved and dropout drew its mask
        h = KIFunction.apply(h, self.bwd)
        return self.fc2(h)


class TriggerDataset(Dataset):
    """:func:`make_data` with a little numpy noise; ``__getitem__`` calls the trigger."""

    def __init__(self, trigger: Trigger, n: int = 40, seed: int = 0) -> None:
        self.x, self.y = make_data(n, seed=seed)
        self.trigger = trigger

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.trigger()
        return self.x[i] + float(np.random.normal()) * 0.01, self.y[i]


class TriggerSGD(torch.optim.SGD):
    """SGD whose ``step`` calls the trigger after it has updated the weights."""

    trigger = Trigger()

    def step(self, closure=None):
        out = super().step(closure)
        self.trigger()
        return out


def _setup(where: str = "", at: int | None = None, how: str = "raise", post_hook: bool = True, **runner_kw):
    """A seeded runner; the trigger at ``where`` fires at its ``at``-th call (``post_hook=False``: no
    optimizer step hook, so unmeasured steps need no snapshot)."""
    trig = {w: Trigger(at if w == where else None, how) for w in ("fetch", "forward", "backward", "loss")}
    trig.update(scheduler=Trigger(at if where == "scheduler" else None, how))
    trig.update(optimizer=Trigger(at if where == "optimizer" else None, how))
    trig.update(post_hook=Trigger(at if where == "post_hook" else None, how))
    trig.update(val=Trigger(at if where == "val" else None, how))
    torch.manual_seed(0)
    np.random.seed(0)
    model = Net(trig["forward"], trig["backward"])
    # The same arithmetic either way; TriggerSGD is user code (a subclass), SGD is torch's own.
    opt_cls = TriggerSGD if where == "optimizer" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt.trigger = trig["optimizer"]
    if post_hook:
        opt.register_step_post_hook(lambda *_: trig["post_hook"]())

    def lam(e):
        if e > 0:  # not at construction
            trig["scheduler"]()
        return 0.97**e

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    train = DataLoader(TriggerDataset(trig["fetch"]), batch_size=8, shuffle=True)
    val = DataLoader(TriggerDataset(trig["val"], n=16, seed=3), batch_size=8, shuffle=True)
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, y):
        if torch.is_grad_enabled():  # not in validation
            trig["loss"]()
        return ce(out, y)

    runner = tlw.Runner(
        model,
        loss_fn,
        opt,
        train,
        val_data=val,
        scheduler=sched,
        scheduler_interval="step",
        **runner_kw,
    )
    return runner, trig


def _outcome(runner) -> dict:
    return {
        "loss": runner.history.loss.copy(),
        "weights": snapshot(runner.model),
        "opt": copy.deepcopy(runner.optimizer.state_dict()),
        "sched": {k: v for k, v in runner.scheduler.state_dict().items() if k != "lr_lambdas"},
        "rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "pos": (runner.global_step, runner.epoch, runner.batch_index, runner.stage),
        "epochs": [(e.epoch, e.step, e.train_loss, e.val_loss) for e in runner.history.epochs],
        "lr": runner.lrs,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["pos"] == b["pos"]
    np.testing.assert_array_equal(a["loss"], b["loss"])
    assert weights_equal(a["weights"], b["weights"])
    assert a["lr"] == b["lr"]
    assert a["sched"] == b["sched"]
    assert a["epochs"] == b["epochs"]
    assert torch.equal(a["rng"], b["rng"])
    np.testing.assert_array_equal(a["np_rng"], b["np_rng"])
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for k, state in a["opt"]["state"].items():
        for key, t in state.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(b["opt"]["state"][k][key])), key


def _reference(**runner_kw) -> dict:
    runner, _ = _setup(**runner_kw)
    runner.run(steps=STEPS)
    return _outcome(runner)


def _interrupted(where: str, at: int, how: str = "raise", **runner_kw):
    runner, trig = _setup(where, at, how, **runner_kw)
    interrupts = 0
    for _ in range(5):
        try:
            result = runner.run(steps=STEPS - runner.global_step)
        except KeyboardInterrupt:
            interrupts += 1
            assert not runner.running
            continue
        assert result.stopped_by == "steps", result
        if runner.global_step >= STEPS:
            break
    assert trig[where].fired == 1, "the trigger never fired: the test does not test anything"
    return runner, interrupts


# Calls of each trigger point per step (fetch: 8 examples a batch; forward/backward/loss: once;
# scheduler: once per step; val: 16 examples per epoch end; 40 examples = 5 batches an epoch).
CASES = [
    ("scheduler", 6),  # Ctrl-C inside a per-step scheduler.step(): the weights have moved
    ("optimizer", 6),  # Ctrl-C at the end of a custom optimizer.step(), after it updated
    ("backward", 6),  # Ctrl-C half-way through loss.backward()
    ("forward", 6),  # after batch norm updated its statistics and dropout drew its mask
    ("loss", 6),
    ("fetch", 8 * 6 + 3),  # inside the DataLoader's __getitem__, mid-epoch (batch 7 = epoch 1's 2nd)
    ("fetch", 8 * 4 + 1),  # mid-batch in the last batch of epoch 0
    ("val", 5),  # during validation at the first epoch end
    ("post_hook", 6),  # an optimizer step post-hook (built-in SGD.step has returned)
]


@pytest.mark.parametrize("where,at", CASES)
def test_keyboard_interrupt_then_run_equals_an_uninterrupted_run(where, at):
    expected = _reference()
    runner, interrupts = _interrupted(where, at)
    assert interrupts == 1  # Ctrl-C still stops run(): it reaches the caller
    _assert_same(expected, _outcome(runner))
    # The interrupt is not the user's bug: no finding (a false "backward twice" stage-error) stays.
    assert not [f for f in runner.findings if f.severity == "error"], runner.findings


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process started in the background
    by a non-interactive shell inherits SIGINT ignored, and Python then installs no handler at all."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("where", ["scheduler", "optimizer", "post_hook", "backward", "forward"])
def test_real_sigint_then_run_equals_an_uninterrupted_run(where):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    expected = _reference()
    runner, interrupts = _interrupted(where, 6, how="signal")
    assert interrupts == 1
    _assert_same(expected, _outcome(runner))
    assert not [f for f in runner.findings if f.severity == "error"], runner.findings


@pytest.mark.usefixtures("default_sigint")
def test_sigint_during_step_is_raised_at_the_step_boundary_with_the_step_complete():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    runner, _ = _setup("post_hook", 2, how="signal")
    with pytest.raises(KeyboardInterrupt):
        runner.run(steps=5)
    # The step that was interrupted is complete: the optimizer stepped once, the scheduler too.
    assert runner.global_step == 3 and runner.stage is Stage.FETCH
    assert runner.scheduler.last_epoch == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_inside_step_stage_and_step_also_recover():
    expected = _reference()
    runner, _ = _setup("optimizer", 3)
    runner.run(steps=3)
    for _ in range(6):
        runner.step_stage()
    assert runner.stage is Stage.STEP
    with pytest.raises(KeyboardInterrupt):
        runner.step_stage()
    assert runner.stage is Stage.STEP and runner.global_step == 3
    runner.step()
    runner.run(steps=STEPS - runner.global_step)
    got = _outcome(runner)
    # step_stage() measures exactly (other statistics), but the training itself is the same.
    np.testing.assert_array_equal(expected["loss"], got["loss"])
    assert weights_equal(expected["weights"], got["weights"])
    assert torch.equal(expected["rng"], got["rng"])


def test_interrupt_in_step_without_a_snapshot_is_completed_not_repeated():
    """safe_step=False: no snapshot, so a STEP whose optimizer returned is completed, never re-applied."""
    expected = _reference(safe_step=False)
    runner, interrupts = _interrupted("scheduler", 6, safe_step=False)
    assert interrupts == 1
    _assert_same(expected, _outcome(runner))


def test_generator_loader_interrupted_mid_epoch_is_refused_not_replayed_on_other_data():
    """A one-shot generator cannot be replayed: the batch it was producing is lost, and the runner says so."""
    x, y = make_data(40)
    fired = []

    def gen():
        for i in range(0, 40, 8):
            if i == 16 and not fired:
                fired.append(1)
                raise KeyboardInterrupt
            yield x[i : i + 8], y[i : i + 8]

    model = make_mlp()
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), gen())
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    result = runner.run()
    assert result.stopped_by == "error"
    assert "one-shot" in (result.record.error.message if result.record.error else "")


def test_interrupt_keeps_the_data_loader_iterator_position_for_map_style_datasets():
    """A TensorDataset loader (no trigger in it): Ctrl-C in FORWARD does not skip or repeat a batch."""
    x, y = make_data(40)
    seen: list[torch.Tensor] = []
    torch.manual_seed(0)
    model = make_mlp()
    fired = []

    def forward(m, inputs):
        seen.append(inputs.clone())
        if len(seen) == 3 and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return m(inputs)

    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader, forward=forward)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    runner.run()
    assert runner.epoch == 1 and runner.global_step == 5
    firsts = [float(s[0, 0]) for s in seen]
    assert firsts == [float(x[i, 0]) for i in (0, 8, 16, 16, 24, 32)]
