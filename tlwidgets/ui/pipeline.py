"""The stage pipeline: seven chips in order, the next one highlighted, done ones marked by status."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Unicode

from tlwidgets.core.events import Event
from tlwidgets.core.stages import Stage
from tlwidgets.ui.format import names_html, record_html
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["PipelinePanel"]

_STYLE = {"ok": "success", "warning": "warning", "error": "danger"}
_HELP = {
    Stage.FETCH: "take the next batch from the data",
    Stage.ZERO_GRAD: "optimizer.zero_grad(): clear last step's gradients",
    Stage.TO_DEVICE: "move the batch to the model's device",
    Stage.FORWARD: "output = model(inputs)",
    Stage.LOSS: "loss = loss_fn(output, targets)",
    Stage.BACKWARD: "loss.backward(): gradients of every parameter",
    Stage.STEP: "optimizer.step(): apply the update",
}


class PipelinePanel(Panel, widgets.VBox):
    """Stage chips (CSS ``tlw-stage``; ``tlw-stage-current`` on the next one; ``tlw-stage-ok`` /
    ``-warning`` / ``-error`` on the ones done in this step), the record of the chosen stage and a
    graph view of which parameters the loss reaches.

    Parameters
    ----------
    guard
        Decorator that reports callback exceptions in the dashboard.
    on_change
        Called after a click so the dashboard redraws.
    """

    name = "pipeline"
    events = (Event.STAGE, Event.ERROR, Event.CONTROL)

    shown_stage = Unicode(None, allow_none=True, help="Stage whose record is shown below the chips.")
    current = Unicode(None, allow_none=True, help="The stage that runs next (the highlighted chip).")

    def __init__(
        self, guard: Callable[[str], Callable], on_change: Callable[[], None], **kwargs: Any
    ) -> None:
        self.chips: dict[Stage, widgets.Button] = {}
        row: list[widgets.Widget] = []
        for i, stage in enumerate(Stage.ordered()):
            chip = widgets.Button(
                description=f"{i + 1} {stage.value}",
                tooltip=_HELP[stage],
                layout=widgets.Layout(width="auto", min_width="92px"),
            )
            chip.add_class("tlw-stage")
            chip.add_class(f"tlw-stage-{stage.value.replace('_', '-')}")
            chip.on_click(guard(f"stage chip {stage.value}")(self._chip_click(stage)))
            self.chips[stage] = chip
            if i:
                arrow = widgets.HTML("<span class='tlw-arrow'>→</span>")
                row.append(arrow)
            row.append(chip)
        self.chip_row = widgets.HBox(row, layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self.graph_button = widgets.ToggleButton(
            value=False,
            description="graph",
            icon="sitemap",
            tooltip="Which parameters does the loss reach?",
            layout=widgets.Layout(width="auto"),
        )
        self.graph_button.add_class("tlw-graph-toggle")
        self.graph_button.observe(guard("graph toggle")(lambda _c: self._toggle_graph()), names="value")
        self.chip_row.children = (*self.chip_row.children, self.graph_button)
        # Tall enough for a small model's parameter table; a border shows where it scrolls.
        self.record_view = widgets.HTML(
            layout=widgets.Layout(
                max_height="480px", overflow="auto", border="1px solid #e0e0e0", padding="4px"
            )
        )
        self.record_view.add_class("tlw-record-view")
        self.graph_view = widgets.HTML(
            layout=widgets.Layout(max_height="240px", overflow="auto", display="none")
        )
        self.graph_view.add_class("tlw-graph")
        self._on_change = on_change
        self._statuses: dict[Stage, str | None] = dict.fromkeys(Stage.ordered())
        self._records: dict[Stage, Any] = {}
        self._reach: dict[str, Any] | None = None
        self._session: Any = None
        super().__init__(children=[self.chip_row, self.record_view, self.graph_view], **kwargs)
        self.add_class("tlw-pipeline")

    @classmethod
    def build(cls, host: PanelHost) -> PipelinePanel:
        panel = cls(host.guard, host.refresh)
        for rec in (getattr(host.session, "records", {}) or {}).values():
            panel.remember(rec)
        return panel

    # -- events -------------------------------------------------------------------------
    def on_event(self, event: Event, payload: Any) -> bool | None:
        if event is Event.STAGE:
            self.remember(payload)
        return True

    def show_selection(self, param: str | None, step: int | None, stage: Any) -> None:
        """A finding selected: open its stage's record."""
        if stage is not None:
            self.show(stage)

    def remember(self, record: Any) -> None:
        """Keep the latest record of each stage (cheap: a reference) and the loss's reach."""
        self._records[record.stage] = record
        if record.stage is Stage.LOSS and "reached" in record.data:
            self._reach = {
                "step": record.step,
                "reached": record.data["reached"],
                "unreached": record.data.get("unreached", []),
            }

    # -- drawing ------------------------------------------------------------------------
    def draw(self, session: Any) -> None:
        """Chip classes and styles from the session's records; the shown record and graph."""
        self._session = session
        records = getattr(session, "records", {}) or {}
        nxt = getattr(session, "stage", None)
        for stage, chip in self.chips.items():
            rec = records.get(stage)
            status = rec.status if rec is not None else None
            if status != self._statuses[stage]:
                for s in _STYLE:
                    chip.remove_class(f"tlw-stage-{s}")
                if status is not None:
                    chip.add_class(f"tlw-stage-{status}")
                chip.button_style = _STYLE.get(status, "") if status else ""
                self._statuses[stage] = status
        current = nxt.value if nxt is not None else None
        if current != self.current:
            for stage, chip in self.chips.items():
                if stage.value == current:
                    chip.add_class("tlw-stage-current")
                else:
                    chip.remove_class("tlw-stage-current")
            self.current = current
        self._draw_record(session)
        if self.graph_button.value:
            self._draw_graph(session)

    def show(self, stage: Stage | str | None) -> None:
        """Show the record of ``stage`` (None hides it)."""
        self.shown_stage = None if stage is None else Stage(stage).value
        if self._session is not None:
            self._draw_record(self._session)

    def _chip_click(self, stage: Stage) -> Callable[[Any], None]:
        def click(_button: Any) -> None:
            self.show(None if self.shown_stage == stage.value else stage)
            self._on_change()

        return click

    def _toggle_graph(self) -> None:
        self.graph_view.layout.display = None if self.graph_button.value else "none"
        if self.graph_button.value and self._session is not None:
            self._draw_graph(self._session)

    def _draw_record(self, session: Any) -> None:
        if self.shown_stage is None:
            self.record_view.value = ""
            self.record_view.layout.display = "none"
            return
        stage = Stage(self.shown_stage)
        rec = (getattr(session, "records", {}) or {}).get(stage) or self._records.get(stage)
        value = record_html(rec, getattr(session, "param_names", ()))
        if value != self.record_view.value:
            self.record_view.value = value
        self.record_view.layout.display = None

    def _draw_graph(self, session: Any) -> None:
        named = getattr(session, "named_params", [])
        frozen = [n for n, p in named if not p.requires_grad]
        if self._reach is None:
            self.graph_view.value = (
                "<i>which parameters the loss reaches is measured at the LOSS stage (whenever a stage is "
                "stepped alone, on the first steps, then every 50): step to LOSS to see it</i>"
            )
            return
        reached = list(self._reach["reached"])
        unreached = [n for n in self._reach["unreached"] if n not in frozen]
        reached_set = set(reached)
        # Group parameters by module so a big model stays readable.
        lines = []
        for n, p in named:
            cls = (
                "tlw-frozen"
                if not p.requires_grad
                else ("tlw-reached" if n in reached_set else "tlw-unreached")
            )
            label = {"tlw-frozen": "frozen", "tlw-reached": "reached", "tlw-unreached": "NOT reached"}[cls]
            lines.append(
                f"<div class='tlw-graph-row {cls}'><span class='tlw-name {cls}'>{html.escape(n)}</span>"
                f" <small>{tuple(p.shape)} · {label}</small></div>"
            )
        summary = (
            f"<div><b>loss → parameters</b> (measured at step {self._reach['step']}): "
            f"{len(reached)} reached, {len(unreached)} trainable but disconnected, {len(frozen)} frozen</div>"
        )
        if unreached:
            summary += f"<div>disconnected: {names_html(unreached, 'tlw-unreached')}</div>"
        self.graph_view.value = summary + "".join(lines[:200])
