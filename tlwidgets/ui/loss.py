"""Loss plot: training loss per step (raw and smoothed), validation per epoch, control markers,
and the timelines abandoned by rewinds (dashed) so a fix is seen against what it replaced."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Int

from tlwidgets.core.events import Event
from tlwidgets.ui.panel import Panel, PanelHost
from tlwidgets.ui.ticks import CHAR_EM, LINE_EM, integer_ticks, log_ticks

__all__ = ["MARKER_COLORS", "LossPanel", "legend_location", "moving_average", "robust_range"]

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
#: Below this many points a line also draws its points (one step has no line to draw).
MARKERS_UNTIL = 60
#: The figure's least size (its layout's min_width and height) less its margins: ticks and marker
#: labels are chosen to fit this, so a wider panel only spreads them further apart.
FIGURE_MIN_WIDTH, FIGURE_HEIGHT = 320, 300
MARGIN = {"top": 10, "bottom": 40, "left": 55, "right": 10}
PLOT_MIN_WIDTH = FIGURE_MIN_WIDTH - MARGIN["left"] - MARGIN["right"]
PLOT_HEIGHT = FIGURE_HEIGHT - MARGIN["top"] - MARGIN["bottom"]
#: Font size of the control labels (their Label mark's default_size) and of the tick labels.
MARKER_FONT_PX = 11
TICK_FONT_PX = 10
#: A validation point further above the training curve's range than this many times that range
#: is drawn on the top edge with its value, instead of squeezing the curve into the bottom.
OFF_SCALE = 1.0


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


def robust_range(core: np.ndarray, extra: np.ndarray, *, log: bool = False) -> tuple[float, float, float]:
    """``(lo, hi, top)``: the y range to show and the value above which ``extra`` points are off scale.

    ``core`` (the training curve) is always shown whole: a spike of the training loss is the
    story, not an outlier. ``extra`` values (validation points, abandoned timelines) widen the
    range unless one lies more than ``OFF_SCALE`` times the core's range above it (a single
    validation loss of 326.8 over a training loss near 2 would flatten the curve): those are off
    scale. ``log``: the same in log10 space (values must be > 0).
    """
    f = np.log10 if log else (lambda v: v)
    core = core[np.isfinite(core)]
    extra = extra[np.isfinite(extra)]
    if log:
        core, extra = core[core > 0], extra[extra > 0]
    if core.size == 0:
        values = extra
        if values.size == 0:
            return (1.0, 10.0, math.inf) if log else (0.0, 1.0, math.inf)
        return float(values.min()), float(values.max()), math.inf
    lo, hi = float(core.min()), float(core.max())
    span = f(hi) - f(lo) if hi > lo else (1.0 if log else max(abs(hi), 1.0))
    limit = f(hi) + OFF_SCALE * span
    top = 10.0**limit if log else limit
    kept = extra[extra <= top]
    if kept.size:
        lo, hi = min(lo, float(kept.min())), max(hi, float(kept.max()))
    return lo, hi, (top if (extra > top).any() else math.inf)


class LossPanel(Panel, widgets.VBox):
    """Training loss (raw and smoothed) against the global step, validation loss at each epoch
    end, and a vertical marker with a label at every control change (freeze, unfreeze, LR,
    checkpoint, rewind) so cause and effect line up. CSS class ``tlw-loss``.

    After a rewind, the abandoned timelines (``history.branches``, the newest
    ``MAX_BRANCHES_SHOWN``) are drawn dashed and lighter under the run that
    replaced them, smoothed like the current one, with a legend entry naming
    what rewound each (e.g. the action applied): the effect of a fix is seen.

    What tests (and browser tests) can read:

    - The legend (``display_legend`` true, ``labels``): ``raw`` "train loss",
      ``smooth`` "smoothed", ``val`` "validation" (once there is a point),
      ``branches`` "before: ..." (after a rewind); ``figure.legend_location``
      "top-right", or "bottom-left" while a label is too long to fit from the
      right (:func:`legend_location`).
    - ``x_axis.tick_values``: integer steps only, chosen by
      :func:`tlwidgets.ui.ticks.integer_ticks` so labels never touch at the
      figure's least width; ``x`` scale ``min``/``max`` span at least two
      steps (one step shows its point, ``raw.marker`` is set while the points
      are few).
    - ``y`` scale ``min``/``max``: the training curve whole plus validation
      points and abandoned timelines unless far above (:func:`robust_range`);
      such validation points sit on the top edge and ``off_scale`` labels them
      with their value (a branch line leaves the plot at the top).
    - ``marker_labels.text``: one label per control step (controls at the same
      or nearly the same step merged, "+N more"), truncated to the plot's
      height; ``marker_heads`` (a Scatter at the top of each marker line) holds
      the full texts in ``names`` and shows them on hover (``marker_heads.tooltip``).
    - ``y_axis.tick_values`` on the log scale: powers of ten (or 1-2-5) that do not crowd.
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
        self.raw = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=["#9ecae1"],
            labels=["train loss"],
            display_legend=True,
            marker_size=16,
        )
        self.smooth = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=["#08519c"],
            stroke_width=2.5,
            labels=["smoothed"],
            display_legend=True,
        )
        self.val = bq.Scatter(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            colors=["#e6550d"],
            default_size=48,
            labels=["validation"],
            display_legend=False,
        )
        self.val_line = bq.Lines(
            x=np.zeros(0), y=np.zeros(0), scales=scales, colors=["#e6550d"], line_style="dashed"
        )
        # Validation points above the plotted range: their value, written at the top edge.
        self.off_scale = bq.Label(
            x=np.zeros(0),
            y=np.zeros(0),
            text=[],
            scales=scales,
            colors=["#e6550d"],
            default_size=11,
            font_weight="bold",
            align="start",
            x_offset=6,
            y_offset=10,
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
            default_size=MARKER_FONT_PX,
            colors=["#424242"],
            align="start",
        )
        # The full text of each marker on hover (the label may be truncated or merged): bqplot's
        # tooltip shows a Scatter point's ``name``, in the browser without a round trip.
        self.marker_heads = bq.Scatter(
            x=np.zeros(0),
            y=np.zeros(0),
            scales=scales,
            marker="triangle-down",
            default_size=40,
            colors=["#757575"],
            names=[],
            display_names=False,
            tooltip=bq.Tooltip(fields=["name"], show_labels=False),
            interactions={"hover": "tooltip"},
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
        self.x_axis = bq.Axis(scale=self.x, label="step", grid_lines="none", tick_format="d")
        self.y_axis = bq.Axis(scale=self.y, side="left", label="loss", grid_lines="dashed")
        # bqplot sizes the legend box at 1em (16px) per character of the longest label, from the
        # right edge: labels stay short ("smoothed", not "smoothed (mean of 13)") or the box
        # covers the start of the curve.
        self.figure = bq.Figure(
            marks=[
                self.branches,
                self.raw,
                self.smooth,
                self.val_line,
                self.val,
                self.off_scale,
                self.markers,
                self.marker_labels,
                self.marker_heads,
                self.cursor,
            ],
            axes=[self.x_axis, self.y_axis],
            fig_margin=dict(MARGIN),
            layout=widgets.Layout(
                width="100%", height=f"{FIGURE_HEIGHT}px", min_width=f"{FIGURE_MIN_WIDTH}px"
            ),
            animation_duration=0,
            display_toolbar=False,
            legend_location="top-right",
            legend_text={"font-size": "10px"},
            # No border: bqplot's box is far wider than its text (16 px per character), and its
            # edge reads as one more line across the plot.
            legend_style={"stroke": "none"},
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
        self.y_axis = bq.Axis(scale=new, side="left", label="loss", grid_lines="dashed")
        self.figure.axes = [self.x_axis, self.y_axis]
        if self._session is not None:
            self.draw(self._session)

    def draw(self, session: Any) -> None:
        """Redraw from ``session.history`` (decimated to at most ~1500 points per line)."""
        self._session = session
        hist = session.history
        log = self.log_y.value
        steps = hist.step.astype(np.float64)
        loss = hist.loss
        loss = np.where(np.isfinite(loss), loss, np.nan)
        if log:
            loss = np.where(loss > 0, loss, np.nan)
        window = int(np.clip(len(loss) // 20, 1, 50))
        smooth = moving_average(loss, window)
        stride = max(1, len(steps) // MAX_POINTS)
        with self.raw.hold_sync():
            self.raw.x, self.raw.y = steps[::stride], loss[::stride]
            marker = "circle" if len(steps[::stride]) <= MARKERS_UNTIL else None
            if self.raw.marker != marker:
                self.raw.marker = marker
        with self.smooth.hold_sync():
            self.smooth.x, self.smooth.y = steps[::stride], smooth[::stride]
        val = hist.val_loss
        val_y = val[:, 1] if len(val) else np.zeros(0)
        if log:
            val_y = np.where(val_y > 0, val_y, np.nan)
        branch_x, branch_y = self._draw_branches(hist, window)
        finite = loss[np.isfinite(loss)]
        # The current run sets the range; validation points and abandoned timelines widen it unless
        # far above (a branch that blew up to 1e16 would flatten the run that replaced it: its line
        # leaves the plot at the top, which tells the story).
        lo, hi, top = robust_range(finite, np.concatenate([val_y, branch_y]), log=log)
        if hi <= lo:  # one value: a band around it
            lo, hi = (lo / 2, hi * 2) if log else (lo - max(abs(lo), 1.0) * 0.1, hi + max(abs(hi), 1.0) * 0.1)
        off = np.isfinite(val_y) & (val_y > top)
        with self.val.hold_sync():
            self.val.x = val[:, 0] if len(val) else np.zeros(0)
            self.val.y = np.where(off, hi, val_y)  # off-scale points sit on the top edge
            self.val.display_legend = bool(len(val))
        with self.val_line.hold_sync():
            self.val_line.x, self.val_line.y = (
                (val[:, 0], np.where(off, hi, val_y)) if len(val) > 1 else (np.zeros(0), np.zeros(0))
            )
        with self.off_scale.hold_sync():
            self.off_scale.x = val[off, 0] if len(val) else np.zeros(0)
            self.off_scale.y = np.full(int(off.sum()), hi)
            self.off_scale.text = [f"↑ {v:.4g}" for v in val_y[off]]
        x_lo, x_hi = self._x_range(steps, branch_x, val, hist.controls)
        with self.x.hold_sync():
            self.x.min, self.x.max = x_lo, x_hi
        ticks = np.array(integer_ticks(x_lo, x_hi, PLOT_MIN_WIDTH, font_px=TICK_FONT_PX), dtype=np.float64)
        if not np.array_equal(np.asarray(self.x_axis.tick_values), ticks):
            self.x_axis.tick_values = ticks
        self._set_y(lo, hi, log, bool(finite.size or len(val)))
        self._draw_markers(list(hist.controls)[-30:], lo, hi, x_lo, x_hi, bool(finite.size))
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

    @staticmethod
    def _x_range(
        steps: np.ndarray, branch_x: np.ndarray, val: np.ndarray, controls: Any
    ) -> tuple[float, float]:
        """The steps shown: every mark's, and at least two steps wide (one step is not an axis)."""
        xs = [steps, branch_x, val[:, 0] if len(val) else np.zeros(0)]
        xs.append(np.array([c.step for c in controls], dtype=np.float64))
        allx = np.concatenate([x[np.isfinite(x)] for x in xs])
        if allx.size == 0:
            return 0.0, 2.0
        lo, hi = float(allx.min()), float(allx.max())
        if hi - lo < 2:
            lo, hi = max(0.0, lo - 1), hi + 1
        return lo, hi

    def _set_y(self, lo: float, hi: float, log: bool, data: bool) -> None:
        """The y scale's range (fixed, so an off-scale point cannot stretch it) and, on a log
        axis, ticks that do not crowd (bqplot labels every 2 ... 9 between powers of ten)."""
        if not data:
            with self.y.hold_sync():
                self.y.min, self.y.max = None, None
            return
        if log:
            pad = (hi / lo) ** 0.03
            ymin, ymax = lo / pad, hi * pad
        else:
            pad = 0.03 * (hi - lo)
            ymin, ymax = lo - pad, hi + pad
        with self.y.hold_sync():
            self.y.min, self.y.max = float(ymin), float(ymax)
        if log:
            # Two text lines between ticks: closer, the labels read as one column of numbers.
            ticks = np.array(log_ticks(ymin, ymax, PLOT_HEIGHT, min_spacing_px=2 * LINE_EM * TICK_FONT_PX))
            if not np.array_equal(np.asarray(self.y_axis.tick_values), ticks):
                self.y_axis.tick_values = ticks
                self.y_axis.tick_format = ".3~g"

    def _draw_markers(
        self, controls: list[Any], lo: float, hi: float, x_lo: float, x_hi: float, data: bool
    ) -> None:
        """A line per control step (``markers``), one label per group of controls too close to label apart.

        Controls at the same step are one label ("freeze head · set_lr 0.01"); labels whose
        rotated text would touch (closer than a line of text at the figure's least width) are
        merged into the newest one with "+N more". Each label is cut to the plot's height;
        the marker heads hold the full text for the hover.
        """
        line_xs, line_colors = np.zeros(0), ["#757575"]
        if not (controls and data):
            xs, texts, full, colors = np.zeros(0), [], [], ["#757575"]
        else:
            by_step: dict[int, list[Any]] = {}
            for c in controls:
                by_step.setdefault(int(c.step), []).append(c)
            per_px = PLOT_MIN_WIDTH / max(x_hi - x_lo, 1e-9)
            room = LINE_EM * MARKER_FONT_PX + 2  # a rotated label is one line of text wide
            groups: list[list[int]] = []
            for step in sorted(by_step):
                if groups and (step - groups[-1][-1]) * per_px < room:
                    groups[-1].append(step)
                else:
                    groups.append([step])
            max_chars = int((PLOT_HEIGHT - 8) / (CHAR_EM * MARKER_FONT_PX))
            xs_list, texts, full, colors = [], [], [], []
            for group in groups:
                last = group[-1]
                label = " · ".join(c.label() for c in by_step[last])
                others = sum(len(by_step[s]) for s in group[:-1])
                if others:
                    label += f" (+{others} more)"
                xs_list.append(float(last))
                texts.append(_short(label, max_chars))
                full.append(
                    "; ".join(f"step {s}: " + " · ".join(c.label() for c in by_step[s]) for s in group)
                )
                colors.append(MARKER_COLORS.get(by_step[last][-1].kind, "#757575"))
            xs = np.array(xs_list)
            # Every control step keeps its line; only the labels are merged.
            line_xs = np.array(sorted(by_step), dtype=np.float64)
            line_colors = [MARKER_COLORS.get(by_step[s][-1].kind, "#757575") for s in sorted(by_step)]
        with self.markers.hold_sync():
            self.markers.x = np.stack([line_xs, line_xs], axis=1) if len(line_xs) else np.zeros((0, 2))
            self.markers.y = np.array([[lo, hi]] * len(line_xs), dtype=np.float64).reshape(-1, 2)
            self.markers.colors = line_colors
        with self.marker_labels.hold_sync():
            self.marker_labels.x = xs
            self.marker_labels.y = np.full(len(xs), lo)
            self.marker_labels.text = texts
            self.marker_labels.colors = colors
        with self.marker_heads.hold_sync():
            self.marker_heads.x = xs
            self.marker_heads.y = np.full(len(xs), hi)
            self.marker_heads.names = full
            self.marker_heads.colors = colors

    def _draw_branches(self, hist: Any, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw the newest abandoned timelines; return their steps and finite values shown."""
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
        location = legend_location([*labels, *self.raw.labels, *self.smooth.labels, *self.val.labels])
        if self.figure.legend_location != location:
            self.figure.legend_location = location
        if not xs:
            return np.zeros(0), np.zeros(0)
        return x2[np.isfinite(x2)], y2[np.isfinite(y2)]


def legend_location(labels: list[str]) -> str:
    """Where the legend goes: top right (clear of a falling loss) while it fits there, else bottom left.

    bqplot draws the legend box (1 em = 16 px per character of the longest label, plus 2) leftward
    from the right edge: a label too long for the plot's least width (a branch's "before: Rewind
    to step 0 and set lr=0.044") would push the legend past the left edge, out of sight. From the
    left it starts inside the plot, and bottom left is the corner a falling loss leaves empty.
    """
    longest = max((len(t) for t in labels), default=0)
    return "top-right" if (longest + 2) * 16 <= PLOT_MIN_WIDTH else "bottom-left"


def _short(text: str, limit: int = 28) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
