"""Events: every kind fires with its documented payload; a raising subscriber never stops training."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import (
    make_batches,
    make_mlp,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
)
from torch import nn

import tlwidgets as tlw
from tlwidgets import ControlChange, EpochRecord, Event, Finding, Stage, StageRecord
from tlwidgets.core.events import EventBus
from tlwidgets.core.records import StepSummary

pytestmark = pytest.mark.usefixtures("one_thread")


def _subscribe_all(bus) -> list[tuple[Event, object]]:
    seen: list[tuple[Event, object]] = []
    for ev in Event:
        bus.on(ev, lambda payload, ev=ev: seen.append((ev, payload)))
    return seen


def _of(seen, ev: Event) -> list:
    return [p for e, p in seen if e is ev]


def test_stage_step_epoch_payloads_of_a_run():
    runner = make_runner(make_mlp(), make_batches(3), val_data=make_batches(1, seed=5))
    seen = _subscribe_all(runner.events)
    runner.run(epochs=1)
    stages = _of(seen, Event.STAGE)
    assert all(isinstance(r, StageRecord) for r in stages)
    assert [r.stage for r in stages] == list(Stage.ordered()) * 3
    assert [r.step for r in stages] == [s for s in range(3) for _ in range(7)]
    steps = _of(seen, Event.STEP)
    assert all(isinstance(s, StepSummary) for s in steps)
    assert [s.step for s in steps] == [1, 2, 3] and [s.epoch for s in steps] == [0, 0, 0]
    assert [s.batch for s in steps] == [1, 2, 3]
    losses = [r.data["loss"] for r in stages if r.stage is Stage.LOSS]
    assert [s.loss for s in steps] == losses
    assert all(s.lr == [0.1] and s.duration_s >= 0 for s in steps)
    epochs = _of(seen, Event.EPOCH)
    assert len(epochs) == 1 and isinstance(epochs[0], EpochRecord)
    assert epochs[0] is runner.history.epochs[0] and epochs[0].val_loss is not None
    # Order: a step's STAGE(step) comes before its STEP; the epoch end after the last STEP.
    kinds = [(e, getattr(p, "stage", None)) for e, p in seen if e in (Event.STAGE, Event.STEP, Event.EPOCH)]
    i = kinds.index((Event.STAGE, Stage.STEP))
    assert kinds[i + 1] == (Event.STEP, None)
    assert kinds[-1] == (Event.EPOCH, None)
    assert _of(seen, Event.ERROR) == [] and _of(seen, Event.FINDING) == []


def test_error_and_finding_payloads():
    model = nn.Sequential(nn.Linear(5, 3))  # wrong input width: FORWARD raises
    runner = make_runner(model, make_batches(2))
    seen = _subscribe_all(runner.events)
    result = runner.run(steps=1)
    errors = _of(seen, Event.ERROR)
    assert len(errors) == 1 and isinstance(errors[0], StageRecord)
    assert errors[0] is result.record and not errors[0].ok and errors[0].stage is Stage.FORWARD
    findings = _of(seen, Event.FINDING)
    assert len(findings) == 1 and isinstance(findings[0], Finding)
    assert findings[0].code == "shape-mismatch" and findings[0].severity == "error"
    assert findings[0] in runner.findings
    # The same failure again updates the finding instead of announcing it again.
    runner.step_stage()
    assert len(_of(seen, Event.FINDING)) == 1 and len(_of(seen, Event.ERROR)) == 2
    assert next(f for f in runner.findings if f.code == "shape-mismatch").count == 2


def test_finding_event_for_a_stage_finding():
    batches = make_batches(2)
    batches[1][0][0, 0] = float("inf")
    runner = make_runner(make_mlp(), batches)
    seen = _subscribe_all(runner.events)
    result = runner.run(steps=2)
    assert result.stopped_by == "finding"
    (finding,) = _of(seen, Event.FINDING)
    assert finding.code == "non-finite-input" and finding.stage is Stage.FETCH and finding.step == 1
    assert finding.params == ("inputs",)
    assert result.finding is finding


def test_control_payloads():
    runner = make_runner()
    seen = _subscribe_all(runner.events)
    runner.freeze("0")
    runner.unfreeze("0")
    runner.set_lr(0.2)
    ck = runner.checkpoint()
    runner.rewind(ck)
    controls = _of(seen, Event.CONTROL)
    assert all(isinstance(c, ControlChange) for c in controls)
    assert [c.kind for c in controls] == ["freeze", "unfreeze", "set_lr", "checkpoint", "rewind"]
    assert controls[0].detail["params"] == ["0.weight", "0.bias"]
    assert controls[2].detail["lr"] == 0.2


def test_raising_subscriber_does_not_stop_training(caplog):
    runner = make_runner(make_mlp(), make_batches(4))
    calls = []

    def broken(_payload):
        raise RuntimeError("panel bug")

    runner.events.on(Event.STAGE, broken)
    runner.events.on(Event.STEP, broken)
    runner.events.on(Event.STAGE, lambda r: calls.append(r.stage))  # subscribed after the broken one
    with caplog.at_level(logging.ERROR):
        result = runner.run(steps=3)
    assert result.stopped_by == "steps" and runner.global_step == 3
    assert len(calls) == 21  # later subscribers still ran every time
    assert runner.events.errors and all(isinstance(e, RuntimeError) for _, e in runner.events.errors)
    assert {ev for ev, _ in runner.events.errors} == {Event.STAGE, Event.STEP}
    assert len(runner.events.errors) <= 20  # bounded
    assert "panel bug" in caplog.text
    assert not [f for f in runner.findings if f.severity == "error"]


def test_unsubscribe_and_string_event_names():
    bus = EventBus()
    got = []
    off = bus.on("step", got.append)
    bus.emit(Event.STEP, 1)
    off()
    off()  # harmless twice
    bus.emit(Event.STEP, 2)
    assert got == [1]
    with pytest.raises(ValueError):
        bus.on("nonsense", got.append)


def test_watcher_emits_stage_and_step_events():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        seen = _subscribe_all(w.events)
        for x, y in make_batches(3):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    steps = _of(seen, Event.STEP)
    assert [s.step for s in steps] == [1, 2, 3]
    assert [s.loss for s in steps] == losses
    stage_kinds = {r.stage for r in _of(seen, Event.STAGE)}
    assert {Stage.FETCH, Stage.LOSS, Stage.BACKWARD, Stage.STEP} <= stage_kinds
