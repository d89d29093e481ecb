"""The panel protocol: what a dashboard part declares, and what the dashboard does with it.

A panel is one class. It says which session events it listens to
(:attr:`Panel.events`), where it sits (:attr:`Panel.slot`), how to build it
from the dashboard (:meth:`Panel.build`) and how to draw itself from the
session (:meth:`Panel.draw`). :class:`~tlwidgets.ui.Dashboard` does the rest
in one place for every panel: it subscribes to the events, calls
:meth:`Panel.on_event` (cheap: remember the payload, decide whether a redraw
is needed), marks the panel dirty, redraws dirty panels through its throttled
refresher, and closes the panel with the dashboard. Adding a panel is one
class plus one registry entry (:func:`tlwidgets.ui.register_panel`, or a line
in ``tlwidgets/ui/registry.py`` for a built-in one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

from tlwidgets.core.events import Event

__all__ = ["SLOTS", "LRFollowingPanel", "Panel", "PanelHost"]

#: Where a panel can sit, top to bottom: next to the title, full width, side by side, in a tab.
SLOTS = ("header", "main", "plots", "tabs")

F = TypeVar("F", bound=Callable[..., Any])


class PanelHost(Protocol):
    """What a dashboard offers the panels it builds (:class:`~tlwidgets.ui.Dashboard` is one).

    Attributes
    ----------
    session
        The Runner or Watcher shown.
    is_runner
        False for a watcher (your own loop does the stepping).
    running
        True while a run started from the dashboard is in progress.
    clock
        Time source (seconds).
    heatmap_steps
        Recent steps shown by the heatmap.
    last_result
        The ``RunResult`` of the last run started from the dashboard (None before one).
    last_run_rate
        Steps per second of that run.
    ui_seconds
        Seconds the dashboard spent in event handlers and redraws.
    """

    session: Any
    is_runner: bool
    running: bool
    clock: Callable[[], float]
    heatmap_steps: int
    last_result: Any
    last_run_rate: float
    ui_seconds: float

    def guard(self, where: str) -> Callable[[F], F]:
        """Decorator for widget callbacks: an exception is shown in the dashboard, not lost."""
        ...

    def report(self, where: str, exc: BaseException | None = None, *, message: str | None = None) -> None:
        """Show an exception (or a plain message) in the dashboard's error area."""
        ...

    def refresh(self) -> None:
        """Redraw every panel now (after a click)."""
        ...

    def select(self, param: str | None, step: int | None, stage: Any = None) -> None:
        """Select a parameter / step / stage in every panel that shows selections."""
        ...

    def select_finding(self, finding: Any) -> None:
        """Select a finding's step, first parameter and stage."""
        ...

    # The actions behind the control buttons (a Runner only).
    def step_stage(self) -> Any: ...
    def step(self) -> Any: ...
    def run(self, mode: str | None = None, steps: int | None = None) -> Any: ...
    def pause(self) -> None: ...
    def checkpoint(self) -> Any: ...
    def rewind(self, handle: Any = None) -> Any: ...


class Panel:
    """Base of a dashboard panel: mix it into an ipywidgets class (``class P(Panel, widgets.VBox)``).

    The panel is the widget shown. A panel that is not a widget itself sets a
    ``widget`` attribute (the widget shown) and may define ``close()``.

    Attributes
    ----------
    name
        The registry key and the dashboard attribute (``dashboard.<name>``) and
        the name the refresher knows the panel by; a Python identifier.
    events
        The session events (:class:`~tlwidgets.core.events.Event`) the panel
        listens to; each one calls :meth:`on_event` and marks the panel dirty.
    slot
        Where it sits: ``"header"`` (next to the title), ``"main"`` (full
        width, stacked), ``"plots"`` (side by side, wrapping) or ``"tabs"``.
    caption
        The tab title (slot ``"tabs"``); see :meth:`tab_caption`.
    min_interval
        Seconds between two event-driven redraws of this panel, for panels
        that cost the browser much to re-render (0: the dashboard's rate).
    draw_last
        Drawn after the others in a redraw (the status line, which reports
        what the redraw cost).
    required
        Always built, whatever ``Dashboard(parts=...)`` asks for (the
        dashboard's own controls, status line and error area).
    """

    name: ClassVar[str] = ""
    events: ClassVar[tuple[Event, ...]] = ()
    slot: ClassVar[str] = "main"
    caption: ClassVar[str] = ""
    min_interval: ClassVar[float] = 0.0
    draw_last: ClassVar[bool] = False
    required: ClassVar[bool] = False

    @classmethod
    def build(cls, host: PanelHost) -> Panel:
        """Create the panel for ``host`` (default: ``cls()``); override to pass what it needs."""
        return cls()

    def on_event(self, event: Event, payload: Any) -> bool | None:
        """Handle one of :attr:`events` (cheap: no drawing); return False when no redraw is needed."""
        return True

    def draw(self, session: Any) -> None:
        """Redraw from the session (called by the refresher, throttled)."""
        return None

    def tab_caption(self) -> str:
        """The tab title now (default :attr:`caption`; e.g. a count can be added)."""
        return self.caption

    def show_selection(self, param: str | None, step: int | None, stage: Any) -> None:
        """Follow the dashboard's selection (a heatmap cell, a finding); optional."""
        return None


class LRFollowingPanel(Panel):
    """A panel that shows learning rates: redrawn on a STEP only when an LR moved.

    Subclasses keep the session in ``self.session``. STEP, EPOCH and CONTROL
    events mark the panel dirty, a STEP only when the step's LRs differ from
    the last ones seen (a scheduler or a control moved them).
    """

    events: ClassVar[tuple[Event, ...]] = (Event.STEP, Event.EPOCH, Event.CONTROL)
    _seen_lrs: list[float] | None = None

    def on_event(self, event: Event, payload: Any) -> bool | None:
        if event is Event.STEP:
            lrs = [float(v) for v in payload.lr]
            if lrs == self._seen_lrs:
                return False
            self._seen_lrs = lrs
            return True
        if event is Event.CONTROL:
            self.remember_lrs()
        return True

    def remember_lrs(self) -> None:
        """Take the optimizer's current LRs as the last ones seen."""
        session = getattr(self, "session", None)
        if session is not None:
            self._seen_lrs = [float(g["lr"]) for g in session.optimizer.param_groups]
