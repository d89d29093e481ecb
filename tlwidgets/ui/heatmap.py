"""Update heatmap: parameters x recent measured steps, coloured by log10(update/weight) against the
band the LR rules use (or by log10 grad norm), with distinct states for cells without a value.

Each cell is in one of three states (:data:`STATES`): ``"measured"`` (coloured
by its value), ``"frozen"`` (grey: the parameter was frozen at that step, or is
frozen now) or ``"empty"`` (white: nothing to show, e.g. a step not taken yet).
The state of every cell is in :attr:`HeatmapPanel.states` and each state has
its own fill (:data:`STATE_COLORS`), so tests can tell them apart in widget state
and in the rendered SVG alike.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Sequence
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Int, Unicode

from tlwidgets.core.events import Event
from tlwidgets.diagnostics.rules.trend import update_ratio_band
from tlwidgets.ui.panel import Panel, PanelHost
from tlwidgets.ui.ticks import integer_ticks, log_ticks, ordinal_labels

__all__ = [
    "EMPTY_COLOR",
    "FROZEN_COLOR",
    "STATES",
    "STATE_COLORS",
    "TOOLTIP_FIELDS",
    "ColorKey",
    "HeatmapPanel",
    "grad_key",
    "ratio_key",
    "short_name",
]

#: A cell's state: no value to show, the parameter frozen at that step, a measured value.
STATES = ("empty", "frozen", "measured")
#: No value: a step not taken yet, a filler row. White (with the light grid lines around it) reads
#: as an empty table; grey is kept for "frozen".
EMPTY_COLOR = "#ffffff"
#: Frozen at that step (or frozen now): grey, as the freeze panel shows frozen parameters.
FROZEN_COLOR = "#d0d0d0"
#: Fill of each state without a value (measured cells are coloured by their value).
STATE_COLORS = {"empty": EMPTY_COLOR, "frozen": FROZEN_COLOR}
#: Lines between cells: light enough not to compete with the colours, dark enough to outline empty cells.
GRID_STROKE = "#eeeeee"
#: What the tooltip of a cell says (:meth:`HeatmapPanel.describe`), in this order.
TOOLTIP_FIELDS = ("parameter", "step", "value", "state")
GRAD_COLORS = ["#440154", "#21908d", "#fde725"]
#: Values below this are clipped (an update of exactly 0 shows in the coldest colour).
FLOOR = -8.0
#: Spacing, in decades, of the colour scale's stops: bqplot spaces a ColorScale's colours evenly
#: between its min and max, so the key is sampled this finely to put the band's edges within
#: a twentieth of a decade of where the rules draw them.
RESOLUTION = 0.05
#: The heatmap figure's least width (its layout's min_width) less its left and right margins: the
#: step labels are chosen to fit this, so a wider panel only spreads them further apart.
FIGURE_MIN_WIDTH = 360
MARGIN = {"top": 8, "bottom": 36, "left": 130, "right": 12}
PLOT_MIN_WIDTH = FIGURE_MIN_WIDTH - MARGIN["left"] - MARGIN["right"]
#: Font size of the step labels (set on the axis' tick_style below).
TICK_FONT_PX = 10
#: The colour key's bar width (CSS ``.tlw-legend-scale``, which does not shrink).
KEY_WIDTH_PX = 260


@dataclasses.dataclass(frozen=True)
class ColorKey:
    """How log10 values map to colours, and the values that stand for the states without one.

    bqplot's GridHeatMap paints only ``null`` with ``null_color`` and numeric arrays cannot
    carry nulls, so the states are values below the domain: ``empty_value`` (``lo - 2``)
    and ``frozen_value`` (``lo - 1``), each a colour stop of its own; measured values are
    clipped to ``[lo, hi]``, so no measured value mixes with them.

    Attributes
    ----------
    lo, hi
        The domain of measured values (log10), clipped to it.
    stops
        ``(log10 value, colour)`` ascending, linear in between; a value listed twice
        is a sharp edge (the band's bounds).
    band
        The healthy band (log10) drawn on the key, or None.
    what
        What the value is, for the tooltip and the key ("update/weight").
    extreme
        Above the band up to here the rules name the LR only if the loss misbehaves
        ("fast"); above it, whatever the loss does (log10), or None.
    """

    lo: float
    hi: float
    stops: tuple[tuple[float, str], ...]
    band: tuple[float, float] | None
    what: str
    extreme: float | None = None

    @property
    def empty_value(self) -> float:
        """The value a cell without data is painted with (the scale's min)."""
        return self.lo - 2.0

    @property
    def frozen_value(self) -> float:
        """The value a frozen cell is painted with."""
        return self.lo - 1.0

    def color_at(self, v: float) -> str:
        """The colour of a measured log10 value (clipped to the domain)."""
        v = min(max(v, self.lo), self.hi)
        stops = self.stops
        if v <= stops[0][0]:
            return stops[0][1]
        for (a, ca), (b, cb) in zip(stops, stops[1:]):
            if v < b or (v == b and b == stops[-1][0]):
                return _mix(ca, cb, 0.0 if b == a else (v - a) / (b - a))
        return stops[-1][1]

    def scale_colors(self) -> list[str]:
        """The ColorScale's colours, evenly spaced from ``empty_value`` to ``hi`` every RESOLUTION."""
        vmin = self.empty_value
        n = round((self.hi - vmin) / RESOLUTION)
        out = []
        for j in range(n + 1):
            p = vmin + j * (self.hi - vmin) / n
            # Between the state values no cell ever falls (up to rounding in the browser's scale):
            # the stops next to each state value take its colour, so rounding cannot tint it.
            if p < self.lo - 1.5:
                out.append(EMPTY_COLOR)
            elif p < self.lo - 0.5:
                out.append(FROZEN_COLOR)
            else:
                out.append(self.color_at(p))
        return out

    def gradient_css(self) -> str:
        """A CSS linear-gradient of the measured colours, for the key's bar (sharp band edges kept)."""
        span = self.hi - self.lo
        parts = [f"{c} {100 * (v - self.lo) / span:.2f}%" for v, c in self.stops]
        return f"linear-gradient(to right,{','.join(parts)})"


def _mix(a: str, b: str, t: float) -> str:
    """The colour ``t`` of the way from hex colour ``a`` to ``b``."""
    ca = [int(a[i : i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def ratio_key(optimizer: Any = None) -> ColorKey:
    """The update/weight key: blues below the LR rules' band, greens inside it, orange to red above.

    The band is :func:`tlwidgets.diagnostics.rules.trend.update_ratio_band` for the
    optimizer (what ``lr-too-low`` and ``lr-too-high`` judge against), so a run the
    rules find healthy is green, and orange means "too high if the loss misbehaves",
    red "too high whatever the loss does".
    """
    band = update_ratio_band(optimizer)
    lo, hi = math.log10(band.low), math.log10(band.high)
    extreme = math.log10(band.extreme)
    stops = (
        (-7.0, "#08306b"),  # 1e-7 and less (no update at all): the weights stand still
        (lo, "#9ecae1"),
        (lo, "#a1d99b"),  # the band: light to dark green as the steps grow
        (hi, "#238b45"),
        (hi, "#fee08b"),  # fast: too high only if the loss also rises or jumps (yellow to orange) ...
        (extreme, "#fdae61"),
        (extreme, "#d7301f"),  # ... too high whatever the loss does (red)
        (0.0, "#7f0000"),
    )
    return ColorKey(-7.0, 0.0, stops, (lo, hi), "update/weight", extreme)


def grad_key(lo: float, hi: float) -> ColorKey:
    """The gradient-norm key over ``[lo, hi]`` (log10): viridis, no band."""
    n = len(GRAD_COLORS)
    stops = tuple((lo + i * (hi - lo) / (n - 1), c) for i, c in enumerate(GRAD_COLORS))
    return ColorKey(float(lo), float(hi), stops, None, "grad norm")


def _power(v: float) -> str:
    """A log10 value as the power of ten it stands for (1e-3, 3e-5, 1)."""
    if v == 0:
        return "1"
    if float(v).is_integer():
        return f"1e{v:.0f}"
    return f"{10.0**v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def legend_html(key: ColorKey, frozen: str = "frozen", empty: str = "no data yet") -> str:
    """The colour key: a swatch per state without a value, the colour bar with powers of ten
    (as many as fit) and, for the update ratio, the band the LR rules call healthy."""
    span = key.hi - key.lo
    ticks = integer_ticks(key.lo, key.hi, KEY_WIDTH_PX, font_px=11, fmt=_power)
    labels = "".join(f"<span style='left:{100 * (t - key.lo) / span:.1f}%'>{_power(t)}</span>" for t in ticks)
    band = ""
    if key.band is not None:
        a, b = key.band
        style = f"left:{100 * (a - key.lo) / span:.1f}%;width:{100 * (b - a) / span:.1f}%"
        band = (
            f"<div class='tlw-legend-band' style='{style}' "
            f"title='the band the LR rules treat as healthy: {_power(a)} to {_power(b)}'>"
            f"healthy {_power(a)}–{_power(b)}</div>"
        )
        if key.extreme is not None:
            c = key.extreme
            style = f"left:{100 * (b - key.lo) / span:.1f}%;width:{100 * (c - b) / span:.1f}%"
            band += (
                f"<div class='tlw-legend-fast' style='{style}' title='fast: the LR rules name the LR "
                f"too high if the loss also rises or jumps; above {_power(c)} whatever it does'>fast</div>"
            )
        style = f"left:0;width:{100 * (a - key.lo) / span:.1f}%"
        band += (
            f"<div class='tlw-legend-slow' style='{style}' title='slow: the LR rules name the LR too low "
            "only if the loss also barely moves (a converged run takes small steps)'>slow</div>"
        )
        band = f"<div class='tlw-legend-bands'>{band}</div>"
    return (
        "<div class='tlw-legend'>"
        f"<span class='tlw-legend-state tlw-legend-empty' style='background:{EMPTY_COLOR}'>"
        f"{html.escape(empty)}</span>"
        f"<span class='tlw-legend-state tlw-legend-frozen' style='background:{FROZEN_COLOR}'>"
        f"{html.escape(frozen)}</span>"
        "<div class='tlw-legend-scale'>"
        f"<div class='tlw-legend-bar' style='background:{key.gradient_css()}'></div>"
        f"<div class='tlw-legend-ticks'>{labels}</div>{band}</div>"
        "<small class='tlw-legend-hint'>hover: value · click: history</small></div>"
    )


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


def ever_frozen(session: Any) -> set[str]:
    """Parameters frozen now or named by a freeze/unfreeze control in the history."""
    names = {n for n, p in session.named_params if not p.requires_grad}
    for c in session.history.controls:
        if c.kind in ("freeze", "unfreeze"):
            names.update(c.detail.get("params") or ())
    return names


class HeatmapPanel(Panel, widgets.VBox):
    """Rows = parameters, columns = the newest ``steps`` measured optimizer steps.

    Colour is log10 of the update/weight ratio against the LR rules' band (switch:
    log10 grad norm). Cells without a value have a state of their own: grey for
    frozen (a parameter frozen now is grey in every column and carries a ``❄`` in
    its label; one unfrozen since is grey at the steps it was frozen), white for
    empty (steps not taken yet). Hovering a cell shows its parameter, step, value
    and state; clicking it selects that parameter (``selected_param``) and step,
    and the figure below shows the parameter's history.

    What tests (and browser tests) can read:

    - ``states``: numpy array of ``"empty"`` / ``"frozen"`` / ``"measured"``,
      one per cell, the shape of ``grid.color`` (rows = parameters in model
      order, then filler rows; columns = ``grid.column``).
    - ``values``: the raw values (update/weight or grad norm, not log10), NaN
      where there is none, same shape.
    - ``state_values``: the value each state without a value is painted with in
      ``grid.color``; :data:`STATE_COLORS` their fills (``FROZEN_COLOR``
      ``#d0d0d0``, ``EMPTY_COLOR`` ``#ffffff``); ``key`` the measured colours.
    - ``cell_tooltip``: the HTML widget (CSS class ``tlw-heatmap-tooltip``) the grid
      shows on hover, filled by :meth:`hover` with :data:`TOOLTIP_FIELDS`
      (see :meth:`describe`).
    - ``col_axis.tick_labels``: step -> label, non-empty only for the steps
      labelled (chosen by :func:`tlwidgets.ui.ticks.ordinal_labels` so that
      labels never touch at the figure's least width).
    - ``title.value``: what the columns are (``steps 1–50``, or ``last 50
      measured steps (681–1661, every 20th)``).
    - ``legend.value``: the colour key (classes ``tlw-legend-empty``,
      ``tlw-legend-frozen``, ``tlw-legend-band``).

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
    optimizer
        The session's optimizer (its family picks the update/weight band).
    """

    name = "heatmap"
    events = (Event.STEP, Event.CONTROL)
    slot = "plots"
    min_interval = 0.25  # costly for the browser to re-render: at most ~4 redraws a second in a run

    metric = Unicode(
        "update_ratio", help="Colour: 'update_ratio' (log10 update/weight) or 'grad_norm' (log10)."
    )
    selected_param = Unicode(None, allow_none=True, help="Parameter whose history is shown (row clicked).")
    steps = Int(50, help="How many recent measured steps the heatmap shows.")

    def __init__(
        self,
        param_names: list[str],
        guard: Callable[[str], Callable],
        on_select: Callable[[str | None, int | None], None],
        *,
        steps: int = 50,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.param_names = list(param_names)
        self._on_select = on_select
        self._columns = np.zeros(0, dtype=np.int64)
        self._optimizer = optimizer
        n = max(len(self.param_names), 2)
        self.key = ratio_key(optimizer)
        self.states = np.full((n, 2), "empty", dtype="<U8")
        self.values = np.full((n, 2), np.nan)
        self.row_scale = bq.OrdinalScale(reverse=True)
        self.col_scale = bq.OrdinalScale()
        self.color_scale = bq.ColorScale(
            colors=self.key.scale_colors(), min=self.key.empty_value, max=self.key.hi
        )
        self.cell_tooltip = widgets.HTML("", layout=widgets.Layout(padding="2px 6px"))
        self.cell_tooltip.add_class("tlw-heatmap-tooltip")
        self.grid = bq.GridHeatMap(
            row=np.arange(n),
            column=np.arange(1, 3),
            color=np.full((n, 2), self.key.empty_value),
            scales={"row": self.row_scale, "column": self.col_scale, "color": self.color_scale},
            null_color=EMPTY_COLOR,
            stroke=GRID_STROKE,
            # No "select" interaction: bqplot 0.13.1 cannot deserialize the selection a click sends
            # back (object array -> "Unsupported dtype object"), which silently drops the change.
            # A click also sends an element_click message with the cell, which works.
            # Hover shows the tooltip widget; its text comes from the kernel (on_hover), since a
            # cell's data in the browser holds only its row, column and colour value.
            interactions={"hover": "tooltip"},
            tooltip=self.cell_tooltip,
            tooltip_style={"opacity": 0.95},
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
            scale=self.col_scale,
            label="step",
            grid_lines="none",
            tick_style={"font-size": f"{TICK_FONT_PX}px"},
        )
        height = int(min(520, max(220, 16 * n + 90)))
        self.figure = bq.Figure(
            marks=[self.grid],
            axes=[self.row_axis, self.col_axis],
            fig_margin=dict(MARGIN),
            display_toolbar=False,
            padding_y=0.0,
            layout=widgets.Layout(width="100%", height=f"{height}px", min_width=f"{FIGURE_MIN_WIDTH}px"),
            animation_duration=0,
        )
        self.figure.add_class("tlw-heatmap-figure")
        self.switch = widgets.ToggleButtons(
            options=[("update/weight", "update_ratio"), ("grad norm", "grad_norm")],
            value="update_ratio",
            tooltips=[
                "log10 of the update/weight ratio (green: the band the LR rules call healthy)",
                "log10 of the gradient norm",
            ],
            style={"button_width": "128px"},
            layout=widgets.Layout(flex="0 0 auto", width="auto"),
        )
        self.switch.add_class("tlw-heatmap-switch")
        # The colour scale as HTML (bqplot's vertical ColorAxis is cramped at this size).
        self.legend = widgets.HTML(legend_html(self.key))
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
            marker="circle",
            marker_size=12,
        )
        self.history_x_axis = bq.Axis(scale=self.history_x, label="step", grid_lines="none", tick_format="d")
        self.history_y_axis = bq.Axis(
            scale=self.history_y, side="left", label="value", tick_format=".0e", grid_lines="dashed"
        )
        self.history_figure = bq.Figure(
            marks=[self.history_lines],
            axes=[self.history_x_axis, self.history_y_axis],
            title="click a heatmap row",
            fig_margin={"top": 30, "bottom": 35, "left": 60, "right": 10},
            display_toolbar=False,
            legend_location="top-right",
            layout=widgets.Layout(width="100%", height="200px", min_width=f"{FIGURE_MIN_WIDTH}px"),
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
        self.grid.on_hover(guard("heatmap hover")(self._cell_hovered))
        self._frozen: set[str] = set()
        self._session: Any = None

    @classmethod
    def build(cls, host: PanelHost) -> HeatmapPanel:
        return cls(
            list(host.session.param_names),
            host.guard,
            host.select,
            steps=host.heatmap_steps,
            optimizer=getattr(host.session, "optimizer", None),
            layout=widgets.Layout(flex="1 1 55%", min_width="380px"),
        )

    def show_selection(self, param: str | None, step: int | None, stage: Any) -> None:
        """Highlight the selected parameter's row and show its history."""
        if param != self.selected_param:
            self.select(param)

    @property
    def state_values(self) -> dict[str, float]:
        """The value ``grid.color`` holds for a cell in each state without a value."""
        return {"empty": self.key.empty_value, "frozen": self.key.frozen_value}

    # -- drawing ------------------------------------------------------------------------
    def _row_labels(self, frozen: set[str]) -> dict[str, str]:
        n = len(self.param_names)
        every = max(1, math.ceil(n / 40))  # at most ~40 readable labels
        return {
            str(i): ("❄ " if name in frozen else "") + short_name(name)
            for i, name in enumerate(self.param_names)
            if i % every == 0 or name in frozen
        }

    def cells(self, session: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw values, states, step numbers) of the cells shown for the current metric.

        The columns are the newest ``steps`` *measured* steps (past the dense
        phase of the tracking schedule, every ``measure_every``-th step). A
        cell is frozen when its parameter is frozen now, or had no gradient at
        that step while it is one that a freeze or unfreeze control named (a
        parameter frozen for steps 1-21 and unfrozen since is grey there); a
        parameter never frozen that has no gradient (not reached by the loss)
        is measured, with an update of 0. bqplot squeezes singleton dimensions
        away, so there are always at least two columns (empty ones for steps
        not taken yet) and two rows (an empty row under a one-parameter model).
        """
        hist = session.history
        n = len(self.param_names)
        if len(hist) == 0:
            steps = np.zeros(0, dtype=np.int64)
            values = np.full((n, 0), np.nan)
            states = np.full((n, 0), "measured", dtype="<U8")
        else:
            rows = np.flatnonzero(hist.measured)[-self.steps :]
            steps = hist.step[rows].astype(np.int64)
            metric = hist.update_ratio if self.metric == "update_ratio" else hist.grad_norm
            values = metric[rows].T.astype(np.float64)[:n]
            states = np.full(values.shape, "measured", dtype="<U8")
            names = ever_frozen(session)
            if names:
                no_grad = np.isnan(hist.grad_norm[rows].T[:n])
                was = np.array([name in names for name in self.param_names], dtype=bool)
                states[no_grad & was[:, None]] = "frozen"
            now = np.array([not p.requires_grad for _, p in session.named_params], dtype=bool)[:n]
            states[now, :] = "frozen"
        if len(steps) < 2:
            start = int(steps[-1]) + 1 if len(steps) else 1
            pad = np.arange(start, start + 2 - len(steps), dtype=np.int64)
            steps = np.concatenate([steps, pad])
            values = np.concatenate([values, np.full((n, len(pad)), np.nan)], axis=1)
            states = np.concatenate([states, np.full((n, len(pad)), "empty", dtype="<U8")], axis=1)
        if n < 2:
            values = np.concatenate([values, np.full((2 - n, values.shape[1]), np.nan)], axis=0)
            states = np.concatenate([states, np.full((2 - n, states.shape[1]), "empty", dtype="<U8")], axis=0)
        return values, states, steps

    def matrix(self, session: Any) -> tuple[np.ndarray, np.ndarray]:
        """(log10 value matrix params x steps, step numbers); NaN where a cell is frozen or empty."""
        values, states, steps = self.cells(session)
        out = log10_safe(values)
        out[states != "measured"] = np.nan
        return out, steps

    def draw(self, session: Any) -> None:
        """Redraw the grid (one message), the row labels when freezing changed, and the history."""
        self._session = session
        values, states, steps = self.cells(session)
        self.values, self.states = values, states
        frozen = {n for n, p in session.named_params if not p.requires_grad}
        color = self.paint(log10_safe(values), states)
        # The step labels go first, with a blank for the columns about to leave: the browser's
        # axis formats the ticks of a changed column domain with the labels it holds, and any
        # step missing from them is written out in full (labels piled up at the newest steps).
        shown = set(ordinal_labels([int(v) for v in steps], PLOT_MIN_WIDTH, font_px=TICK_FONT_PX))
        labels = {str(int(v)): "" for v in self._columns}
        labels.update({str(int(v)): (str(int(v)) if int(v) in shown else "") for v in steps})
        if labels != self.col_axis.tick_labels:
            self.col_axis.tick_labels = labels
        with self.grid.hold_sync():
            # colour first: bqplot validates column against the current colour's shape
            self.grid.color = color
            if len(steps) != len(self._columns) or not np.array_equal(steps, self._columns):
                self.grid.column = steps
                self._columns = steps
        if frozen != self._frozen:
            self._frozen = frozen
            self.row_axis.tick_labels = self._row_labels(frozen)
        title = self._title_text(steps, states)
        if title != self.title.value:
            self.title.value = title
        self._draw_history(session)

    def _title_text(self, steps: np.ndarray | None = None, states: np.ndarray | None = None) -> str:
        """The metric and what the columns really are (consecutive steps, every k-th, or mixed)."""
        what = "update / weight" if self.metric == "update_ratio" else "gradient norm"
        if steps is None or states is None:
            return f"<b>{what}</b> <small>· no steps yet</small>"
        taken = [int(s) for s, col in zip(steps, states.T) if (col != "empty").any()]
        if not taken:
            cols = "no steps yet"
        elif len(taken) == 1:
            cols = f"step {taken[0]}"
        else:
            gaps = {b - a for a, b in zip(taken, taken[1:])}
            span = f"{taken[0]}–{taken[-1]}"
            if gaps == {1}:
                cols = f"steps {span}"
            elif len(gaps) == 1:
                cols = f"last {len(taken)} measured steps ({span}, every {_ordinal(gaps.pop())})"
            else:
                cols = f"last {len(taken)} measured steps ({span})"
        return f"<b>{what}</b> <small>· {cols}</small>"

    def paint(self, color: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
        """The values sent to bqplot: log10 values clipped to the key's domain, states as their values.

        A measured cell without a finite value (no gradient) takes the coldest colour,
        one that overflowed (+inf) the hottest.
        """
        key = self.key
        out = np.clip(color, key.lo, key.hi)
        out[np.isnan(color)] = key.lo
        if states is None:
            states = np.where(np.isnan(color), "frozen", "measured")
        out[states == "frozen"] = key.frozen_value
        out[states == "empty"] = key.empty_value
        return out

    def _set_key(self, key: ColorKey, frozen: str = "frozen") -> None:
        self.key = key
        with self.color_scale.hold_sync():
            self.color_scale.colors = key.scale_colors()
            self.color_scale.min, self.color_scale.max = float(key.empty_value), float(key.hi)
        self.legend.value = legend_html(key, frozen)

    @property
    def domain(self) -> tuple[float, float]:
        """The log10 range of measured values shown (clipped to it)."""
        return (self.key.lo, self.key.hi)

    def _switch_changed(self, change: dict[str, Any]) -> None:
        self.metric = change["new"]
        if self.metric == "update_ratio":
            self._set_key(ratio_key(self._optimizer))
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
            self._set_key(grad_key(lo, hi), "frozen / no grad")
        self.title.value = self._title_text()
        if self._session is not None:
            self.draw(self._session)

    # -- hover --------------------------------------------------------------------------
    def describe(self, row: int, column: int) -> dict[str, str]:
        """What the tooltip of cell (row, column) says: :data:`TOOLTIP_FIELDS` as text."""
        name = self.param_names[row] if 0 <= row < len(self.param_names) else ""
        step = str(int(self._columns[column])) if 0 <= column < len(self._columns) else ""
        inside = 0 <= row < self.states.shape[0] and 0 <= column < self.states.shape[1]
        state = str(self.states[row, column]) if inside else "empty"
        value = ""
        if state == "measured":
            v = float(self.values[row, column])
            value = f"{self.key.what} {v:.2e}" if math.isfinite(v) else f"{self.key.what}: none (no gradient)"
            if self.key.band is not None and math.isfinite(v) and v > 0:
                a, b = self.key.band
                where = "below" if v < 10.0**a else ("above" if v > 10.0**b else "inside")
                value += f" ({where} the healthy band {_power(a)}–{_power(b)})"
        elif state == "frozen":
            value = "no value: frozen at this step"
        else:
            value = "no value: step not taken yet" if name else "no value"
        return {"parameter": name, "step": step, "value": value, "state": state}

    def hover(self, row: int, column: int) -> None:
        """Fill the tooltip for cell (row, column), as a hover from the browser does."""
        d = self.describe(row, column)
        text = (
            f"<b>{html.escape(d['parameter'] or '(no parameter)')}</b><br>"
            f"step {html.escape(d['step'])} · {html.escape(d['state'])}<br>{html.escape(d['value'])}"
        )
        if text != self.cell_tooltip.value:
            self.cell_tooltip.value = text

    def _cell_hovered(self, _mark: Any, content: dict[str, Any]) -> None:
        data = content.get("data") or {}
        row, col = data.get("rowNum"), data.get("columnNum")
        if row is not None and col is not None:
            self.hover(int(row), int(col))

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
        x = steps[::stride]
        with self.history_lines.hold_sync():
            self.history_lines.x = x
            self.history_lines.y = y
            # Points only while they are few enough to read (one step has no line to draw).
            self.history_lines.marker = "circle" if len(x) <= 60 else None
        _set_step_axis(self.history_x, self.history_x_axis, x, FIGURE_MIN_WIDTH - 70)
        positive = y[np.isfinite(y)]
        if positive.size:
            lo, hi = float(positive.min()), float(positive.max())
            if hi <= lo * 1.0001:  # one value: a decade around it
                lo, hi = lo / 3, hi * 3
            # The figure is 200 px high less 65 px of margins; a label needs about two lines.
            ticks = np.array(log_ticks(lo, hi, 200 - 65, min_spacing_px=2 * 1.2 * 10))
            if not np.array_equal(np.asarray(self.history_y_axis.tick_values), ticks):
                self.history_y_axis.tick_values = ticks
        frozen = "" if dict(session.named_params)[name].requires_grad else " (frozen)"
        self.history_figure.title = f"{name}{frozen}"
        if not self.history_box.children:
            self.history_box.children = [self.history_figure]
        self.history_box.layout.display = None


def _ordinal(n: int) -> str:
    """2 -> "2nd", 20 -> "20th", 21 -> "21st", 12 -> "12th"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _set_step_axis(scale: bq.LinearScale, axis: bq.Axis, steps: Sequence[float], width_px: float) -> None:
    """A step axis: integer ticks that fit ``width_px``, and a range of at least two steps (one point
    would otherwise sit on a degenerate axis labelled "1 ... 1")."""
    if len(steps) == 0:
        return
    lo, hi = float(np.min(steps)), float(np.max(steps))
    if hi - lo < 2:
        lo, hi = max(0.0, lo - 1), hi + 1
    with scale.hold_sync():
        scale.min, scale.max = lo, hi
    ticks = np.array(integer_ticks(lo, hi, width_px), dtype=np.float64)
    if not np.array_equal(np.asarray(axis.tick_values), ticks):
        axis.tick_values = ticks
