"""The status line: global step, epoch, next stage, steps per second and tracking cost."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
from traitlets import Unicode

__all__ = ["StatusLine"]


class StatusLine(widgets.HTML):
    """One line of text (CSS class ``tlw-status``) holding the global step.

    Example: ``step 12 · epoch 0 · next: forward · 35.2 steps/s · tracking 0.4 ms/step · idle``.
    """

    text = Unicode("", help="The status line as plain text (what the HTML shows).")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_class("tlw-status")

    def draw(
        self,
        session: Any,
        *,
        rate: float,
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
        parts.append(f"{rate:.1f} {rate_label}")
        parts.append("tracking –" if tracking_ms is None else f"tracking {tracking_ms:.2f} ms/step")
        parts.append("ui –" if ui_ms is None else f"ui {ui_ms:.2f} ms/step")
        parts.append(state)
        text = " · ".join(parts)
        if text == self.text:
            return
        self.text = text
        css = f"tlw-status-text tlw-state-{html.escape(state.split()[0])}"
        self.value = f"<span class='{css}'>{html.escape(text)}</span>"
