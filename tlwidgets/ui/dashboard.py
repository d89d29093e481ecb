"""``tlw.Dashboard``: the registered panels, wired to a Runner's (or Watcher's) events and controls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode

from tlwidgets.core.events import Event
from tlwidgets.core.stages import Stage
from tlwidgets.ui.errors import guard_with
from tlwidgets.ui.panel import Panel
from tlwidgets.ui.refresh import Refresher
from tlwidgets.ui.registry import PANELS, resolve_parts
from tlwidgets.ui.style import CSS

__all__ = ["Dashboard"]

log = logging.getLogger("tlwidgets.ui")

F = TypeVar("F", bound=Callable[..., Any])


class Dashboard(widgets.VBox):
    """An ipywidgets dashboard for a :class:`~tlwidgets.Runner` or a :class:`~tlwidgets.Watcher`.

    The dashboard is built from panels (:class:`~tlwidgets.ui.Panel`), by
    default every one in :data:`tlwidgets.ui.PANELS`; each is a public
    attribute named after it: ``controls`` (Step stage, Step, Run, Pause,
    Checkpoint/Rewind), ``status`` (the status line), ``pipeline`` (stage
    chips, records, loss→parameter graph), ``heatmap`` (update/weight per
    parameter and step), ``loss`` (loss, validation, control markers),
    ``freeze`` (module tree with freeze toggles), ``lr`` (LR sliders, range
    test), ``findings`` (ranked diagnoses) and ``errors`` (exceptions raised in
    runs and callbacks). ``panels`` maps names to panels.

    The dashboard holds no training logic. In one place for all panels it
    subscribes to the session events the panels declare, hands each event to
    the panels that listen (:meth:`Panel.on_event`), marks them dirty and
    redraws dirty panels at most ``max_redraws_per_s`` times a second (and at
    once after a click or at the end of a run); its buttons call the session's
    methods. Runs started with Run are asyncio tasks that yield between
    stages, so Pause, sliders and toggles act at the next stage boundary.
    Without a running event loop (a plain script or test) Run runs
    synchronously.

    Parameters
    ----------
    session
        A ``tlw.Runner``, the ``tlw.watch(...)`` watcher (stepping controls hidden), or a
        framework ``DebugCallback`` (:mod:`tlwidgets.integrations`): before its fit starts the
        dashboard shows a waiting line, and it builds the panels when the fit creates its
        watcher (again for each later fit); after the fit they stay, showing the last fit.
    parts
        The panels to show: registered names and/or :class:`~tlwidgets.ui.Panel`
        classes (a class need not be registered). None: every registered panel.
        The controls, the status line and the error area are always there; an
        attribute of a registered panel left out is None.
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
        parts: Iterable[str | type[Panel]] | None = None,
        heatmap_steps: int = 50,
        max_redraws_per_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        **kwargs: Any,
    ) -> None:
        source = None
        kind = getattr(session, "kind", None)
        if kind not in ("runner", "watch") and callable(getattr(session, "on_attach", None)):
            # A framework callback: its watcher exists once the fit starts (deferred attach).
            source, session = session, getattr(session, "session", None)
        elif kind not in ("runner", "watch") or not hasattr(session, "events"):
            raise TypeError(
                "Dashboard takes a tlw.Runner, the watcher from tlw.watch(...) or a framework "
                f"DebugCallback, got {type(session).__name__}"
            )
        classes = resolve_parts(parts)
        for cls in classes:
            if hasattr(type(self), cls.name) or cls.name in _OWN_ATTRIBUTES:
                raise ValueError(
                    f"panel name {cls.name!r} ({cls.__qualname__}) is taken by the Dashboard itself; "
                    "choose another name"
                )
        #: The framework callback this dashboard follows (None for a Runner or a watcher).
        self.source = source
        self._classes = classes
        self.clock = clock
        self.heatmap_steps = heatmap_steps
        self._max_redraws = max_redraws_per_s
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
        self._closed = False
        self._unsubscribe: list[Callable[[], None]] = []
        self._detach_source: Callable[[], None] | None = None
        #: The panels shown, by name (also attributes: ``dashboard.<name>``).
        self.panels: dict[str, Panel] = {}
        for name in PANELS:  # a registered panel left out reads as None
            setattr(self, name, None)
        self.tabs: widgets.Tab | None = None
        #: A Step stage click that would apply NaN/Inf gradients was refused once (the next one applies).
        self._nan_confirmed = False
        self.refresher: Refresher | None = None

        if session is None:  # a callback before its fit: a waiting line until the watcher exists
            self.session = None
            self.is_runner = False
            self._waiting = widgets.HTML(
                "<span class='tlw-waiting'>waiting for the fit to start: the panels appear when "
                "the trainer creates the optimizer</span>"
            )
            super().__init__(children=self._header([], extra=[self._waiting]), **kwargs)
            self.add_class("tlw-dashboard")
            self.add_class("tlw-dashboard-watch")
        else:
            children = self._build(session)
            super().__init__(children=children, **kwargs)
            self.add_class("tlw-dashboard")
            if not self.is_runner:
                self.add_class("tlw-dashboard-watch")
            self._subscribe()
            self.refresh()
            self._ui_s = 0.0  # the status reports the cost per step of following the run, not of building
        if source is not None:
            self._detach_source = source.on_attach(self._on_source_attach)

    def _build(self, session: Any) -> list[widgets.Widget]:
        """Build the panels for ``session`` (sets the panel attributes and the refresher); the children."""
        self.session = session
        self.is_runner = getattr(session, "kind", None) == "runner"
        self.panels = {}
        try:
            for cls in self._classes:
                panel = cls.build(self)
                self.panels[cls.name] = panel
                setattr(self, cls.name, panel)
        except BaseException:
            self._close_panels()  # e.g. the status line already timing the tracker
            raise
        ordered = list(self.panels.values())
        self._draw_order = [p for p in ordered if not p.draw_last] + [p for p in ordered if p.draw_last]
        self.refresher = Refresher(
            self._draw,
            max_rate=self._max_redraws,
            clock=self.clock,
            on_error=lambda e: self.report("redraw", e),
            part_intervals={p.name: p.min_interval for p in ordered if p.min_interval > 0},
        )
        return self._layout(ordered)

    def _subscribe(self) -> None:
        """One subscription per event that a panel (or the dashboard's run control) listens to."""
        listeners: dict[Event, list[Panel]] = {}
        for panel in self.panels.values():
            for ev in panel.events:
                listeners.setdefault(Event(ev), []).append(panel)
        for ev in Event:
            if ev in listeners or ev is Event.FINDING:
                self._unsubscribe.append(
                    self.session.events.on(ev, self._dispatcher(ev, listeners.get(ev, [])))
                )

    def _on_source_attach(self, session: Any) -> None:
        """The callback's fit created its watcher: (re)build the panels for it; the same watcher
        again: its fit ended, draw the final state."""
        if self._closed:
            return
        if session is self.session:
            self.refresh()
            return
        try:
            if self.panels:  # a later fit: the panels of the previous watcher go
                self._release_session()
            self.children = self._build(session)
            self._subscribe()
            self.refresh()
        except Exception as exc:
            log.error("tlwidgets dashboard: attaching to the fit's watcher raised %s", exc, exc_info=exc)

    def _release_session(self) -> None:
        for off in self._unsubscribe:
            off()
        self._unsubscribe = []
        if self.refresher is not None:
            self.refresher.cancel()
        self._close_panels()
        for child in list(self.children):
            _close_tree(child)
        self.panels = {}
        for name in PANELS:
            setattr(self, name, None)

    def _header(self, panels: list[Panel], extra: list[widgets.Widget] = ()) -> list[widgets.Widget]:
        title = widgets.HTML("<span class='tlw-title'>tlwidgets</span>")
        return [
            widgets.HTML(CSS),
            widgets.HBox(
                [title, *(_widget(p) for p in panels), *extra],
                layout=widgets.Layout(align_items="center"),
            ),
        ]

    def _layout(self, panels: list[Panel]) -> list[widgets.Widget]:
        """The dashboard's children: title and header panels, main panels, plots side by side, tabs."""
        by_slot: dict[str, list[Panel]] = {}
        for panel in panels:
            by_slot.setdefault(panel.slot, []).append(panel)
        children: list[widgets.Widget] = [
            *self._header(by_slot.get("header", [])),
            *(_widget(p) for p in by_slot.get("main", [])),
        ]
        plots = [_widget(p) for p in by_slot.get("plots", [])]
        if plots:
            children.append(widgets.HBox(plots, layout=widgets.Layout(flex_flow="row wrap", width="100%")))
        self._tab_panels = by_slot.get("tabs", [])
        self.tabs = None
        if self._tab_panels:
            self.tabs = widgets.Tab(children=[_widget(p) for p in self._tab_panels])
            self.tabs.titles = tuple(p.tab_caption() for p in self._tab_panels)
            self.tabs.add_class("tlw-tabs")
            children.append(self.tabs)
        return children

    # ------------------------------------------------------------------ events (cheap: mark dirty)
    def _dispatcher(self, event: Event, listeners: list[Panel]) -> Callable[[Any], None]:
        """The one handler of ``event``: run control, then each listening panel; mark them dirty."""
        panels = tuple(listeners)

        def dispatch(payload: Any) -> None:
            t0 = time.perf_counter()
            try:
                if event is Event.FINDING:
                    self._on_finding(payload)
                dirty = []
                for panel in panels:
                    try:
                        if panel.on_event(event, payload) is not False:
                            dirty.append(panel.name)
                    except Exception as exc:  # shown in the dashboard; the EventBus would only log it
                        self.report(f"{panel.name} panel ({event.value} event)", exc)
                if dirty:
                    self.refresher.mark(*dirty)
            except Exception as exc:
                self.report(f"{event.value} handler", exc)
            finally:
                self._ui_s += time.perf_counter() - t0

        dispatch.__name__ = f"on_{event.value}"
        return dispatch

    def _on_finding(self, finding: Any) -> None:
        if self._stop_on_finding and self.running and self.is_runner:
            self.session.pause()
            self._stopped_by_finding = finding

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Redraw everything now (after a click, at the end of a run)."""
        if self.refresher is None:  # a callback's dashboard before the fit: nothing to draw
            return
        self.refresher.dirty.update(self.panels)
        self.refresher.flush()

    def _draw(self, parts: set[str]) -> None:
        if self._closed:
            return
        for panel in self._draw_order:  # fixed order: the status line last sees the final state
            if panel.name not in parts:
                continue
            t0 = time.perf_counter()
            try:
                panel.draw(self.session)
            except Exception as exc:
                self.report(f"drawing {panel.name}", exc)
            finally:
                self._ui_s += time.perf_counter() - t0
        if self.tabs is not None:
            for i, panel in enumerate(self._tab_panels):
                caption = panel.tab_caption()
                if self.tabs.titles[i] != caption:
                    self.tabs.set_title(i, caption)

    # ------------------------------------------------------------------ what panels use (PanelHost)
    def guard(self, where: str) -> Callable[[F], F]:
        """Decorator for widget callbacks: an exception is shown in the error area, not lost."""
        return guard_with(self.report, where)

    def report(self, where: str, exc: BaseException | None = None, *, message: str | None = None) -> None:
        """Show an exception (or a plain message) that happened in ``where`` in the error area."""
        errors = self.panels.get("errors") if hasattr(self, "panels") else None
        if errors is not None:
            errors.report(where, exc, message=message)
        elif exc is not None:
            info = (type(exc), exc, exc.__traceback__)
            log.error("tlwidgets dashboard: %s raised %s", where, exc, exc_info=info)
        else:
            log.error("tlwidgets dashboard: %s: %s", where, message)

    @property
    def rate(self) -> Any:
        """The step-rate meter (:class:`~tlwidgets.ui.meters.RateMeter`, kept by the status line)."""
        return self.status.rate

    @property
    def tracking(self) -> Any:
        """The tracking-cost meter (:class:`~tlwidgets.ui.meters.TrackingTimer`, kept by the status line)."""
        return self.status.tracking

    @property
    def last_run_rate(self) -> float:
        """Steps per second of the last run started from this dashboard (0 before one)."""
        return self._last_run_rate

    @property
    def ui_seconds(self) -> float:
        """Seconds spent in event handlers and redraws since the dashboard was built."""
        return self._ui_s

    # ------------------------------------------------------------------ actions (buttons call these)
    def step_stage(self) -> Any:
        """Run one stage (exact statistics) and show its record (what just ran is what one wants to see)."""
        self._require_runner("Step stage")
        if getattr(self.session, "holding_non_finite_grads", False) and not self._nan_confirmed:
            # A click is not a decision to write NaN/Inf into the weights: ask for a second one.
            self._nan_confirmed = True
            self.controls.say(
                "the gradients hold NaN/Inf: Step stage would write them into the weights. Press it again "
                "to apply them anyway, or Rewind (or runner.skip_batch() to drop this batch)"
            )
            return None
        self._nan_confirmed = False
        rec = self.session.step_stage()
        pipeline = self.panels.get("pipeline")
        stage = getattr(rec, "stage", None)
        if pipeline is not None and stage is not None:
            pipeline.show(stage)
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
            self.report("run task", err)

    def _run_finished(self, result: Any, exc: BaseException | None, cancelled: bool = False) -> None:
        self._stop_on_finding = False
        stopped_by, self._stopped_by_finding = self._stopped_by_finding, None
        t0, step0 = self._run_start
        elapsed = time.perf_counter() - t0
        if elapsed > 0 and self.session.global_step > step0:
            self._last_run_rate = (self.session.global_step - step0) / elapsed
        self.running = False
        if exc is not None:
            self.report("run", exc)
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
            self.status.draw(self.session)
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
        try:
            ck = self.session.checkpoint(label="")
        except ValueError as exc:  # a data source that cannot be replayed (a one-shot generator)
            self.controls.say(str(exc))
            return None
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
        try:
            ck = self.session.rewind(handle)
        except ValueError as exc:
            self.controls.say(str(exc))
            return None
        self.controls.say(f"rewound to checkpoint #{ck.id} (step {ck.step})")
        self.refresh()
        return ck

    def _require_runner(self, what: str) -> None:
        if not self.is_runner:
            raise RuntimeError(f"{what} needs a tlw.Runner; with watch() your own loop does the stepping")

    # ------------------------------------------------------------------ selection
    def select(self, param: str | None, step: int | None, stage: Any = None) -> None:
        """Select a parameter, a step and (optionally) a stage in every panel, then redraw.

        Each panel follows through :meth:`Panel.show_selection`: the heatmap
        highlights the parameter's row and shows its history, the loss plot
        marks the step, the pipeline opens the stage's record.
        """
        self.selected_param = param
        self.selected_step = step
        for panel in self.panels.values():
            try:
                panel.show_selection(param, step, stage)
            except Exception as exc:
                self.report(f"{panel.name} panel (selection)", exc)
        self.refresh()

    def select_finding(self, finding: Any) -> None:
        """Select a finding's step, (first) parameter and stage (heatmap, loss plot, pipeline)."""
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
        self.select(param, finding.step, finding.stage)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unsubscribe from the session, close every panel (the status line restores the
        tracker) and every widget."""
        if getattr(self, "_closed", True):  # also when __init__ failed before the end
            return
        self._closed = True
        if self._detach_source is not None:
            self._detach_source()
        for off in self._unsubscribe:
            off()
        if self.refresher is not None:
            self.refresher.cancel()
        if self.task is not None and not self.task.done() and self.is_runner:
            self.session.pause()
        self._close_panels()
        _close_tree(self)

    def _close_panels(self) -> None:
        for panel in self.panels.values():
            try:
                closer = getattr(panel, "close", None) or _widget(panel).close
                closer()
            except Exception as exc:  # closing one panel must not keep the others open
                log.error("tlwidgets dashboard: closing panel %s raised %s", panel.name, exc)

    def __repr__(self) -> str:
        return f"Dashboard({self.session if self.session is not None else self.source!r})"


#: Instance attributes of the Dashboard that a panel name must not replace.
_OWN_ATTRIBUTES = frozenset(
    {
        "session",
        "source",
        "is_runner",
        "clock",
        "heatmap_steps",
        "task",
        "last_result",
        "pause_latency_s",
        "panels",
        "refresher",
        "tabs",
    }
)


def _widget(panel: Panel) -> widgets.Widget:
    """The widget a panel shows: the panel itself, or its ``widget`` attribute."""
    return panel if isinstance(panel, widgets.Widget) else panel.widget  # type: ignore[attr-defined]


def _close_tree(widget: Any) -> None:
    for child in list(getattr(widget, "children", ()) or ()):
        _close_tree(child)
    for attr in ("marks", "axes"):
        for item in list(getattr(widget, attr, ()) or ()):
            _close_tree(item)
    widgets.Widget.close(widget)
