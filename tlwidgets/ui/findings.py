"""Findings panel: ranked findings with code, cause, fix and step; clicking one selects it elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Int

from tlwidgets.core.events import Event
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["FindingsPanel"]

#: Most findings listed (the ranked head; the rest are counted).
MAX_SHOWN = 30


class FindingsPanel(Panel, widgets.VBox):
    """The session's findings in its ranking order (most likely root cause first), each with
    severity, code, message, the present findings that likely caused it ("likely caused by: ...",
    CSS class ``tlw-likely-causes``), cause, fix and step, and a button that selects the finding's step and
    parameters in the heatmap and loss panels. CSS class ``tlw-findings``.

    Parameters
    ----------
    guard
        Decorator reporting callback exceptions in the dashboard.
    on_select
        ``on_select(finding)`` when a finding's "show" button is clicked.
    """

    name = "findings"
    events = (Event.FINDING, Event.ERROR, Event.CONTROL)
    slot = "tabs"
    caption = "Findings"

    count = Int(0, help="Findings listed.")

    @classmethod
    def build(cls, host: PanelHost) -> FindingsPanel:
        return cls(host.guard, host.select_finding)

    def tab_caption(self) -> str:
        """ "Findings (n)" once there are some."""
        return f"{self.caption} ({self.count})" if self.count else self.caption

    def __init__(
        self, guard: Callable[[str], Callable], on_select: Callable[[Any], None], **kwargs: Any
    ) -> None:
        self._guard = guard
        self._on_select = on_select
        self.header = widgets.HTML("<small>no findings yet</small>")
        self.list = widgets.VBox(layout=widgets.Layout(max_height="420px", overflow="auto"))
        self._rows: dict[tuple, tuple[widgets.HBox, widgets.HTML, widgets.Button]] = {}
        self._latest: dict[tuple, Any] = {}
        self._order: list[tuple] = []
        super().__init__(children=[self.header, self.list], **kwargs)
        self.add_class("tlw-findings")

    def draw(self, session: Any) -> None:
        """List the findings; a row is created once per finding and updated in place."""
        findings = list(session.findings)
        shown = findings[:MAX_SHOWN]
        counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
        header = (
            "<small>"
            + (
                " · ".join(f"<b>{n}</b> {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
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
            value = f._repr_html_()
            row = self._rows.get(key)
            if row is None:
                body = widgets.HTML(value, layout=widgets.Layout(flex="1 1 auto"))
                button = widgets.Button(
                    tooltip="Select this finding's step and parameters in the heatmap and loss plot",
                    layout=widgets.Layout(width="auto", min_width="90px"),
                )
                button.add_class("tlw-finding-select")
                button.on_click(self._guard(f"finding {f.code}")(self._clicked(key)))
                box = widgets.HBox([body, button], layout=widgets.Layout(align_items="flex-start"))
                box.add_class("tlw-finding-row")
                row = self._rows[key] = (box, body, button)
            box, body, button = row
            if body.value != value:
                body.value = value
            label = "show setup" if f.step is None else f"show step {f.step}"
            if button.description != label:
                button.description = label
        for key in [k for k in self._rows if k not in set(keys)]:
            box, body, button = self._rows.pop(key)
            self._latest.pop(key, None)
            for w in (button, body, box):
                w.close()
        if keys != self._order:
            self._order = keys
            self.list.children = [self._rows[k][0] for k in keys]
        self.count = len(keys)

    def finding(self, i: int) -> Any:
        """The i-th finding listed."""
        return self._latest[self._order[i]]

    def select_button(self, i: int) -> widgets.Button:
        """The "show" button of the i-th finding listed."""
        return self._rows[self._order[i]][2]

    def _clicked(self, key: tuple) -> Callable[[Any], None]:
        def click(_button: Any) -> None:
            self._on_select(self._latest[key])

        return click
