"""Update heatmap: parameters x recent steps, colour = log10(update/weight), healthy ~1e-3 band in green."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Int, Unicode

from tlwidgets.core.events import Event
from tlwidgets.ui.panel import Panel, PanelHost

__all__ = ["RATIO_COLORS", "HeatmapPanel", "short_name"]

#: Colours at log10(update/weight) = -6, -5, ..., 0:
#: cold (too slow), green around -3 (healthy), hot (too fast).
RATIO_COLORS = ["#2b3a8c", "#4a7bd0", "#8fd0a0", "#1f9e50", "#b8d860", "#f39c34", "#c62828"]
GRAD_COLORS = ["#440154", "#21908d", "#fde725"]
#: Colour of cells with no value: parameters frozen now, or not measured at that step.
NULL_COLOR = "#d0d0d0"
#: Values below this are clipped (an update of exactly 0 shows in the coldest colour).
FLOOR = -8.0


def color_domain(lo: float, hi: float, colors: list[str]) -> tuple[float, list[str]]:
    """(scale min, colour stops) with a grey stop one step below ``lo`` for cells without a value.

    bqplot's GridHeatMap paints only ``null`` with ``null_color``, and numeric
    arrays cannot carry nulls, so cells without a value get the value
    ``scale min`` (the grey stop) while real values are clipped to [lo, hi];
    colour stops are evenly spaced, so no real value mixes with the grey.
    """
    step = (hi - lo) / (len(colors) - 1)
    return lo - step, [NULL_COLOR, *colors]


def legend_html(lo: float, hi: float, colors: list[str], none: str, *, healthy: bool) -> str:
    """A colour bar for [lo, hi] (log10 values, labelled as powers of ten) with a "no value" swatch."""
    n = len(colors)
    ticks = [lo + i * (hi - lo) / (n - 1) for i in range(n)]
    labels = "".join(f"<span>{_power(t)}</span>" for t in ticks)
    band = ""
    if healthy:  # 1e-4 .. 1e-2 on the -6 .. 0 bar
        left, width = 100 * (-4 - lo) / (hi - lo), 100 * 2 / (hi - lo)
        style = f"margin-left:{left:.1f}%;width:{width:.1f}%"
        band = f"<div class='tlw-legend-band' style='{style}'>healthy ≈ 1e-3</div>"
    return (
        "<div class='tlw-legend'>"
        f"<span class='tlw-legend-none' style='background:{NULL_COLOR}'>{html.escape(none)}</span>"
        "<div class='tlw-legend-scale'>"
        f"<div class='tlw-legend-bar' style='background:linear-gradient(to right,{','.join(colors)})'></div>"
        f"<div class='tlw-legend-ticks'>{labels}</div>{band}</div>"
        "<small class='tlw-legend-hint'>click a cell</small></div>"
    )


def _power(v: float) -> str:
    return "1" if v == 0 else (f"1e{v:.0f}" if float(v).is_integer() else f"1e{v:.1f}")


def short_name(name: str, limit: int = 22) -> str:
    """A parameter name shortened from the left so its end (the leaf) stays readable."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def log10_safe(values: np.ndarray) -> np.ndarray:
    """log10 with 0 -> FLOOR and NaN kept (no warnings)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(values)
    out[np.isneginf(out)] = FLOOR
    finite = np.isfinite(out)
    out[finite] = np.clip(out[finite], FLOOR, 4.0)
    return out


class HeatmapPanel(Panel, widgets.VBox):
    """Rows = parameters, columns = the last ``steps`` optimizer steps.

    Colour is log10 of the update/weight ratio (switch: log10 grad norm).
    Parameters frozen now show as grey rows with a ``❄`` in their label.
    Clicking a cell selects that parameter (``selected_param``) and the step,
    and the figure below shows the parameter's history.

    Parameters
    ----------
    param_names
        Row labels, in model order.
    guard
        Decorator reporting callback exceptions in the dashboard.
    on_select
        ``on_select(param, step)`` after a click on a cell.
    steps
        Columns shown.
    """

    name = "heatmap"
    events = (Event.STEP, Event.CONTROL)
    slot = "plots"
    min_interval = 0.25  # costly for the browser to re-render: at most ~4 redraws a second in a run

    metric = Unicode(
        "update_ratio", help="Colour: 'update_ratio' (log10 update/weight) or 'grad_norm' (log10)."
    )
    selected_param = Unicode(None, allow_none=True, help="Parameter whose history is shown (row clicked).")
    steps = Int(50, help="How many recent steps the heatmap shows.")

    def __init__(
        self,
        param_names: list[str],
        guard: Callable[[str], Callable],
        on_select: Callable[[str | None, int | None], None],
        *,
        steps: int = 50,
        **kwargs: Any,
    ) -> None:
        self.param_names = list(param_names)
        self._on_select = on_select
        self._columns = np.zeros(0, dtype=np.int64)
        n = max(len(self.param_names), 2)
        self.row_scale = bq.OrdinalScale(reverse=True)
        self.col_scale = bq.OrdinalScale()
        self.domain = (-6.0, 0.0)
        vmin, stops = color_domain(*self.domain, RATIO_COLORS)
        self.color_scale = bq.ColorScale(colors=stops, min=vmin, max=self.domain[1])
        self.grid = bq.GridHeatMap(
            row=np.arange(n),
            column=np.arange(2),
            color=np.full((n, 2), vmin),
            scales={"row": self.row_scale, "column": self.col_scale, "color": self.color_scale},
            null_color=NULL_COLOR,
            stroke="white",
            # No "select" interaction: bqplot 0.13.1 cannot deserialize the selection a click sends
            # back (object array -> "Unsupported dtype object"), which silently drops the change.
            # A click also sends an element_click message with the cell, which works.
            interactions={},
            selected_style={"stroke": "black", "stroke-width": "2px"},
            anchor_style={"stroke": "black"},
        )
        self.row_axis = bq.Axis(
            scale=self.row_scale,
            side="left",
            tick_labels=self._row_labels(set()),
            tick_style={"font-size": "10px"},
            grid_lines="none",
        )
        self.col_axis = bq.Axis(
            scale=self.col_scale, label="step", grid_lines="none", tick_style={"font-size": "10px"}
        )
        height = int(min(520, max(220, 16 * n + 90)))
        self.figure = bq.Figure(
            marks=[self.grid],
            axes=[self.row_axis, self.col_axis],
            fig_margin={"top": 8, "bottom": 36, "left": 130, "right": 12},
            display_toolbar=False,
            padding_y=0.0,
            layout=widgets.Layout(width="100%", height=f"{height}px", min_width="360px"),
            animation_duration=0,
        )
        self.figure.add_class("tlw-heatmap-figure")
        self.switch = widgets.ToggleButtons(
            options=[("update/weight", "update_ratio"), ("grad norm", "grad_norm")],
            value="update_ratio",
            tooltips=[
                "log10 of the update/weight ratio (healthy ~1e-3: green)",
                "log10 of the gradient norm",
            ],
            style={"button_width": "128px"},
            layout=widgets.Layout(flex="0 0 auto", width="auto"),
        )
        self.switch.add_class("tlw-heatmap-switch")
        # The colour scale as HTML (bqplot's vertical ColorAxis is cramped at this size).
        self.legend = widgets.HTML(legend_html(-6.0, 0.0, RATIO_COLORS, "frozen", healthy=True))
        self.legend.add_class("tlw-heatmap-legend")
        self.history_x = bq.LinearScale()
        self.history_y = bq.LogScale()
        self.history_lines = bq.Lines(
            x=np.zeros(0),
            y=np.zeros((2, 0)),
            scales={"x": self.history_x, "y": self.history_y},
            colors=["#1f77b4", "#ff7f0e"],
            labels=["update/weight", "grad norm"],
            display_legend=True,
        )
        self.history_figure = bq.Figure(
            marks=[self.history_lines],
            axes=[
                bq.Axis(scale=self.history_x, label="step", grid_lines="none"),
                bq.Axis(scale=self.history_y, side="left", tick_format=".0e", grid_lines="dashed"),
            ],
            title="click a heatmap row",
            fig_margin={"top": 30, "bottom": 35, "left": 60, "right": 10},
            display_toolbar=False,
            legend_location="top-right",
            layout=widgets.Layout(width="100%", height="200px"),
            animation_duration=0,
        )
        self.history_figure.add_class("tlw-param-history")
        self.title = widgets.HTML(self._title_text(), layout=widgets.Layout(flex="1 1 auto"))
        header = widgets.HBox(
            [self.title, self.switch],
            layout=widgets.Layout(justify_content="space-between", align_items="center"),
        )
        # The history figure joins the panel on the first selection: a bqplot figure created
        # hidden (display: none) renders empty when shown later.
        self.history_box = widgets.VBox()
        super().__init__(children=[header, self.figure, self.legend, self.history_box], **kwargs)
        self.add_class("tlw-heatmap")
        self.steps = steps
        self.switch.observe(guard("heatmap switch")(self._switch_changed), names="value")
        self.grid.on_element_click(guard("heatmap click")(self._cell_clicked))
        self._frozen: set[str] = set()
        self._session: Any = None

    @classmethod
    def build(cls, host: PanelHost) -> HeatmapPanel:
        return cls(
            list(host.session.param_names),
            host.guard,
            host.select,
            steps=host.heatmap_steps,
            layout=widgets.Layout(flex="1 1 55%", min_width="380px"),
        )

    def show_selection(self, param: str | None, step: int | None, stage: Any) -> None:
        """Highlight the selected parameter's row and show its history."""
        if param != self.selected_param:
            self.select(param)

    # -- drawing ------------------------------------------------------------------------
    def _row_labels(self, frozen: set[str]) -> dict[str, str]:
        n = len(self.param_names)
        every = max(1, math.ceil(n / 40))  # at most ~40 readable labels
        return {
            str(i): ("❄ " if name in frozen else "") + short_name(name)
            for i, name in enumerate(self.param_names)
            if i % every == 0 or name in frozen
        }

    def matrix(self, session: Any) -> tuple[np.ndarray, np.ndarray]:
        """(colour matrix params x steps, step numbers) for the current metric; frozen rows NaN.

        The columns are the newest ``steps`` *measured* steps (past the dense
        phase of the tracking schedule, every ``measure_every``-th step).
        bqplot squeezes singleton dimensions away, so the matrix always has at
        least two columns (NaN columns for steps not taken yet) and two rows
        (a blank row under a one-parameter model).
        """
        hist = session.history
        n = len(self.param_names)
        if len(hist) == 0:
            steps = np.zeros(0, dtype=np.int64)
            color = np.full((n, 0), np.nan)
        else:
            rows = np.flatnonzero(hist.measured)[-self.steps :]
            steps = hist.step[rows].astype(np.int64)
            values = (hist.update_ratio if self.metric == "update_ratio" else hist.grad_norm)[rows]
            color = log10_safe(values.T.astype(np.float64))[:n]
            frozen = np.array([not p.requires_grad for _, p in session.named_params], dtype=bool)
            color[frozen[:n], :] = np.nan
        if len(steps) < 2:
            start = int(steps[-1]) + 1 if len(steps) else 1
            pad = np.arange(start, start + 2 - len(steps), dtype=np.int64)
            steps = np.concatenate([steps, pad])
            color = np.concatenate([color, np.full((n, len(pad)), np.nan)], axis=1)
        if n < 2:
            color = np.concatenate([color, np.full((2 - n, color.shape[1]), np.nan)], axis=0)
        return color, steps

    def draw(self, session: Any) -> None:
        """Redraw the grid (one message), the row labels when freezing changed, and the history."""
        self._session = session
        color, steps = self.matrix(session)
        frozen = {n for n, p in session.named_params if not p.requires_grad}
        color = self.paint(color)
        with self.grid.hold_sync():
            # colour first: bqplot validates column against the current colour's shape
            self.grid.color = color
            if len(steps) != len(self._columns) or not np.array_equal(steps, self._columns):
                self.grid.column = steps
                self._columns = steps
        if frozen != self._frozen:
            self._frozen = frozen
            self.row_axis.tick_labels = self._row_labels(frozen)
        # Label about six columns (bqplot's ordinal axes would label all 50); others stay blank.
        every = max(1, len(steps) // 6)
        labels = {
            str(int(v)): (str(int(v)) if (len(steps) - 1 - i) % every == 0 else "")
            for i, v in enumerate(steps)
        }
        if labels != self.col_axis.tick_labels:
            self.col_axis.tick_labels = labels
        self._draw_history(session)

    def _title_text(self) -> str:
        what = "update / weight" if self.metric == "update_ratio" else "gradient norm"
        return f"<b>{what}</b> <small>· last {self.steps} steps</small>"

    def paint(self, color: np.ndarray) -> np.ndarray:
        """The values sent to bqplot: clipped to the colour domain, no value -> the grey stop."""
        lo, hi = self.domain
        out = np.clip(color, lo, hi)
        out[np.isnan(color)] = self.color_scale.min
        return out

    def _set_domain(self, lo: float, hi: float, colors: list[str], none: str) -> None:
        self.domain = (float(lo), float(hi))
        vmin, stops = color_domain(lo, hi, colors)
        with self.color_scale.hold_sync():
            self.color_scale.colors = stops
            self.color_scale.min, self.color_scale.max = float(vmin), float(hi)
        self.legend.value = legend_html(lo, hi, colors, none, healthy=self.metric == "update_ratio")

    def _switch_changed(self, change: dict[str, Any]) -> None:
        self.metric = change["new"]
        if self.metric == "update_ratio":
            self._set_domain(-6.0, 0.0, RATIO_COLORS, "frozen")
        else:
            lo, hi = -4.0, 1.0
            if self._session is not None and len(self._session.history):
                hist = self._session.history
                rows = np.flatnonzero(hist.measured)[-self.steps :]
                g = log10_safe(hist.grad_norm[rows].astype(np.float64))
                g = g[np.isfinite(g) & (g > FLOOR)]
                if g.size:
                    lo, hi = math.floor(np.percentile(g, 1)), math.ceil(np.percentile(g, 99))
                    hi = max(hi, lo + 1)
            self._set_domain(lo, hi, GRAD_COLORS, "no grad")
        self.title.value = self._title_text()
        if self._session is not None:
            self.draw(self._session)

    # -- selection ------------------------------------------------------------------------
    def _cell_clicked(self, _mark: Any, content: dict[str, Any]) -> None:
        data = content.get("data") or {}
        row, col = data.get("rowNum"), data.get("columnNum")
        if row is None:
            return
        self.click(int(row), None if col is None else int(col))

    def click(self, row: int, column: int | None = None) -> None:
        """What a click on the cell (row, column) does: select the parameter and that step."""
        name = self.param_names[row] if 0 <= row < len(self.param_names) else None
        step = None
        if column is not None and 0 <= column < len(self._columns):
            step = int(self._columns[column])
        self.select(name)
        self._on_select(name, step)

    def select(self, name: str | None) -> None:
        """Select a parameter: highlight its row and show its history."""
        self.selected_param = name
        if name in self.param_names:
            row = self.param_names.index(name)
            self.grid.selected = np.array([[row, c] for c in range(max(len(self._columns), 2))])
        else:
            self.grid.selected = None
        if self._session is not None:
            self._draw_history(self._session)

    def _draw_history(self, session: Any) -> None:
        name = self.selected_param
        if name is None or name not in self.param_names:
            self.history_box.layout.display = "none"
            return
        hist = session.history
        rows = hist.measured  # unmeasured steps hold NaN: a line through them would break apart
        steps = hist.step.astype(np.float64)[rows]
        i = self.param_names.index(name)
        ratio = hist.update_ratio[rows, i] if len(hist) else np.zeros(0)
        grad = hist.grad_norm[rows, i] if len(hist) else np.zeros(0)
        stride = max(1, len(steps) // 1000)  # at most ~1000 points per line
        y = np.vstack([ratio[::stride], grad[::stride]]).astype(np.float64)
        y[~(y > 0)] = np.nan  # a log scale cannot show 0
        with self.history_lines.hold_sync():
            self.history_lines.x = steps[::stride]
            self.history_lines.y = y
        positive = y[np.isfinite(y)]
        if positive.size:  # one tick per power of ten (bqplot's log ticks crowd small ranges)
            lo, hi = math.floor(np.log10(positive.min())), math.ceil(np.log10(positive.max()))
            ticks = 10.0 ** np.arange(lo, hi + 1, max(1, (hi - lo) // 6 + 1))
            axis = self.history_figure.axes[1]
            if not np.array_equal(np.asarray(axis.tick_values), ticks):
                axis.tick_values = ticks
        frozen = "" if dict(session.named_params)[name].requires_grad else " (frozen)"
        self.history_figure.title = f"{name}{frozen}"
        if not self.history_box.children:
            self.history_box.children = [self.history_figure]
        self.history_box.layout.display = None
