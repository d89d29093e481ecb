"""The dashboard's error area: exceptions from runs and callbacks are shown here, never lost."""

from __future__ import annotations

import functools
import html
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import ipywidgets as widgets
from traitlets import Int

from tlwidgets.core.events import Event
from tlwidgets.ui.panel import Panel

__all__ = ["ErrorArea", "guard_with"]

log = logging.getLogger("tlwidgets.ui")

F = TypeVar("F", bound=Callable[..., Any])


def guard_with(report: Callable[[str, BaseException], None], where: str) -> Callable[[F], F]:
    """Decorator: run a callback, passing any exception to ``report(where, exc)`` instead of raising it."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                report(where, exc)
                return None

        return wrapper  # type: ignore[return-value]

    return deco


class ErrorArea(Panel, widgets.VBox):
    """Shows the latest exceptions raised in dashboard runs and widget callbacks.

    ipywidgets swallows exceptions raised in button callbacks (it logs them or
    prints a traceback that may land in no visible output), and an exception in
    an asyncio task vanishes unless someone asks for it. Every dashboard
    callback and run is wrapped by :meth:`guard`/:meth:`report`, which logs the
    exception on the ``tlwidgets.ui`` logger and shows it here (CSS class
    ``tlw-error``) with its traceback folded away.

    Parameters
    ----------
    max_shown
        How many of the latest errors stay visible.
    """

    name = "errors"
    events = (Event.ERROR,)
    required = True

    count = Int(0, help="Errors reported since the dashboard was created (also those no longer shown).")

    def __init__(self, max_shown: int = 5, **kwargs: Any) -> None:
        self.max_shown = max_shown
        self.entries: list[dict[str, str]] = []
        self.html = widgets.HTML()
        self.html.add_class("tlw-error")
        self.clear_button = widgets.Button(
            description="dismiss", tooltip="Hide the errors shown", layout=widgets.Layout(width="auto")
        )
        self.clear_button.add_class("tlw-error-clear")
        self.clear_button.on_click(lambda _b: self.clear())
        super().__init__(children=[self.html, self.clear_button], **kwargs)
        self.add_class("tlw-error-area")
        self._render()

    def report(self, where: str, exc: BaseException | None = None, *, message: str | None = None) -> None:
        """Log and show an exception (or a plain ``message``) that happened in ``where``."""
        if exc is not None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            text = f"{type(exc).__name__}: {exc}"
            log.error(
                "tlwidgets dashboard: %s raised %s", where, text, exc_info=(type(exc), exc, exc.__traceback__)
            )
        else:
            tb = ""
            text = message or "unknown error"
            log.error("tlwidgets dashboard: %s: %s", where, text)
        self.entries.append(
            {"where": where, "text": text, "traceback": tb, "time": time.strftime("%H:%M:%S")}
        )
        del self.entries[: -self.max_shown]
        self.count += 1
        self._render()

    def guard(self, where: str) -> Callable[[F], F]:
        """Decorator: run a callback, reporting any exception here instead of raising it."""
        return guard_with(self.report, where)

    def on_event(self, event: Event, payload: Any) -> bool | None:
        """A stage failed in user code: show it here (drawn at once, no redraw needed)."""
        err = getattr(payload, "error", None)
        text = f"{err.type}: {err.message}" if err is not None else "failed"
        self.report(f"stage {payload.stage.value} (step {payload.step})", message=text)
        return False

    def clear(self) -> None:
        """Hide the errors shown so far (the count stays)."""
        self.entries.clear()
        self._render()

    @property
    def text(self) -> str:
        """The errors shown, as plain text (one per line)."""
        return "\n".join(f"{e['where']}: {e['text']}" for e in self.entries)

    def _render(self) -> None:
        if not self.entries:
            self.html.value = ""
            self.layout.display = "none"
            return
        esc = html.escape
        items = []
        for e in reversed(self.entries):
            tb = (
                f"<details><summary>traceback</summary><pre>{esc(e['traceback'])}</pre></details>"
                if e["traceback"]
                else ""
            )
            items.append(
                f"<div class='tlw-error-item'><b>{esc(e['time'])} · {esc(e['where'])}</b>: "
                f"<code>{esc(e['text'])}</code>{tb}</div>"
            )
        self.html.value = "".join(items)
        self.layout.display = None
