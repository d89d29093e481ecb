"""``tlw.Dashboard``: the panels, wired to a Runner's (or Watcher's) events and controls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode

from tlwidgets.core.events import Event
from tlwidgets.core.stages import Stage
from tlwidgets.ui.controls import ControlsPanel
from tlwidgets.ui.errors import ErrorArea
from tlwidgets.ui.findings import FindingsPanel
from tlwidgets.ui.freeze import FreezePanel
from tlwidgets.ui.heatmap import HeatmapPanel
from tlwidgets.ui.loss import LossPanel
from tlwidgets.ui.lr import LRPanel
from tlwidgets.ui.meters import RateMeter, TrackingTimer
from tlwidgets.ui.pipeline import PipelinePanel
from tlwidgets.ui.refresh import Refresher
from tlwidgets.ui.status import StatusLine
from tlwidgets.ui.style import CSS

__all__ = ["Dashboard"]

ALL_PARTS = ("status", "controls", "pipeline", "heatmap", "loss", "freeze", "lr", "findings")


class Dashboard(widgets.VBox):
    """An ipywidgets dashboard for a :class:`~tlwidgets.Runner` or a :class:`~tlwidgets.Watcher`.

    Panels (public attributes): ``controls`` (Step stage, Step, Run, Pause,
    Checkpoint/Rewind), ``status`` (the status line), ``pipeline`` (stage
    chips, records, loss→parameter graph), ``heatmap`` (update/weight per
    parameter and step), ``loss`` (loss, validation, control markers),
    ``freeze`` (module tree with freeze toggles), ``lr`` (LR sliders, range
    test), ``findings`` (ranked diagnoses) and ``errors`` (exceptions raised in
    runs and callbacks).

    The dashboard holds no training logic: it subscribes to the session's
    events, marks panels dirty and redraws them at most ``max_redraws_per_s``
    times a second (and at once after a click or at the end of a run); its
    buttons call the session's methods. Runs started with Run are asyncio
    tasks that yield between stages, so Pause, sliders and toggles act at the
    next stage boundary. Without a running event loop (a plain script or
    test) Run runs synchronously.

    Parameters
    ----------
    session
        A ``tlw.Runner`` or the ``tlw.watch(...)`` watcher (stepping controls hidden).
    heatmap_steps
        Recent steps shown by the heatmap.
    max_redraws_per_s
        Throttle of event-driven redraws.
    clock
        Time source, for tests.
    """

    selected_param = Unicode(None, allow_none=True, help="Parameter selected (heatmap row or finding).")
    selected_step = Int(None, allow_none=True, help="Global step selected (heatmap cell or finding).")
    running = Bool(False, help="True while a run started from this dashboard is in progress.")

    def __init__(
        self,
        session: Any,
        *,
        heatmap_steps: int = 50,
        max_redraws_per_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        **kwargs: Any,
    ) -> None:
        kind = getattr(session, "kind", None)
        if kind not in ("runner", "watch") or not hasattr(session, "events"):
            raise TypeError(
                "Dashboard takes a tlw.Runner or the watcher from tlw.watch(...), "
                f"got {type(session).__name__}"
            )
        self.session = session
        self.is_runner = kind == "runner"
        self.clock = clock
        self.task: asyncio.Task | None = None
        self.last_result: Any = None
        self._stop_on_finding = False
        self._stopped_by_finding: Any = None
        self._run_start = (0.0, 0)
        self._pause_t: float | None = None
        #: Seconds from the last Pause to the end of the run it stopped (kernel side).
        self.pause_latency_s: float | None = None
        self._last_run_rate = 0.0
        self._ui_s = 0.0
        self._last_lrs: list[float] = [float(g["lr"]) for g in session.optimizer.param_groups]
        self._closed = False

        self.errors = ErrorArea()
        guard = self.errors.guard
        self.status = StatusLine()
        self.controls = ControlsPanel(can_step=self.is_runner)
        self.pipeline = PipelinePanel(guard, self.refresh)
        self.heatmap = HeatmapPanel(
            list(session.param_names), guard, self._selected_cell, steps=heatmap_steps
        )
        self.loss = LossPanel(guard)
        self.freeze = FreezePanel(session, guard, self.refresh)
        self.lr = LRPanel(session, guard, self.refresh, is_running=lambda: self.running)
        self.findings = FindingsPanel(guard, self.select_finding)
        self.refresher = Refresher(
            self._draw,
            max_rate=max_redraws_per_s,
            clock=clock,
            on_error=lambda e: self.errors.report("redraw", e),
            # The plots cost the browser most to re-render: during a run they follow at ~4/s.
            part_intervals={"heatmap": 0.25, "loss": 0.25},
        )
        self.rate = RateMeter(clock=clock)
        self.tracking = TrackingTimer(session)
        self.controls.connect(
            step_stage=guard("Step stage")(self.step_stage),
            step=guard("Step")(self.step),
            run=guard("Run")(self.run),
            pause=guard("Pause")(self.pause),
            checkpoint=guard("Checkpoint")(self.checkpoint),
            rewind=guard("Rewind")(self.rewind),
        )

        title = widgets.HTML("<span class='tlw-title'>tlwidgets</span>")
        self.tabs = widgets.Tab(children=[self.findings, self.freeze, self.lr])
        self.tabs.titles = ("Findings", "Freeze", "LR")
        self.tabs.add_class("tlw-tabs")
        self.heatmap.layout = widgets.Layout(flex="1 1 55%", min_width="380px")
        self.loss.layout = widgets.Layout(flex="1 1 45%", min_width="320px")
        plots = widgets.HBox(
            [self.heatmap, self.loss], layout=widgets.Layout(flex_flow="row wrap", width="100%")
        )
        super().__init__(
            children=[
                widgets.HTML(CSS),
                widgets.HBox([title, self.status], layout=widgets.Layout(align_items="center")),
                self.controls,
                self.errors,
                self.pipeline,
                plots,
                self.tabs,
            ],
            **kwargs,
        )
        self.add_class("tlw-dashboard")
        if not self.is_runner:
            self.add_class("tlw-dashboard-watch")

        self._unsubscribe = [
            session.events.on(Event.STAGE, self._timed(self._on_stage)),
            session.events.on(Event.STEP, self._timed(self._on_step)),
            session.events.on(Event.EPOCH, self._timed(self._on_epoch)),
            session.events.on(Event.FINDING, self._timed(self._on_finding)),
            session.events.on(Event.ERROR, self._timed(self._on_error)),
            session.events.on(Event.CONTROL, self._timed(self._on_control)),
        ]
        for rec in (getattr(session, "records", {}) or {}).values():
            self.pipeline.remember(rec)
        self.refresh()
        self._ui_s = 0.0  # the status reports the cost per step of following the run, not of building

    # ------------------------------------------------------------------ events (cheap: mark dirty)
    def _timed(self, handler: Callable[[Any], None]) -> Callable[[Any], None]:
        def wrapper(payload: Any) -> None:
            t0 = time.perf_counter()
            try:
                handler(payload)
            except Exception as exc:  # shown in the dashboard; the EventBus would only log it
                self.errors.report(f"{handler.__name__.strip('_')} handler", exc)
            finally:
                self._ui_s += time.perf_counter() - t0

        return wrapper

    def _on_stage(self, record: Any) -> None:
        self.pipeline.remember(record)
        self.refresher.mark("pipeline", "status", "controls")

    def _on_step(self, summary: Any) -> None:
        self.rate.add(summary.step)
        self.tracking.step_done()
        parts = ["heatmap", "loss", "status"]
        lrs = list(summary.lr)
        if lrs != self._last_lrs:  # a scheduler (or a control) moved the LR
            self._last_lrs = lrs
            parts += ["lr", "freeze"]
        self.refresher.mark(*parts)

    def _on_epoch(self, record: Any) -> None:
        self.refresher.mark("loss", "lr", "freeze", "status")

    def _on_finding(self, finding: Any) -> None:
        if self._stop_on_finding and self.running and self.is_runner:
            self.session.pause()
            self._stopped_by_finding = finding
        self.refresher.mark("findings")

    def _on_error(self, record: Any) -> None:
        err = record.error
        text = f"{err.type}: {err.message}" if err is not None else "failed"
        self.errors.report(f"stage {record.stage.value} (step {record.step})", message=text)
        self.refresher.mark("pipeline", "findings", "status")

    def _on_control(self, change: Any) -> None:
        self._last_lrs = [float(g["lr"]) for g in self.session.optimizer.param_groups]
        if change.kind == "rewind":
            self.rate.reset()
        self.refresher.mark("freeze", "lr", "heatmap", "loss", "controls", "status", "findings")

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Redraw everything now (after a click, at the end of a run)."""
        self.refresher.dirty.update(ALL_PARTS)
        self.refresher.flush()

    def _draw(self, parts: set[str]) -> None:
        if self._closed:
            return
        s = self.session
        t0 = time.perf_counter()
        for part in ALL_PARTS:  # fixed order: status last sees the final state
            if part not in parts or part == "status":
                continue
            try:
                if part == "controls":
                    self._draw_controls()
                else:
                    getattr(self, part).draw(s)
            except Exception as exc:
                self.errors.report(f"drawing {part}", exc)
        n = self.findings.count
        title = f"Findings ({n})" if n else "Findings"
        if self.tabs.titles[0] != title:
            self.tabs.set_title(0, title)
        self._ui_s += time.perf_counter() - t0
        if "status" in parts:
            self._draw_status()

    def _draw_controls(self) -> None:
        if not self.is_runner:
            return
        s = self.session
        labels = [
            (f"#{ck.id} step {ck.step}" + (f" {ck.label}" if ck.label else ""), ck)
            for ck in reversed(s.checkpoints)
        ]
        at_boundary = s.stage is Stage.FETCH and not s.records.get(Stage.FETCH)
        self.controls.set_checkpoints(labels, at_boundary or (s.stage is Stage.FETCH))

    def _draw_status(self) -> None:
        s = self.session
        steps = max(self.tracking.steps, 1)
        if self.running:
            state = "running"
        elif not self.is_runner:
            state = "watching your loop"
        elif self.last_result is not None and getattr(self.last_result, "stopped_by", "") == "pause":
            state = "paused"
        else:
            state = "idle"
        self.status.draw(
            s,
            rate=self.rate.rate() if self.running or not self.is_runner else self._last_run_rate,
            rate_label="steps/s" if self.running or not self.is_runner else "steps/s (last run)",
            tracking_ms=self.tracking.ms_per_step() if self.tracking.steps else None,
            ui_ms=1000.0 * self._ui_s / steps if self.tracking.steps else None,
            state=state,
        )

    # ------------------------------------------------------------------ actions (buttons call these)
    def step_stage(self) -> Any:
        """Run one stage (exact statistics); show its record if a record is open."""
        self._require_runner("Step stage")
        rec = self.session.step_stage()
        if self.pipeline.shown_stage is not None and getattr(rec, "stage", None) is not None:
            self.pipeline.show(rec.stage)
        self.refresh()
        return rec

    def step(self) -> Any:
        """Finish the current batch (one optimizer step from a boundary)."""
        self._require_runner("Step")
        rec = self.session.step()
        self.refresh()
        return rec

    def run(self, mode: str | None = None, steps: int | None = None) -> Any:
        """Start a run: ``mode`` ``"steps"`` (N steps), ``"epoch"`` or ``"finding"`` (until a new
        finding, at most N steps); defaults come from the controls.

        With a running asyncio loop (Jupyter) the run is a task (:attr:`task`) and this returns it;
        otherwise the run happens now and its :class:`~tlwidgets.RunResult` is returned.
        """
        self._require_runner("Run")
        if self.running or self.session.running:
            self.controls.say("a run is already in progress")
            return None
        sel_mode, sel_steps = self.controls.run_request()
        mode = mode or sel_mode
        n = int(steps if steps is not None else sel_steps)
        if mode == "steps":
            kwargs: dict[str, Any] = {"steps": n}
        elif mode == "epoch":
            kwargs = {"epochs": 1}
        elif mode == "finding":
            kwargs = {"steps": n}
        else:
            raise ValueError(f"run mode must be 'steps', 'epoch' or 'finding', got {mode!r}")
        self._stop_on_finding = mode == "finding"
        self._set_running(True)
        self._run_start = (time.perf_counter(), self.session.global_step)
        self.controls.say("running…")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            result = None
            try:
                result = self.session.run(**kwargs)
            finally:
                self._run_finished(result, None)
            return result
        try:
            self.task = loop.create_task(self._run_task(kwargs))
        except BaseException:
            self._set_running(False)
            raise
        self.task.add_done_callback(self._task_done)
        return self.task

    async def _run_task(self, kwargs: dict[str, Any]) -> Any:
        return await self.session.run_async(**kwargs)

    def _task_done(self, task: asyncio.Task) -> None:
        try:
            exc = None if task.cancelled() else task.exception()
            result = None if task.cancelled() or exc is not None else task.result()
            self._run_finished(result, exc, cancelled=task.cancelled())
        except Exception as err:  # never lose it: this runs from the event loop
            self.errors.report("run task", err)

    def _run_finished(self, result: Any, exc: BaseException | None, cancelled: bool = False) -> None:
        self._stop_on_finding = False
        stopped_by, self._stopped_by_finding = self._stopped_by_finding, None
        t0, step0 = self._run_start
        elapsed = time.perf_counter() - t0
        if elapsed > 0 and self.session.global_step > step0:
            self._last_run_rate = (self.session.global_step - step0) / elapsed
        self.running = False
        if exc is not None:
            self.errors.report("run", exc)
            self.controls.say("the run raised (see the error above)")
        elif cancelled:
            self.controls.say("run cancelled")
        elif result is not None:
            self.last_result = result
            text = str(result)
            if stopped_by is not None and result.stopped_by == "pause":
                text += f" (new finding: {stopped_by.code})"
            self.controls.say(text)
        if self._pause_t is not None:
            self.pause_latency_s = time.perf_counter() - self._pause_t
            self._pause_t = None
        try:
            # Status first, then the buttons: when Run is enabled again in the browser, the status
            # line already shows where the run stopped; the heavier panels follow.
            self._draw_status()
            self.controls.running = False
            self.refresh()
        finally:
            self.controls.running = False

    def _set_running(self, value: bool) -> None:
        self.running = value
        self.controls.running = value

    def pause(self) -> None:
        """Ask the run to stop at the next stage boundary."""
        if not self.is_runner:
            return
        self.session.pause()
        if self.running:
            self._pause_t = time.perf_counter()
            self.controls.say("pausing…")

    def checkpoint(self) -> Any:
        """Take a checkpoint (at a step boundary)."""
        self._require_runner("Checkpoint")
        if self.session.stage is not Stage.FETCH:
            self.controls.say(
                "checkpoints are taken at a step boundary; "
                f"next stage is {self.session.stage.value}: press Step"
            )
            return None
        ck = self.session.checkpoint(label="")
        self.controls.say(f"checkpoint #{ck.id} at step {ck.step}")
        self.refresh()
        return ck

    def rewind(self, handle: Any = None) -> Any:
        """Rewind to ``handle`` (default: the checkpoint chosen in the controls)."""
        self._require_runner("Rewind")
        if self.running:
            self.controls.say("pause the run before rewinding")
            return None
        handle = handle if handle is not None else self.controls.checkpoints.value
        if handle is None:
            self.controls.say("no checkpoint to rewind to: press Checkpoint first")
            return None
        ck = self.session.rewind(handle)
        self.controls.say(f"rewound to checkpoint #{ck.id} (step {ck.step})")
        self.refresh()
        return ck

    def _require_runner(self, what: str) -> None:
        if not self.is_runner:
            raise RuntimeError(f"{what} needs a tlw.Runner; with watch() your own loop does the stepping")

    # ------------------------------------------------------------------ selection
    def _selected_cell(self, param: str | None, step: int | None) -> None:
        self.selected_param = param
        self.selected_step = step
        self.loss.selected_step = step
        self.refresher.dirty.add("loss")
        self.refresh()

    def select_finding(self, finding: Any) -> None:
        """Select a finding's step and (first) parameter in the heatmap and loss plot."""
        names = list(self.session.param_names)
        param = None
        for p in getattr(finding, "params", ()) or ():
            if p in names:
                param = p
                break
            under = [n for n in names if n.startswith(p + ".")]
            if under:
                param = under[0]
                break
        self.selected_param = param
        self.selected_step = finding.step
        self.heatmap.select(param)
        self.loss.selected_step = finding.step
        if finding.stage is not None:
            self.pipeline.show(finding.stage)
        self.refresh()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unsubscribe from the session, restore its tracker and close every widget."""
        if getattr(self, "_closed", True):  # also when __init__ failed before the end
            return
        self._closed = True
        for off in self._unsubscribe:
            off()
        self.refresher.cancel()
        self.tracking.close()
        if self.task is not None and not self.task.done() and self.is_runner:
            self.session.pause()
        _close_tree(self)

    def __repr__(self) -> str:
        return f"Dashboard({self.session!r})"


def _close_tree(widget: Any) -> None:
    for child in list(getattr(widget, "children", ()) or ()):
        _close_tree(child)
    for attr in ("marks", "axes"):
        for item in list(getattr(widget, attr, ()) or ()):
            _close_tree(item)
    widgets.Widget.close(widget)
