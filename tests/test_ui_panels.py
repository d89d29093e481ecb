"""The panel protocol: a panel is one class (plus one registry entry), wired by the dashboard in one place.

Also: no ui module reaches into the session's private state (controls go through its public API).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pytest
import test_ui_dashboard as _dashboard_tests
import torch
from test_ui_dashboard import (
    FakeClock,
    make_data,
    make_runner,
    with_class,
)

import tlwidgets as tlw
import tlwidgets.ui as ui
from tlwidgets.core.events import Event
from tlwidgets.core.records import StepSummary
from tlwidgets.ui import PANELS, Panel, register_panel, unregister_panel

torch.set_num_threads(1)

#: The autouse fixture of the dashboard tests: an exception in a widget callback or one the
#: dashboard reports fails the test unless the test takes it (``callback_errors.take()``).
callback_errors = _dashboard_tests.callback_errors

BUILTIN = ("status", "controls", "errors", "pipeline", "heatmap", "loss", "findings", "fit", "freeze", "lr")


class StepCounter(Panel, widgets.HTML):
    """A tiny panel of one's own: counts step events, redraws on even steps and on controls."""

    name = "counter"
    events = (Event.STEP, Event.CONTROL)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_class("tlw-counter")
        self.seen: list[tuple[Event, Any]] = []
        self.draws = 0

    def on_event(self, event: Event, payload: Any) -> bool:
        self.seen.append((event, getattr(payload, "step", None)))
        return event is Event.CONTROL or payload.step % 2 == 0

    def draw(self, session: Any) -> None:
        self.draws += 1
        self.value = f"<b>{session.global_step}</b> steps"


class StepTab(StepCounter):
    name = "steptab"
    slot = "tabs"
    caption = "Steps"


class PlainPanel(Panel):
    """A panel that is not a widget itself: it shows ``widget`` and closes it in ``close()``."""

    name = "plain"
    events = (Event.EPOCH,)

    def __init__(self, host: Any) -> None:
        self.host = host
        self.widget = widgets.HTML("epochs: 0")
        self.widget.add_class("tlw-plain")
        self.epochs = 0
        self.closed = 0

    @classmethod
    def build(cls, host: Any) -> PlainPanel:
        return cls(host)

    def on_event(self, event: Event, payload: Any) -> None:
        self.epochs += 1

    def draw(self, session: Any) -> None:
        self.widget.value = f"epochs: {self.epochs}"

    def close(self) -> None:
        self.closed += 1
        self.widget.close()


@pytest.fixture
def runner():
    r = make_runner()
    yield r
    r.close()


@pytest.fixture
def registered():
    """StepTab registered for the test only."""
    register_panel(StepTab)
    try:
        yield StepTab
    finally:
        unregister_panel(StepTab.name)


def _hold(d: tlw.Dashboard, clock: FakeClock) -> None:
    """Make the next event-driven redraws wait (a redraw just happened)."""
    d.refresher.last_draw = clock()


# --------------------------------------------------------------------------- one class, one entry


def test_a_panel_class_given_in_parts_gets_its_events_and_redraws(runner):
    clock = FakeClock()
    d = tlw.Dashboard(runner, parts=[*PANELS, StepCounter], clock=clock)
    try:
        counter = d.counter
        assert counter is d.panels["counter"] and isinstance(counter, StepCounter)
        assert with_class(d, "tlw-counter") == [counter]
        assert counter.draws == 1 and counter.value == "<b>0</b> steps"  # drawn with the others
        _hold(d, clock)
        runner.step()
        assert counter.seen == [(Event.STEP, 1)]
        assert "counter" not in d.refresher.dirty  # on_event returned False: no redraw needed
        runner.step()
        assert counter.seen[-1] == (Event.STEP, 2) and "counter" in d.refresher.dirty
        clock.t += 1.0
        d.refresher.maybe_flush()  # the throttled redraw
        assert counter.draws == 2 and counter.value == "<b>2</b> steps"
        runner.set_lr(0.01)  # a control event: marked and (throttle open) drawn
        clock.t += 1.0
        d.refresher.maybe_flush()
        assert counter.seen[-1] == (Event.CONTROL, 2) and counter.draws == 3  # ControlChange.step
    finally:
        d.close()
    n = len(counter.seen)
    runner.step()  # unsubscribed with the dashboard
    assert len(counter.seen) == n and counter.comm is None


def test_a_registered_panel_is_in_every_dashboard_and_can_be_left_out(runner, registered):
    assert list(PANELS)[-1] == "steptab"
    d = tlw.Dashboard(runner)
    only = tlw.Dashboard(runner, parts=["loss"])
    try:
        assert isinstance(d.steptab, StepTab) and d.tabs.titles[-1] == "Steps"
        assert d.tabs.children[-1] is d.steptab
        runner.run(steps=2)
        d.refresh()
        assert d.steptab.value == "<b>2</b> steps"
        assert only.steptab is None and "steptab" not in only.panels
    finally:
        d.close()
        only.close()


def test_register_panel_refuses_a_second_panel_of_the_same_name(registered):
    class Other(StepTab):
        pass

    with pytest.raises(ValueError, match="registered already"):
        register_panel(Other)
    assert register_panel(StepTab) is StepTab  # the same class again is fine
    assert register_panel(Other, replace=True) is Other and PANELS["steptab"] is Other


def test_a_panel_that_is_not_a_widget_shows_its_widget_and_is_closed_once(runner):
    d = tlw.Dashboard(runner, parts=[*PANELS, PlainPanel])
    try:
        plain = d.plain
        assert plain.host is d
        assert with_class(d, "tlw-plain") == [plain.widget]
        runner.run(epochs=1)
        d.refresh()
        assert plain.epochs == 1 and plain.widget.value == "epochs: 1"
    finally:
        d.close()
    assert plain.closed == 1 and plain.widget.comm is None
    d.close()  # closing again does nothing
    assert plain.closed == 1


def test_a_panel_that_fails_to_build_leaves_the_session_as_it_was(runner):
    class Unbuildable(StepCounter):
        name = "unbuildable"

        @classmethod
        def build(cls, host: Any) -> Panel:
            raise RuntimeError("cannot build")

    subscribers = {ev: list(runner.events._subs[ev]) for ev in Event}
    with pytest.raises(RuntimeError, match="cannot build"):
        tlw.Dashboard(runner, parts=[*PANELS, Unbuildable])
    assert "measure_grads" not in runner.tracker.__dict__  # the status line's meter was released
    assert {ev: list(runner.events._subs[ev]) for ev in Event} == subscribers


# --------------------------------------------------------------------------- parts


def test_parts_builds_the_panels_asked_for_plus_controls_status_and_errors(runner):
    d = tlw.Dashboard(runner, parts=["loss"])
    try:
        assert list(d.panels) == ["status", "controls", "errors", "loss"]
        for name in ("pipeline", "heatmap", "findings", "fit", "freeze", "lr"):
            assert getattr(d, name) is None
        assert d.tabs is None
        assert with_class(d, "tlw-loss") and not with_class(d, "tlw-heatmap")
        d.run("steps", 3)
        assert d.status.text.startswith("step 3")
        assert len(d.loss.raw.y) == 3
        d.step_stage()  # no pipeline panel: nothing to open
        d.select("0.weight", 2)
        assert d.loss.selected_step == 2 and d.selected_param == "0.weight"
    finally:
        d.close()


def test_default_parts_are_the_registry_in_order(runner):
    d = tlw.Dashboard(runner)
    try:
        assert tuple(d.panels) == BUILTIN == tuple(PANELS)
        for name in BUILTIN:
            assert getattr(d, name) is d.panels[name]
        assert d.tabs.titles == ("Findings", "Fit", "Freeze", "LR")
    finally:
        d.close()


def test_bad_parts_and_bad_panel_classes_are_refused(runner):
    with pytest.raises(ValueError, match=r"no panel named 'heat'.*heatmap"):
        tlw.Dashboard(runner, parts=["heat"])
    with pytest.raises(ValueError, match="twice"):
        tlw.Dashboard(runner, parts=["loss", "loss"])
    with pytest.raises(TypeError, match="not the string"):
        tlw.Dashboard(runner, parts="loss")
    with pytest.raises(TypeError, match=r"subclass of tlwidgets\.ui\.Panel"):
        tlw.Dashboard(runner, parts=[widgets.HTML])

    def panel(**attrs: Any) -> type:
        return type("Bad", (Panel, widgets.HTML), attrs)

    with pytest.raises(ValueError, match="taken by the Dashboard"):
        tlw.Dashboard(runner, parts=[panel(name="run")])
    with pytest.raises(ValueError, match="taken by the Dashboard"):
        tlw.Dashboard(runner, parts=[panel(name="session")])
    for name in ("", "_x", "two words", "class"):
        with pytest.raises(ValueError, match="identifier"):
            register_panel(panel(name=name))
    with pytest.raises(ValueError, match="slot"):
        register_panel(panel(name="x", slot="sidebar"))
    with pytest.raises(ValueError, match="not an event"):
        register_panel(panel(name="x", events=("tick",)))
    with pytest.raises(TypeError, match="tuple"):
        register_panel(panel(name="x", events=Event.STEP))
    assert "x" not in PANELS and "run" not in PANELS


# --------------------------------------------------------------------------- one place for the wiring


def test_each_event_marks_the_panels_that_declare_it(runner, callback_errors):
    clock = FakeClock()
    d = tlw.Dashboard(runner, clock=clock)
    try:

        def dirty_after(event: Event, payload: Any) -> set[str]:
            d.refresher.dirty.clear()
            _hold(d, clock)
            runner.events.emit(event, payload)
            return set(d.refresher.dirty)

        lrs = [float(g["lr"]) for g in runner.optimizer.param_groups]
        same = StepSummary(1, 0, 0, 1.0, lrs, False, 0.001)
        assert dirty_after(Event.STEP, same) == {"heatmap", "loss", "status"}
        moved = StepSummary(2, 0, 1, 1.0, [lrs[0] / 2], False, 0.001)
        assert dirty_after(Event.STEP, moved) == {"heatmap", "loss", "status", "freeze", "lr"}
        assert dirty_after(Event.STEP, moved) == {"heatmap", "loss", "status"}  # LRs seen: no redraw
        runner.step()
        d.refresh()
        rec = runner.records[next(iter(runner.records))]
        assert dirty_after(Event.STAGE, rec) == {"pipeline", "status", "controls"}
        runner.set_lr(0.01)
        d.refresh()
        change = runner.history.controls[-1]
        assert dirty_after(Event.CONTROL, change) == set(BUILTIN) - {"errors"}
        runner.run(epochs=1)
        d.refresh()
        assert dirty_after(Event.EPOCH, runner.history.epochs[-1]) == {
            "loss",
            "lr",
            "freeze",
            "status",
            "fit",
        }
        assert dirty_after(Event.FINDING, object()) == {"findings"}
        # A failed stage: shown in the error area at once (no redraw), marked where it shows.
        assert dirty_after(Event.ERROR, rec) == {"pipeline", "findings", "status"}
        assert d.errors.count == 1 and f"stage {rec.stage.value}" in d.errors.text
        assert len(callback_errors.take()) == 1
    finally:
        d.close()


def test_a_panel_whose_handler_raises_is_reported_and_the_others_still_follow(runner, callback_errors):
    class Broken(StepCounter):
        name = "broken"

        def on_event(self, event: Event, payload: Any) -> bool:
            raise ZeroDivisionError("broken panel")

    d = tlw.Dashboard(runner, parts=[Broken, *PANELS])
    try:
        runner.run(steps=2)
        assert runner.global_step == 2  # training went on
        d.refresh()
        assert d.status.text.startswith("step 2") and len(d.loss.raw.y) == 2
        assert d.errors.count == 2 and "broken panel" in d.errors.text
        assert "broken panel (step event)" in d.errors.text
        assert len(callback_errors.take()) == 2
    finally:
        d.close()


def test_the_status_line_owns_the_meters_and_the_dashboard_exposes_them(runner):
    d = tlw.Dashboard(runner)
    try:
        assert d.tracking is d.status.tracking and d.rate is d.status.rate
        d.run("steps", 4)
        assert d.tracking.steps == 4
        assert d.last_run_rate > 0 and d.ui_seconds > 0
    finally:
        d.close()
    assert "measure_grads" not in runner.tracker.__dict__


def test_a_watcher_dashboard_wires_the_same_panels():
    model = torch.nn.Sequential(torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = torch.nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        d = tlw.Dashboard(w, parts=[*PANELS, StepCounter])
        try:
            for x, y in make_data(32):
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
            d.refresh()
            assert [s for e, s in d.counter.seen] == [1, 2]
            assert d.counter.value == "<b>2</b> steps" and d.status.text.startswith("step 2")
        finally:
            d.close()


# --------------------------------------------------------------------------- controls through the API only

_PRIVATE = [
    # session._x / runner._x / watcher._x / self.session._x / host.session._x
    re.compile(r"\b(session|runner|watcher|sess)\s*\)?\s*\.\s*_[A-Za-z]"),
    # getattr(self.session, "_x") / setattr(session, "_x", ...) / vars(session)
    re.compile(r"\b(getattr|setattr|hasattr|delattr)\(\s*[\w.]*(session|runner|watcher)\w*\s*,\s*[\"']_"),
    re.compile(r"\bvars\(\s*[\w.]*(session|runner|watcher)\b"),
    re.compile(r"\b(session|runner|watcher)\w*\.__dict__"),
]


def test_no_ui_module_touches_private_session_state():
    root = Path(ui.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in _PRIVATE):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "ui modules must use the session's public API:\n" + "\n".join(offenders)


def test_the_private_access_check_catches_what_freeze_py_used_to_do():
    old = [
        'held = getattr(self.session, "_bn_eval", {})',
        "self.session._bn_eval.pop(name)",
        "runner._pending.append(f)",
        "s = vars(session)",
    ]
    for line in old:
        assert any(p.search(line) for p in _PRIVATE), line
    for fine in ("self.session.set_bn_eval(True)", "self._session = session", "session.freeze_bn_stats"):
        assert not any(p.search(fine) for p in _PRIVATE), fine
