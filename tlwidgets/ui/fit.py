"""Fit panel: training against validation per epoch, a baseline, the verdict and the fixes that apply.

The bias-variance view (seed 004): loss and accuracy of the training and validation data at each epoch
end, drawn against the baseline (chance, or the target the user types), with the verdict of
:func:`~tlwidgets.diagnostics.fit.assess_fit` (underfitting, overfitting, good fit, too early) and the
actions of :func:`~tlwidgets.diagnostics.fit.fit_actions` as ``tlw-fix`` buttons. The panel only draws:
the numbers and the verdict come from :mod:`tlwidgets.diagnostics.fit`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Float, Unicode

from tlwidgets.core.events import Event
from tlwidgets.diagnostics.fit import FIT_KEY, FitReport, Verdict, fit_actions, fit_report
from tlwidgets.ui.action_buttons import ActionButtons, confirmation_html
from tlwidgets.ui.panel import Panel, PanelHost
from tlwidgets.ui.ticks import integer_ticks

__all__ = ["FitPanel", "epoch_ticks"]

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BASELINE_COLOR = "#757575"
TARGET_COLOR = "#2e7d32"
#: Verdict colours (the verdict word in the panel's first line).
VERDICT_COLORS = {
    Verdict.UNDERFITTING: "#ef6c00",
    Verdict.OVERFITTING: "#c62828",
    Verdict.GOOD_FIT: "#2e7d32",
    Verdict.TOO_EARLY: "#616161",
    Verdict.NO_VALIDATION: "#616161",
}
#: Each plot's least width and its margins: the epoch ticks are chosen to fit the plot at that width.
FIGURE_MIN_WIDTH = 300
MARGIN = {"top": 10, "bottom": 40, "left": 55, "right": 10}
PLOT_MIN_WIDTH = FIGURE_MIN_WIDTH - MARGIN["left"] - MARGIN["right"]
#: Confirmation lines of applied fixes shown (the newest).
MAX_DONE_SHOWN = 3
EMPTY_TEXT = (
    "<small>No epoch has finished yet. The fit panel compares training and validation loss and "
    "accuracy at each epoch end (pass <code>val_data</code> to the Runner); a verdict needs two "
    "epochs.</small>"
)


def epoch_ticks(first: int, last: int, width_px: float = PLOT_MIN_WIDTH) -> np.ndarray:
    """Integer epoch ticks from ``first`` to ``last`` whose labels fit an axis ``width_px`` long
    (:func:`~tlwidgets.ui.ticks.integer_ticks`: round strides, never a fractional epoch)."""
    return np.asarray(integer_ticks(first, last, width_px), dtype=np.float64)


class FitPanel(Panel, widgets.VBox):
    """Training vs validation loss and accuracy per epoch against a baseline, the fit verdict and the
    fixes that apply. CSS class ``tlw-fit``.

    The loss plot shows the chance loss (``ln K``, or the loss at the start for other losses) dashed,
    the accuracy plot chance accuracy (``1/K``), each with the target when one is given (the
    ``target`` trait or the text box: an accuracy when the epochs measure one, else a loss). The
    verdict line (``tlw-fit-verdict``) says what the numbers mean; each action of
    :func:`~tlwidgets.diagnostics.fit.fit_actions` is a ``tlw-fix`` button (clicked during a run, the
    run is paused first), with the confirmation line of what was done (``tlw-fix-done``).

    Parameters
    ----------
    guard
        Decorator reporting callback exceptions in the dashboard.
    session
        The session shown.
    host
        The dashboard (a fix clicked during its run pauses the run and is applied when it stopped).
    on_change
        Called after a fix was applied (the dashboard redraws every panel).
    target
        The goal (see the ``target`` trait).
    """

    name = "fit"
    # EPOCH: a new point; CONTROL: a rewind drops epochs, a change of LR or weight decay changes the fixes.
    events = (Event.EPOCH, Event.CONTROL)
    slot = "tabs"
    caption = "Fit"
    min_interval = 0.25  # two bqplot figures: a dragged LR slider (CONTROL events) must not flood them

    verdict = Unicode("", help="The verdict shown ('' before the first epoch), e.g. 'overfitting'.")
    target = Float(
        None,
        allow_none=True,
        help="The goal: an accuracy when the epochs measure one, else a loss (None: perfect).",
    )

    @classmethod
    def build(cls, host: PanelHost) -> FitPanel:
        return cls(host.guard, session=host.session, host=host, on_change=host.refresh)

    def __init__(
        self,
        guard: Callable[[str], Callable],
        *,
        session: Any = None,
        host: Any = None,
        on_change: Callable[[], None] | None = None,
        target: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._guard = guard
        self._session = session
        self._host = host
        self._on_change = on_change
        #: The last report drawn (None before the first draw).
        self.report: FitReport | None = None
        self.actions: tuple[Any, ...] = ()
        self._drawn: tuple[Any, ...] | None = None  # what the curves show (skip redrawing the same)
        self.empty = widgets.HTML(EMPTY_TEXT)
        self.empty.add_class("tlw-fit-empty")
        self.verdict_line = widgets.HTML()
        self.verdict_line.add_class("tlw-fit-verdict")
        self.suggestions = widgets.HTML()
        self.suggestions.add_class("tlw-fit-suggestions")
        self.target_box = widgets.Text(
            value="",
            placeholder="none: perfect",
            description="target",
            continuous_update=False,
            tooltip="The accuracy (or loss) you aim for, e.g. what people reach on this task",
            layout=widgets.Layout(width="220px"),
        )
        self.target_box.add_class("tlw-fit-target")
        self.target_box.observe(guard("fit target")(self._target_typed), names="value")
        self.loss_plot = _Plot("loss")
        self.acc_plot = _Plot("accuracy")
        self.plots = widgets.HBox(
            [self.loss_plot.figure, self.acc_plot.figure],
            layout=widgets.Layout(flex_flow="row wrap", width="100%"),
        )
        # The same buttons as on a finding's card (a click during a run pauses it first), in wrapped rows.
        self._buttons = ActionButtons(guard, self._applied, where="fix fit", host=host)
        self.fixes = self._buttons.box
        self.done = widgets.HTML()
        super().__init__(
            children=[
                widgets.HBox(
                    [self.verdict_line, self.target_box],
                    layout=widgets.Layout(justify_content="space-between", align_items="flex-start"),
                ),
                self.suggestions,
                self.fixes,
                self.done,
                self.empty,
                self.plots,
            ],
            **kwargs,
        )
        self.add_class("tlw-fit")
        self.observe(self._on_target, names="target")
        if target is not None:
            self.target = target
        self._show_plots(False)

    # ------------------------------------------------------------------ the panel protocol
    def tab_caption(self) -> str:
        """ "Fit", or "Fit: <verdict>" once there is one worth reading."""
        shown = self.verdict not in ("", Verdict.TOO_EARLY.value)
        return f"{self.caption}: {self.verdict}" if shown else self.caption

    def draw(self, session: Any) -> None:
        """Redraw the curves, the verdict and the fix buttons from ``session``."""
        self._session = session
        epochs = list(getattr(session.history, "epochs", ()))
        if not epochs:
            self.report, self.actions = None, ()
            self.verdict = ""
            self._set(self.verdict_line, "")
            self._set(self.suggestions, "")
            self._show_plots(False)
            self._drawn = None
            self._buttons.show((), session)
            self._draw_done(session)
            return
        accuracy = any("accuracy" in (e.train_metrics or {}) for e in epochs)
        self._label_target(accuracy)
        target = self.target
        report = fit_report(
            session,
            target_accuracy=target if accuracy else None,
            target_loss=None if accuracy else target,
        )
        self.report = report
        self.verdict = report.verdict.value
        color = VERDICT_COLORS[report.verdict]
        self._set(
            self.verdict_line,
            f'<b style="color:{color}">{html.escape(report.verdict.value.capitalize())}</b>: '
            f"{html.escape(report.reason)}",
        )
        tips = "; ".join(report.suggestions)
        self._set(self.suggestions, f"<small>Try: {html.escape(tips)}</small>" if tips else "")
        # The curves change only with the epochs and the baseline (a control alone changes the fixes).
        last = epochs[-1]  # (a rewind then new epochs: the last one's numbers differ unless replayed exactly)
        key = (len(epochs), last.epoch, last.step, last.train_loss, last.val_loss, report.baseline, accuracy)
        if key != self._drawn:
            self._draw_curves(epochs, report, accuracy)
            self._drawn = key
        self._show_plots(True, accuracy)
        self.actions = fit_actions(session, report)
        self._buttons.show(self.actions, session)
        self._draw_done(session)

    # ------------------------------------------------------------------ what tests and users read
    def fix_buttons(self) -> list[widgets.Button]:
        """The ``tlw-fix`` buttons shown, first action first."""
        return self._buttons.buttons

    def confirmation(self) -> str:
        """The confirmation lines of the fixes applied from this panel (HTML; ``""`` when none)."""
        return self.done.value

    # ------------------------------------------------------------------ drawing helpers
    def _draw_curves(self, epochs: Sequence[Any], report: FitReport, accuracy: bool) -> None:
        used = [e for e in epochs if e.train_loss is not None and math.isfinite(float(e.train_loss))]
        x = np.array([e.epoch + 1 for e in used], dtype=np.float64)  # epochs completed: the first is 1

        def values(get: Callable[[Any], Any]) -> np.ndarray:
            out = [get(e) for e in used]
            return np.array([float(v) if v is not None else np.nan for v in out], dtype=np.float64)

        base = report.baseline
        self.loss_plot.draw(
            x,
            values(lambda e: e.train_loss),
            values(lambda e: e.val_loss),
            (base.loss, _baseline_label(base.label, base.loss)),
            base.target_loss,
        )
        if accuracy:
            self.acc_plot.draw(
                x,
                values(lambda e: (e.train_metrics or {}).get("accuracy")),
                values(lambda e: (e.val_metrics or {}).get("accuracy")),
                (base.accuracy, _baseline_label(base.label, base.accuracy)),
                base.target_accuracy,
            )

    def _draw_done(self, session: Any) -> None:
        lines = list(getattr(session, "applied_actions", {}).get(FIT_KEY, ()))[-MAX_DONE_SHOWN:]
        self._set(self.done, confirmation_html(lines))

    def _applied(self) -> None:
        """A fix was applied (its confirmation line is kept by the session): redraw."""
        if self._on_change is not None:
            self._on_change()  # every panel: the session changed
        elif self._session is not None:
            self.draw(self._session)

    def _show_plots(self, on: bool, accuracy: bool = True) -> None:
        self.empty.layout.display = "none" if on else None
        self.plots.layout.display = None if on else "none"
        self.acc_plot.figure.layout.display = None if accuracy else "none"

    def _label_target(self, accuracy: bool) -> None:
        description = "target acc" if accuracy else "target loss"
        if self.target_box.description != description:
            self.target_box.description = description

    @staticmethod
    def _set(widget: widgets.HTML, value: str) -> None:
        if widget.value != value:
            widget.value = value

    # ------------------------------------------------------------------ the target
    def _target_typed(self, change: dict[str, Any]) -> None:
        text = str(change["new"]).strip()
        if not text:
            self.target = None
            return
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"the target must be a number (an accuracy such as 0.95, or a loss), got {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"the target must be a finite number >= 0, got {text!r}")
        if self.target_box.description == "target acc" and not 0 < value <= 1:
            raise ValueError(f"a target accuracy is a fraction in (0, 1] (95% is 0.95), got {text!r}")
        self.target = value

    def _on_target(self, change: dict[str, Any]) -> None:
        new = change["new"]
        if _number(self.target_box.value) != new:  # set in code: show it in the box
            self.target_box.value = "" if new is None else f"{new:g}"
        if self._session is not None:
            self.draw(self._session)


def _number(text: str) -> float | None:
    """The number typed (``None`` for an empty or unreadable box)."""
    try:
        return float(text) if text.strip() else None
    except ValueError:
        return None


def _baseline_label(label: str, value: float | None) -> str:
    return f"{label}: {value:.3g}" if value is not None and math.isfinite(float(value)) else label


def _line(scales: dict[str, Any], color: str, label: str, *, dashed: bool = False) -> bq.Lines:
    """An empty series: a solid line with point markers, named in the legend; or a dashed level
    (baseline, target) whose legend entry shows only once it has a value."""
    style: dict[str, Any] = (
        {"line_style": "dashed", "display_legend": False}
        if dashed
        else {"stroke_width": 2, "marker": "circle", "marker_size": 24, "display_legend": True}
    )
    return bq.Lines(x=np.zeros(0), y=np.zeros(0), scales=scales, colors=[color], labels=[label], **style)


class _Plot:
    """One bqplot figure: training and validation per epoch, the baseline and the target dashed."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.x = bq.LinearScale()
        self.y = bq.LinearScale()
        scales = {"x": self.x, "y": self.y}
        self.train = _line(scales, TRAIN_COLOR, f"train {what}")
        self.val = _line(scales, VAL_COLOR, f"validation {what}")
        self.baseline = _line(scales, BASELINE_COLOR, "baseline", dashed=True)
        self.goal = _line(scales, TARGET_COLOR, "target", dashed=True)
        self.x_axis = bq.Axis(scale=self.x, label="epoch", tick_format="d", grid_lines="none")
        self.y_axis = bq.Axis(scale=self.y, side="left", label=what, grid_lines="dashed")
        self.figure = bq.Figure(
            marks=[self.baseline, self.goal, self.train, self.val],
            axes=[self.x_axis, self.y_axis],
            fig_margin=dict(MARGIN),
            layout=widgets.Layout(flex="1 1 45%", height="260px", min_width=f"{FIGURE_MIN_WIDTH}px"),
            animation_duration=0,
            display_toolbar=False,
            legend_location="top-right",
            legend_text={"font-size": "10px"},
        )
        self.figure.add_class(f"tlw-fit-{what}")

    def draw(
        self,
        x: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        baseline: tuple[float | None, str],
        target: float | None,
    ) -> None:
        lo, hi = (float(x[0]), float(x[-1])) if len(x) else (1.0, 1.0)
        span = np.array([lo - 0.25, hi + 0.25])
        with self.train.hold_sync():
            self.train.x, self.train.y = x, train
        with self.val.hold_sync():
            has_val = bool(np.isfinite(val).any())
            self.val.x, self.val.y = (x, val) if has_val else (np.zeros(0), np.zeros(0))
            self.val.display_legend = has_val
        level, label = baseline
        for mark, value, text in ((self.baseline, level, label), (self.goal, target, "target")):
            known = value is not None and math.isfinite(float(value))
            with mark.hold_sync():
                if known:
                    mark.x, mark.y = span, np.array([float(value), float(value)])
                    mark.labels = [f"{text}" if text != "target" else f"target: {float(value):.3g}"]
                else:
                    mark.x, mark.y = np.zeros(0), np.zeros(0)
                mark.display_legend = known
        with self.x.hold_sync():
            self.x.min, self.x.max = float(span[0]), float(span[1])
        self.x_axis.tick_values = epoch_ticks(int(lo), int(hi))
