"""The one-frame unmeasured step of ``run()`` (:mod:`tlwidgets.core.lean`) against the stage-by-stage path.

Every test uses the seeded setup of ``test_runner_interrupts`` (batch norm,
dropout, a shuffling DataLoader with numpy noise, a per-step scheduler,
validation) with a schedule that measures step 0 only, so the other steps run
lean, and checks that it was so. ``run_async`` never takes the lean path
(it yields between stages), so it is the reference: the same steps must give
the same losses, weights, optimizer, scheduler and RNG states bit for bit,
the same records, and the same stops.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import test_runner_interrupts as ti
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from test_runner_interrupts import default_sigint  # noqa: F401  (fixture)

import tlwidgets as tlw
from tlwidgets import Stage
from tlwidgets.core.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")

#: Step 0 measured, every later step unmeasured; no step hook (that would snapshot every step).
LEAN = dict(measure_every=1000, dense_steps=0, post_hook=False)
STEPS = ti.STEPS  # 12 steps = 2 epochs of 5 batches and 2 steps: two epoch ends with validation


@pytest.fixture
def lean_steps(monkeypatch) -> list[int]:
    """The global steps at which a lean step started (every Runner of the test)."""
    seen: list[int] = []
    original = Runner._lean_step

    def counted(self):
        seen.append(self.global_step)
        return original(self)

    monkeypatch.setattr(Runner, "_lean_step", counted)
    return seen


def _records(runner) -> list[tuple]:
    return [(s, r.ok, r.step, r.batch, r.exact, dict(r.data)) for s, r in runner.records.items()]


def _same_records(a, b) -> None:
    assert [x[:5] for x in a] == [x[:5] for x in b]
    for (*_, da), (*_, db) in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            va, vb = da[k], db[k]
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), k
            elif isinstance(va, np.ndarray):
                np.testing.assert_array_equal(va, vb)
            else:
                assert va == vb, k


@pytest.mark.parametrize("extra", [{}, {"freeze_bn_stats": True}, {"device": "cpu"}], ids=str)
def test_lean_run_equals_the_stage_by_stage_run(extra, lean_steps):
    lean, _ = ti._setup(**LEAN, **extra)
    result = lean.run(steps=STEPS)
    assert result.stopped_by == "steps"
    # The unmeasured steps of epoch 1 (steps 6 to 11; one that met an epoch end began twice) ran lean;
    # epoch 0's batches also went to the data audits, stage by stage.
    assert sorted(set(lean_steps)) == list(range(6, STEPS)), lean_steps
    lean_steps.clear()

    staged, _ = ti._setup(**LEAN, **extra)
    result = asyncio.run(staged.run_async(steps=STEPS))
    assert result.stopped_by == "steps"
    assert lean_steps == []  # the reference really is the stage-by-stage path

    ti._assert_same(ti._outcome(staged), ti._outcome(lean))
    np.testing.assert_array_equal(staged.history.measured, lean.history.measured)
    assert staged.history.measured.tolist() == [True] + [False] * (STEPS - 1)
    assert [e.train_metrics for e in staged.history.epochs] == [e.train_metrics for e in lean.history.epochs]
    _same_records(_records(staged), _records(lean))
    assert lean.last_record is lean.records[Stage.STEP]
    assert [r.stage for r in lean.records.values()] == list(Stage)
    assert all(r.duration_s >= 0 for r in lean.records.values())
    assert not lean.findings and not staged.findings


@pytest.mark.parametrize(
    "where,at",
    [c for c in ti.CASES if c[0] not in ("optimizer", "post_hook")],  # (those snapshot the step)
)
def test_keyboard_interrupt_in_a_lean_step_then_run_equals_an_uninterrupted_run(where, at, lean_steps):
    expected = ti._reference(**LEAN)
    lean_steps.clear()
    runner, interrupts = ti._interrupted(where, at, **LEAN)
    assert interrupts == 1
    ti._assert_same(expected, ti._outcome(runner))
    assert not [f for f in runner.findings if f.severity == "error"], runner.findings
    assert lean_steps, "no step ran lean: the test does not test the lean path"


@pytest.mark.usefixtures("default_sigint")
def test_real_sigint_in_a_lean_scheduler_step_is_raised_with_the_step_complete(lean_steps):
    runner, trig = ti._setup("scheduler", 6, how="signal", **LEAN)
    with pytest.raises(KeyboardInterrupt):
        runner.run(steps=STEPS)
    assert trig["scheduler"].fired == 1
    # The scheduler's 7th call is in step 7 (index 6 counts from the first step()): held until the
    # end of that step, which is complete and not to be redone.
    assert runner.stage is Stage.FETCH and runner.global_step == 7
    assert 6 in lean_steps
    runner.run(steps=STEPS - runner.global_step)
    ti._assert_same(ti._reference(**LEAN), ti._outcome(runner))


class _Faulty:
    """A trigger point that raises ``exc`` in step ``at`` of ``runner`` while ``armed``."""

    def __init__(self, runner, at: int, exc: type[BaseException]) -> None:
        self.runner, self.at, self.exc, self.armed = runner, at, exc, True

    def __call__(self) -> None:
        if self.armed and self.runner.global_step == self.at:
            raise self.exc("broken on purpose")


@pytest.mark.parametrize("where", ["forward", "backward", "loss"])
def test_a_failure_in_a_lean_step_is_recorded_at_its_stage_and_retried(where, lean_steps):
    runner, trig = ti._setup(**LEAN)
    fault = _Faulty(runner, 7, ValueError)  # step 7: epoch 1, unmeasured
    if where == "forward":
        runner.model.fwd = fault
    elif where == "backward":
        runner.model.bwd = fault
    else:
        trig["loss"] = fault
    result = runner.run(steps=STEPS)
    stage = {"forward": Stage.FORWARD, "loss": Stage.LOSS, "backward": Stage.BACKWARD}[where]
    assert result.stopped_by == "error" and result.steps == 7
    assert runner.stage is stage and runner.global_step == 7
    failed = runner.records[stage]
    assert not failed.ok and "broken on purpose" in failed.error.message
    assert result.record is failed and runner.last_record is failed
    assert [s for s in runner.records] == list(Stage)[: list(Stage).index(stage) + 1]
    assert 7 in lean_steps
    assert any(f.severity == "error" for f in runner.findings)
    fault.armed = False
    runner.run(steps=STEPS - runner.global_step)
    expected = ti._reference(**LEAN)
    ours = ti._outcome(runner)
    # The failed attempt is undone: the retry trains on the same batch with the same dropout masks.
    ti._assert_same(expected, ours)


def test_a_nan_loss_in_a_lean_step_stops_as_the_stage_by_stage_run_does(lean_steps):
    def nan_at(runner, at):
        ce = runner.loss_fn
        calls = [0]

        def loss_fn(out, y):
            loss = ce(out, y)
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == at + 1:
                    return loss * float("nan")
            return loss

        runner.loss_fn = loss_fn

    lean, _ = ti._setup(**LEAN)
    nan_at(lean, 6)
    got = lean.run(steps=STEPS)
    assert 6 in lean_steps
    lean_steps.clear()
    staged, _ = ti._setup(**LEAN)
    nan_at(staged, 6)
    want = asyncio.run(staged.run_async(steps=STEPS))
    assert lean_steps == []
    assert (got.stopped_by, got.steps) == (want.stopped_by, want.steps) == ("finding", 6)
    assert lean.stage is staged.stage is Stage.BACKWARD
    assert got.finding.code == want.finding.code == "non-finite-loss"
    assert [f.code for f in lean.findings] == [f.code for f in staged.findings]
    _same_records(_records(staged), _records(lean))


def test_a_stage_subscriber_or_a_measured_step_takes_the_stage_by_stage_path(lean_steps):
    runner, _ = ti._setup(**LEAN)
    seen: list[Stage] = []
    off = runner.events.on(tlw.Event.STAGE, lambda rec: seen.append(rec.stage))
    runner.run(steps=7)
    assert lean_steps == [] and seen == list(Stage) * 7  # the dashboard sees every stage
    off()
    runner.run(steps=3)  # (epoch 1: the data audits no longer want the training batches)
    assert lean_steps == [7, 8, 9] and len(seen) == 49
    runner.tracker.dense_steps = 10
    runner.tracker.densify(runner.global_step)  # (as a control change does): measured again
    lean_steps.clear()
    runner.run(steps=2)
    assert lean_steps == [] and runner.history.measured[-2:].tolist() == [True, True]


@pytest.mark.parametrize("path", ["lean", "staged"])
def test_a_failure_after_the_step_is_complete_is_not_a_failed_stage(path, lean_steps):
    """tlwidgets' own bookkeeping failing after ``optimizer.step()`` returned (here the automatic
    checkpoint) reaches the caller on both paths; the step stays done, not marked failed nor redone."""
    runner, _ = ti._setup(auto_checkpoint_every=1, **LEAN)
    runner.run(steps=7)
    original = runner._auto_checkpoint

    def broken(label):
        if runner.global_step == 9:
            raise RuntimeError("checkpoint store broken")
        return original(label)

    runner._auto_checkpoint = broken
    lean_steps.clear()
    with pytest.raises(RuntimeError, match="checkpoint store broken"):
        if path == "lean":
            runner.run(steps=5)
        else:
            asyncio.run(runner.run_async(steps=5))
    assert (8 in lean_steps) == (path == "lean")
    assert runner.global_step == 9 and runner.stage is Stage.FETCH
    assert runner.records[Stage.STEP].ok and not runner.findings


def test_a_scheduler_that_runs_out_in_a_lean_step_stops_as_the_stage_by_stage_run_does(lean_steps):
    def setup():
        runner, _ = ti._setup(**LEAN)
        # OneCycleLR refuses to step past total_steps (its construction counts as one): the 11th
        # optimizer step (unmeasured) is the first it refuses.
        runner.scheduler = torch.optim.lr_scheduler.OneCycleLR(runner.optimizer, max_lr=0.05, total_steps=10)
        return runner

    lean = setup()
    got = lean.run(steps=STEPS)
    assert 10 in lean_steps
    lean_steps.clear()
    staged = setup()
    want = asyncio.run(staged.run_async(steps=STEPS))
    assert lean_steps == []
    assert (got.stopped_by, got.steps) == (want.stopped_by, want.steps) == ("finding", 11)
    assert got.finding.code == want.finding.code == "stage-error"
    assert (
        lean.records[Stage.STEP].data["scheduler_error"] == staged.records[Stage.STEP].data["scheduler_error"]
    )
    ti._assert_same(ti._outcome(staged), ti._outcome(lean))
