"""Stepping and run controls: Step stage, Step, Run (N steps / one epoch / until a finding), Pause, Rewind."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, observe

from tlwidgets.core.events import Event
from tlwidgets.core.stages import Stage
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["RUN_MODES", "ControlsPanel"]

#: Run modes offered by the selector: label -> key.
RUN_MODES = {"N steps": "steps", "one epoch": "epoch", "until a finding": "finding"}

_BTN = {"width": "auto"}


class ControlsPanel(Panel, widgets.HBox):
    """The buttons that drive a Runner (no training logic: the dashboard wires the actions).

    With a watcher (``can_step=False``) the buttons are hidden: your own loop does the stepping.

    Attributes
    ----------
    step_stage_button, step_button, run_button, pause_button
        CSS classes ``tlw-step-stage``, ``tlw-step``, ``tlw-run``, ``tlw-pause``.
    mode
        Run mode selector (see :data:`RUN_MODES`).
    steps
        N for "N steps" (and the cap of "until a finding").
    checkpoint_button, rewind_button, checkpoints
        Take a checkpoint; rewind to the one chosen in ``checkpoints``.
    """

    name = "controls"
    events = (Event.STAGE, Event.CONTROL)
    required = True

    running = Bool(False, help="True while a run started from the dashboard is in progress.")
    can_step = Bool(True, help="False for a watcher: the user's own loop does the stepping.")

    @classmethod
    def build(cls, host: PanelHost) -> ControlsPanel:
        panel = cls(can_step=host.is_runner)
        guard = host.guard
        panel.connect(
            step_stage=guard("Step stage")(host.step_stage),
            step=guard("Step")(host.step),
            run=guard("Run")(host.run),
            pause=guard("Pause")(host.pause),
            checkpoint=guard("Checkpoint")(host.checkpoint),
            rewind=guard("Rewind")(host.rewind),
        )
        return panel

    def __init__(self, *, can_step: bool = True, **kwargs: Any) -> None:
        self.step_stage_button = _button(
            "Step stage", "step-forward", "Run exactly one stage", "tlw-step-stage"
        )
        self.step_button = _button(
            "Step", "forward", "Finish the current batch (one optimizer step)", "tlw-step"
        )
        self.mode = widgets.Dropdown(
            options=list(RUN_MODES.items()), value="steps", layout={"width": "130px"}, tooltip="What Run runs"
        )
        self.mode.add_class("tlw-run-mode")
        self.steps = widgets.BoundedIntText(
            value=100,
            min=1,
            max=10_000_000,
            layout={"width": "80px"},
            tooltip="N (steps, or the cap of a run)",
        )
        self.steps.add_class("tlw-run-steps")
        self.run_button = _button(
            "Run", "play", "Run (stops at an error finding)", "tlw-run", button_style="primary"
        )
        self.pause_button = _button("Pause", "pause", "Stop the run at the next stage boundary", "tlw-pause")
        self.checkpoint_button = _button(
            "Checkpoint", "bookmark", "Remember this point (at a step boundary)", "tlw-checkpoint"
        )
        self.checkpoints = widgets.Dropdown(
            options=[],
            layout={"width": "230px"},
            tooltip="Checkpoint to rewind to (yours and the automatic ones)",
        )
        self.checkpoints.add_class("tlw-checkpoints")
        self.rewind_button = _button("Rewind", "undo", "Restore the chosen checkpoint exactly", "tlw-rewind")
        self.message = widgets.HTML(layout={"margin": "0 0 0 8px"})
        self.message.add_class("tlw-message")
        super().__init__(
            children=[
                self.step_stage_button,
                self.step_button,
                self.mode,
                self.steps,
                self.run_button,
                self.pause_button,
                self.checkpoint_button,
                self.checkpoints,
                self.rewind_button,
                self.message,
            ],
            **kwargs,
        )
        self.add_class("tlw-controls")
        self.layout.flex_flow = "row wrap"
        self.layout.align_items = "center"
        self.can_step = can_step
        self._apply()

    def connect(
        self,
        *,
        step_stage: Callable[[], None],
        step: Callable[[], None],
        run: Callable[[], None],
        pause: Callable[[], None],
        checkpoint: Callable[[], None],
        rewind: Callable[[], None],
    ) -> None:
        """Wire the buttons to actions (already guarded by the dashboard)."""
        self.step_stage_button.on_click(lambda _b: step_stage())
        self.step_button.on_click(lambda _b: step())
        self.run_button.on_click(lambda _b: run())
        self.pause_button.on_click(lambda _b: pause())
        self.checkpoint_button.on_click(lambda _b: checkpoint())
        self.rewind_button.on_click(lambda _b: rewind())

    def draw(self, session: Any) -> None:
        """Offer the session's checkpoints; Checkpoint is enabled at a step boundary only."""
        if not self.can_step:
            return
        # The user's checkpoints and the runner's automatic ones (before each run and control, every
        # N steps: what a rewind "to before the damage" wants), newest first.
        held = [*session.checkpoints, *getattr(session, "auto_checkpoints", ())]
        held.sort(key=lambda ck: (ck.step, ck.id), reverse=True)
        labels = [(f"#{ck.id} step {ck.step}" + (f" · {ck.label}" if ck.label else ""), ck) for ck in held]
        self.set_checkpoints(labels, session.stage is Stage.FETCH)

    def run_request(self) -> tuple[str, int]:
        """The selected run mode and N."""
        return self.mode.value, int(self.steps.value)

    def set_checkpoints(self, labels: list[tuple[str, Any]], at_boundary: bool) -> None:
        """Offer the checkpoints (newest first) and enable Checkpoint only at a step boundary."""
        if [lab for lab, _ in labels] != [lab for lab, _ in self.checkpoints.options]:
            self.checkpoints.options = labels
            if labels:
                self.checkpoints.index = 0
        self._at_boundary = at_boundary
        self._apply()

    def say(self, text: str) -> None:
        """A short plain message next to the buttons (why a run stopped, what was rewound ...)."""
        self.message.value = f"<small>{html.escape(text)}</small>"

    @observe("running", "can_step")
    def _state_changed(self, change: dict[str, Any]) -> None:
        self._apply()

    def _apply(self) -> None:
        running, step = self.running, self.can_step
        at_boundary = getattr(self, "_at_boundary", True)
        with self.hold_sync():
            for b in (self.step_stage_button, self.step_button, self.run_button):
                b.disabled = running or not step
            self.pause_button.disabled = not running
            self.checkpoint_button.disabled = running or not step or not at_boundary
            self.rewind_button.disabled = running or not step or not self.checkpoints.options
            hide = None if step else "none"
            for w in (
                self.step_stage_button,
                self.step_button,
                self.mode,
                self.steps,
                self.run_button,
                self.pause_button,
                self.checkpoint_button,
                self.checkpoints,
                self.rewind_button,
            ):
                w.layout.display = hide


def _button(description: str, icon: str, tooltip: str, css: str, **style: Any) -> widgets.Button:
    """A control button carrying its CSS class (DESIGN section 5 names the ones tests look for)."""
    button = widgets.Button(description=description, icon=icon, tooltip=tooltip, layout=_BTN, **style)
    button.add_class(css)
    return button
