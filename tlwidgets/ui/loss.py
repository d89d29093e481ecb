"""Loss plot: training loss per step (raw and smoothed), validation per epoch, control markers,
and the timelines abandoned by rewinds (dashed) so a fix is seen against what it replaced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Int

from tlwidgets.core.events import Event
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["MARKER_COLORS", "LossPanel", "moving_average"]

#: Marker colour per control kind.
MARKER_COLORS = {
    "freeze": "#1565c0",
    "unfreeze": "#2e7d32",
    "set_lr": "#ef6c00",
    "bn_eval": "#6a1b9a",
    "rewind": "#c62828",
    "checkpoint": "#757575",
}
MAX_POINTS = 1500
#: Abandoned timelines drawn (the newest ones): more would bury the run they are compared with.
MAX_BRANCHES_SHOWN = 3
BRANCH_COLOR = "#bdbdbd"


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values, ignoring NaN/Inf (NaN where the window holds none)."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    count = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (csum[idx] - csum[lo]) / count
    out[count == 0] = np.nan
    return out


class LossPanel(Panel, widgets.VBox):
    """Training loss (raw and smoothed) against the global step, validation loss at each epoch
    end, and a vertical marker with a label at every control change (freeze, unfreeze, LR,
    checkpoint, rewind) so cause and effect line up. CSS class ``tlw-loss``.

    After a rewind, the abandoned timelines (``history.branches``, the newest
    ``MAX_BRANCHES_SHOWN``) are drawn dashed and lighter under the run that
    replaced them, smoothed like the current one, with a legend entry naming
    what rewound each (e.g. the action applied): the effect of a fix is seen.
    """

    name = "loss"
    events = (Event.STEP, Event.EPOCH, Event.CONTROL)
    slot = "plots"
    min_interval = 0.25  # costly for the browser to re-render: at most ~4 redraws a second in a run

    selected_step = Int(
        None, allow_none=True, help="Step marked by a dashed line (a finding or cell clicked)."
    )

    @classmethod
    def build(cls, host: PanelHost) -> LossPanel:
        return cls(host.guard, layout=widgets.Layout(flex="1 1 45%", min_width="320px"))

    def show_selection(self, param: str | None, step: int | None, stage: Any) -> None:
        """Mark the selected step with a dashed line (drawn at the next redraw)."""
        self.selected_step = step

    def __init__(self, guard: Callable[[str], Callable], **kwargs: Any) -> None:
        self.x = bq.LinearScale()
        self.y = bq.LinearScale()
        scales = {"x": self.x, "y": self.y}
        self.raw = bq.Lines(x=np.zeros(0), y=np.zeros(0), scales=scales, colors=["#9ecae1"], labels=["loss"])
        self.smooth = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=["#08519c"],
            stroke_width=2.5,
            labels=["smoothed"],
        )
        self.val = bq.Scatter(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=["#e6550d"],
            default_size=48,
            labels=["validation"],
        )
        self.val_line = bq.Lines(
            x=np.zeros(0), y=np.zeros(0), scales=scales, colors=["#e6550d"], line_style="dashed"
        )
        self.markers = bq.Lines(
            x=np.zeros((0, 2)), y=np.zeros((0, 2)), scales=scales, colors=["#757575"], opacities=[0.8]
        )
        self.marker_labels = bq.Label(
            x=np.zeros(0),
            y=np.zeros(0),
            text=[],
            scales=scales,
            rotate_angle=-90,
            font_weight="normal",
            default_size=11,
            colors=["#424242"],
            align="start",
        )
        # One line per abandoned timeline (rows of a 2-D x/y, NaN-padded); the legend shows only
        # while there is one, so a run never rewound keeps its plain plot.
        self.branches = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=[BRANCH_COLOR],
            line_style="dashed",
            stroke_width=2,
            opacities=[0.8],
            labels=[],
            display_legend=False,
        )
        self.cursor = bq.Lines(
            x=np.zeros(0), y=np.zeros(0), scales=scales, colors=["black"], line_style="dash_dotted"
        )
        self.figure = bq.Figure(
            marks=[
                self.branches,
                self.raw,
                self.smooth,
                self.val_line,
                self.val,
                self.markers,
                self.marker_labels,
                self.cursor,
            ],
            axes=[
                bq.Axis(scale=self.x, label="step", grid_lines="none"),
                bq.Axis(scale=self.y, side="left", label="loss", grid_lines="dashed"),
            ],
            fig_margin={"top": 10, "bottom": 40, "left": 55, "right": 10},
            layout=widgets.Layout(width="100%", height="300px", min_width="320px"),
            animation_duration=0,
            display_toolbar=False,
            legend_location="top-right",
            legend_text={"font-size": "10px"},
        )
        self.figure.add_class("tlw-loss-figure")
        self.log_y = widgets.Checkbox(
            value=False, description="log y", indent=False, layout={"width": "auto"}
        )
        self.log_y.observe(guard("loss log scale")(self._log_changed), names="value")
        self.summary = widgets.HTML()
        self.summary.add_class("tlw-loss-summary")
        super().__init__(
            children=[
                widgets.HBox([self.summary, self.log_y], layout={"justify_content": "space-between"}),
                self.figure,
            ],
            **kwargs,
        )
        self.add_class("tlw-loss")
        self._session: Any = None

    def _log_changed(self, change: dict[str, Any]) -> None:
        new = bq.LogScale() if change["new"] else bq.LinearScale()
        self.y = new
        for mark in self.figure.marks:
            mark.scales = {**mark.scales, "y": new}
        axes = list(self.figure.axes)
        axes[1] = bq.Axis(scale=new, side="left", label="loss", grid_lines="dashed")
        self.figure.axes = axes
        if self._session is not None:
            self.draw(self._session)

    def draw(self, session: Any) -> None:
        """Redraw from ``session.history`` (decimated to at most ~1500 points per line)."""
        self._session = session
        hist = session.history
        steps = hist.step.astype(np.float64)
        loss = hist.loss
        loss = np.where(np.isfinite(loss), loss, np.nan)
        if self.log_y.value:
            loss = np.where(loss > 0, loss, np.nan)
        window = int(np.clip(len(loss) // 20, 1, 50))
        smooth = moving_average(loss, window)
        stride = max(1, len(steps) // MAX_POINTS)
        with self.raw.hold_sync():
            self.raw.x, self.raw.y = steps[::stride], loss[::stride]
        with self.smooth.hold_sync():
            self.smooth.x, self.smooth.y = steps[::stride], smooth[::stride]
        val = hist.val_loss
        with self.val.hold_sync():
            self.val.x, self.val.y = (val[:, 0], val[:, 1]) if len(val) else (np.zeros(0), np.zeros(0))
        with self.val_line.hold_sync():
            self.val_line.x, self.val_line.y = (
                (val[:, 0], val[:, 1]) if len(val) > 1 else (np.zeros(0), np.zeros(0))
            )
        branch_y = self._draw_branches(hist, window)
        finite = loss[np.isfinite(loss)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if branch_y.size and finite.size:  # (the markers span the branches too)
            lo, hi = min(lo, float(branch_y.min())), max(hi, float(branch_y.max()))
        if len(val):
            lo, hi = min(lo, float(np.nanmin(val[:, 1]))), max(hi, float(np.nanmax(val[:, 1])))
        controls = list(hist.controls)[-30:]  # the latest markers stay readable
        if controls and finite.size:
            xs = np.array([[c.step, c.step] for c in controls], dtype=np.float64)
            ys = np.array([[lo, hi]] * len(controls), dtype=np.float64)
            colors = [MARKER_COLORS.get(c.kind, "#757575") for c in controls]
            texts = [_short(c.label()) for c in controls]
        else:
            xs, ys, colors, texts = np.zeros((0, 2)), np.zeros((0, 2)), ["#757575"], []
        with self.markers.hold_sync():
            self.markers.x, self.markers.y, self.markers.colors = xs, ys, colors
        with self.marker_labels.hold_sync():
            self.marker_labels.x = _spread(xs[:, 0], steps) if len(xs) else np.zeros(0)
            self.marker_labels.y = np.full(len(xs), lo)
            self.marker_labels.text = texts
            self.marker_labels.colors = colors
        step = self.selected_step
        with self.cursor.hold_sync():
            if step is not None and finite.size:
                self.cursor.x, self.cursor.y = np.array([step, step], dtype=float), np.array([lo, hi])
            else:
                self.cursor.x, self.cursor.y = np.zeros(0), np.zeros(0)
        if len(loss):
            last = loss[-1]
            text = (
                f"<b>loss</b> {last:.4g} at step {int(steps[-1])}"
                if np.isfinite(last)
                else "<b>loss</b> NaN/Inf"
            )
            if len(val):
                text += f" · <b>val</b> {val[-1, 1]:.4g}"
        else:
            text = "<b>loss</b>: no steps yet"
        if text != self.summary.value:
            self.summary.value = text

    def _draw_branches(self, hist: Any, window: int) -> np.ndarray:
        """Draw the newest abandoned timelines; return their finite values shown (for the markers' span)."""
        branches = list(getattr(hist, "branches", ()))[-MAX_BRANCHES_SHOWN:]
        xs, ys, labels = [], [], []
        for b in branches:
            y = np.where(np.isfinite(b.loss), b.loss, np.nan)
            if self.log_y.value:
                y = np.where(y > 0, y, np.nan)
            y = moving_average(y, window)  # smoothed like the current run, so the two compare
            stride = max(1, len(y) // MAX_POINTS)
            xs.append(b.step[::stride].astype(np.float64))
            ys.append(y[::stride])
            labels.append(_short(f"before: {b.label}", 40))
        n = max((len(x) for x in xs), default=0)
        x2 = np.full((len(xs), n), np.nan)
        y2 = np.full((len(xs), n), np.nan)
        for i, (x, y) in enumerate(zip(xs, ys)):
            x2[i, : len(x)], y2[i, : len(y)] = x, y
            if len(x) < n:  # bqplot draws NaN x as a gap at 0: repeat the last point instead
                x2[i, len(x) :], y2[i, len(y) :] = (x[-1], y[-1]) if len(x) else (0.0, np.nan)
        shades = ["#9e9e9e", "#bdbdbd", "#d6d6d6"][: len(xs)][::-1] or [BRANCH_COLOR]
        with self.branches.hold_sync():
            if xs:
                self.branches.x, self.branches.y = x2, y2
            else:
                self.branches.x, self.branches.y = np.zeros(0), np.zeros(0)
            self.branches.labels = labels
            self.branches.colors = shades
            self.branches.display_legend = bool(xs)
            # The current run gets a legend entry only when there is something to tell it apart from.
            self.smooth.display_legend = bool(xs)
        values = y2[np.isfinite(y2)] if xs else np.zeros(0)
        return values


def _spread(xs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Label positions: controls at the same step sit side by side instead of on top of each other."""
    width = float(steps[-1] - steps[0]) if len(steps) > 1 else 1.0
    out = xs.astype(np.float64).copy()
    seen: dict[float, int] = {}
    for i, x in enumerate(xs):
        k = seen.get(float(x), 0)
        seen[float(x)] = k + 1
        out[i] = x + k * 0.025 * width
    return out


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
