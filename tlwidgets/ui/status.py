"""The status line: global step, epoch, next stage, steps per second and tracking cost."""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as widgets
from traitlets import Unicode

from tlwidgets.core.events import Event
from tlwidgets.ui.meters import RateMeter, TrackingTimer
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["StatusLine"]


class StatusLine(Panel, widgets.HTML):
    """One line of text (CSS class ``tlw-status``) holding the global step.

    Example: ``step 12 · epoch 0 · next: forward · 35.2 steps/s · tracking 0.4 ms/step · idle``.

    In a dashboard (``host`` given) it owns the step-rate meter (:attr:`rate`)
    and the tracking-cost meter (:attr:`tracking`, released by :meth:`close`)
    and reads the run state from the dashboard.

    Parameters
    ----------
    host
        The dashboard (see :class:`~tlwidgets.ui.panel.PanelHost`), or None for
        a bare line drawn with :meth:`show`.
    """

    name = "status"
    events = (Event.STAGE, Event.STEP, Event.EPOCH, Event.ERROR, Event.CONTROL)
    slot = "header"
    draw_last = True  # it reports what following the run cost, the other panels' redraws included
    required = True

    text = Unicode("", help="The status line as plain text (what the HTML shows).")

    def __init__(self, host: PanelHost | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_class("tlw-status")
        self._host = host
        self.rate = RateMeter(clock=host.clock if host is not None else time.perf_counter)
        self.tracking = TrackingTimer(host.session if host is not None else None)

    @classmethod
    def build(cls, host: PanelHost) -> StatusLine:
        return cls(host)

    def on_event(self, event: Event, payload: Any) -> bool | None:
        if event is Event.STEP:
            self.rate.add(payload.step)
            self.tracking.step_done()
        elif event is Event.CONTROL and payload.kind == "rewind":
            self.rate.reset()
        return True

    def draw(self, session: Any) -> None:
        """Show the session's position with the dashboard's speed, costs and run state."""
        host = self._host
        if host is None:
            self.show(session, rate=self.rate.rate(), tracking_ms=None, ui_ms=None, state="idle")
            return
        timed = self.tracking.steps
        last = getattr(host.last_result, "stopped_by", "") if host.last_result is not None else ""
        if host.running:
            state = "running"
        elif not host.is_runner:
            state = "watching your loop"
        elif last == "pause":
            state = "paused"
        else:
            state = "idle"
        live = host.running or not host.is_runner
        ran = live or host.last_result is not None
        self.show(
            session,
            rate=(self.rate.rate() if live else host.last_run_rate) if ran else None,
            rate_label="steps/s" if live else "steps/s (last run)",
            tracking_ms=self.tracking.ms_per_step() if timed else None,
            ui_ms=1000.0 * host.ui_seconds / timed if timed else None,
            state=state,
        )

    def close(self) -> None:
        """Stop timing the tracker (see :class:`~tlwidgets.ui.meters.TrackingTimer`) and close."""
        self.tracking.close()
        super().close()

    def show(
        self,
        session: Any,
        *,
        rate: float | None,
        rate_label: str = "steps/s",
        tracking_ms: float | None,
        ui_ms: float | None,
        state: str,
    ) -> None:
        """Show the session's position, speed, costs and run state.

        ``tracking_ms`` / ``ui_ms`` are None until a step has been timed while the
        dashboard was open (e.g. a watcher shown after its loop ended): shown as "–".
        """
        parts = [f"step {session.global_step}", f"epoch {getattr(session, 'epoch', 0)}"]
        stage = getattr(session, "stage", None)
        if stage is not None:
            parts.append(f"next: {stage.value}")
        parts.append("– steps/s" if rate is None else f"{rate:.1f} {rate_label}")
        parts.append("tracking –" if tracking_ms is None else f"tracking {tracking_ms:.2f} ms/step")
        parts.append("ui –" if ui_ms is None else f"ui {ui_ms:.2f} ms/step")
        parts.append(state)
        text = " · ".join(parts)
        if text == self.text:
            return
        self.text = text
        css = f"tlw-status-text tlw-state-{html.escape(state.split()[0])}"
        self.value = f"<span class='{css}'>{html.escape(text)}</span>"
