"""Findings panel: ranked findings with code, cause, fix and step; clicking one selects it elsewhere.

Each action of a finding (``finding.actions``) is a button (CSS class ``tlw-fix``) on its card; a click
applies it through the session's controls and shows a confirmation line (``tlw-fix-done``) of what was
done. Resolved findings are listed after the active ones, greyed (``tlw-finding-resolved``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Int

from tlwidgets.core.events import Event
from tlwidgets.ui.action_buttons import NO_SHRINK, ActionButtons, confirmation_html
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["FindingsPanel"]

#: Most findings listed (the ranked head; the rest are counted).
MAX_SHOWN = 30


class FindingsPanel(Panel, widgets.VBox):
    """The session's findings in its ranking order (most likely root cause first), each with
    severity, code, message, the present findings that likely caused it ("likely caused by: ...",
    CSS class ``tlw-likely-causes``), cause, fix and step, a button that selects the finding's step and
    parameters in the heatmap and loss panels, and a button per action (``tlw-fix``) with the
    confirmation line of the actions applied (``tlw-fix-done``). Resolved findings come after the
    active ones, greyed (``tlw-finding-resolved``), with the step they were resolved at.
    CSS class ``tlw-findings``.

    Parameters
    ----------
    guard
        Decorator reporting callback exceptions in the dashboard.
    on_select
        ``on_select(finding)`` when a finding's "show" button is clicked.
    on_change
        Called after an action was applied (the dashboard redraws every panel: the action changed
        the session).
    session
        The session shown (read on a STEP: a redraw only when a finding was resolved).
    host
        The dashboard: an action clicked while its run goes on pauses the run and is applied when
        the run has stopped (a rewind cannot happen mid-run).
    """

    name = "findings"
    # STEP: a finding re-checked after a fix is resolved between steps (redrawn only when one was).
    events = (Event.FINDING, Event.ERROR, Event.CONTROL, Event.STEP)
    slot = "tabs"
    caption = "Findings"

    count = Int(0, help="Findings listed.")

    @classmethod
    def build(cls, host: PanelHost) -> FindingsPanel:
        return cls(host.guard, host.select_finding, on_change=host.refresh, session=host.session, host=host)

    def tab_caption(self) -> str:
        """ "Findings (n)" once there are some."""
        return f"{self.caption} ({self.count})" if self.count else self.caption

    def __init__(
        self,
        guard: Callable[[str], Callable],
        on_select: Callable[[Any], None],
        *,
        on_change: Callable[[], None] | None = None,
        session: Any = None,
        host: Any = None,
        **kwargs: Any,
    ) -> None:
        self._host = host
        self._guard = guard
        self._on_select = on_select
        self._on_change = on_change
        self._session = session
        self._seen_resolution = getattr(session, "resolution_seq", 0)
        self.header = widgets.HTML("<small>no findings yet</small>")
        self.list = widgets.VBox(layout=widgets.Layout(max_height="420px", overflow="auto"))
        self._rows: dict[tuple, _Row] = {}
        self._latest: dict[tuple, Any] = {}
        self._order: list[tuple] = []
        super().__init__(children=[self.header, self.list], **kwargs)
        self.add_class("tlw-findings")

    def on_event(self, event: Event, payload: Any) -> bool | None:
        if event is Event.STEP:  # every step: redraw only when a finding was resolved or came back
            seq = getattr(self._session, "resolution_seq", 0)
            if seq == self._seen_resolution:
                return False
            self._seen_resolution = seq
        return True

    def draw(self, session: Any) -> None:
        """List the findings; a row is created once per finding and updated in place."""
        findings = list(session.findings)
        self._seen_resolution = getattr(session, "resolution_seq", 0)
        applied = getattr(session, "applied_actions", {})
        shown = findings[:MAX_SHOWN]
        active = [f for f in findings if not getattr(f, "resolved", False)]
        counts = {s: sum(f.severity == s for f in active) for s in ("error", "warning", "info")}
        resolved = len(findings) - len(active)
        header = (
            "<small>"
            + (
                " · ".join(
                    [f"<b>{n}</b> {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n]
                    + ([f"<b>{resolved}</b> resolved"] if resolved else [])
                )
                or "no findings yet"
            )
            + (f" · showing the first {MAX_SHOWN} of {len(findings)}" if len(findings) > MAX_SHOWN else "")
            + "</small>"
        )
        if header != self.header.value:
            self.header.value = header
        keys = []
        for f in shown:
            key = f.key
            keys.append(key)
            self._latest[key] = f
            # The confirmation of what the actions did is part of the card's text (tlw-fix-done).
            done = confirmation_html(applied.get(key, ()))
            value = f._repr_html_() + done
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = self._new_row(key, f, value)
            row.done = done
            if row.body.value != value:
                row.body.value = value
            label = "show setup" if f.step is None else f"show step {f.step}"
            if row.button.description != label:
                row.button.description = label
            row.fixes.show(getattr(f, "actions", ()) or (), session)
            if getattr(f, "resolved", False):
                row.box.add_class("tlw-finding-resolved")
            else:
                row.box.remove_class("tlw-finding-resolved")
        for key in [k for k in self._rows if k not in set(keys)]:
            row = self._rows.pop(key)
            self._latest.pop(key, None)
            row.close()
        if keys != self._order:
            self._order = keys
            self.list.children = [self._rows[k].box for k in keys]
        self.count = len(keys)

    def finding(self, i: int) -> Any:
        """The i-th finding listed."""
        return self._latest[self._order[i]]

    def select_button(self, i: int) -> widgets.Button:
        """The "show" button of the i-th finding listed."""
        return self._rows[self._order[i]].button

    def fix_buttons(self, i: int) -> list[widgets.Button]:
        """The action buttons (``tlw-fix``) of the i-th finding listed, first action first."""
        return self._rows[self._order[i]].fixes.buttons

    def confirmation(self, i: int) -> str:
        """The confirmation line(s) of the actions applied on the i-th finding listed (HTML, ``""``
        when none was)."""
        return self._rows[self._order[i]].done

    def _new_row(self, key: tuple, f: Any, value: str) -> _Row:
        # The card's text takes the room left (it wraps); the buttons never shrink: a label cut off
        # with an ellipsis would hide what the action does ("Rewind to step 0 and set lr=0.044").
        body = widgets.HTML(value, layout=widgets.Layout(flex="1 1 auto"))
        fixes = ActionButtons(
            self._guard, self._applied, where=f"fix {f.code}", host=self._host, vertical=True
        )
        button = widgets.Button(
            tooltip="Select this finding's step and parameters in the heatmap and loss plot",
            layout=widgets.Layout(width="auto", min_width="90px", flex=NO_SHRINK),
        )
        button.add_class("tlw-finding-select")
        button.on_click(self._guard(f"finding {f.code}")(self._clicked(key)))
        box = widgets.HBox([body, fixes.box, button], layout=widgets.Layout(align_items="flex-start"))
        box.add_class("tlw-finding-row")
        return _Row(box, body, button, fixes)

    def _applied(self) -> None:
        """An action was applied (its confirmation line is kept by the session): redraw."""
        if self._on_change is not None:
            self._on_change()  # every panel: the session changed
        elif self._session is not None:
            self.draw(self._session)

    def _clicked(self, key: tuple) -> Callable[[Any], None]:
        def click(_button: Any) -> None:
            self._on_select(self._latest[key])

        return click


class _Row:
    """The widgets of one finding's card (created once, updated in place)."""

    def __init__(
        self, box: widgets.HBox, body: widgets.HTML, button: widgets.Button, fixes: ActionButtons
    ) -> None:
        self.box, self.body, self.button, self.fixes = box, body, button, fixes
        self.done = ""  # the confirmation lines shown (HTML)

    def close(self) -> None:
        self.fixes.close()
        for w in (self.button, self.body, self.box):
            w.close()
