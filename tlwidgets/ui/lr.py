"""LR panel: a log-scale slider per optimizer group and an LR range test with "apply suggestion"."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Float

from tlwidgets.ui.panel import LRFollowingPanel, PanelHost
from tlwidgets.ui.ticks import MIN_GAP_PX, label_width, log_ticks

__all__ = ["LRPanel", "group_owners"]

#: Slider range, as powers of ten.
LOG_MIN, LOG_MAX = -7.0, 1.0
#: The range-test figure's least width (its layout's min_width) less its left and right margins:
#: the LR ticks are chosen to fit it, so a wider tab only spreads them further apart.
FIGURE_MIN_WIDTH = 360
MARGIN = {"top": 10, "bottom": 40, "left": 55, "right": 10}
PLOT_MIN_WIDTH = FIGURE_MIN_WIDTH - MARGIN["left"] - MARGIN["right"]


class LRPanel(LRFollowingPanel, widgets.VBox):
    """One ``FloatLogSlider`` per optimizer group (CSS ``tlw-lr``); its value is the group's
    effective LR (what the optimizer uses now, after the scheduler). Moving a slider calls
    ``session.set_lr(value, group)``, which also rescales the scheduler's base so the schedule
    keeps its shape. Scheduler moves are reflected back without feeding a change to ``set_lr``.

    The LR range test button runs :func:`tlwidgets.diagnostics.checks.lr_range_test` (weights
    restored afterwards), plots loss against LR and offers its suggestion.

    The plot's axes are labelled ("learning rate", "loss"), its series named in a legend
    (``curve.labels``: "loss", "smoothed"; ``pick.labels``: "suggested LR"), and the LR axis'
    ticks (``x_axis.tick_values``) are powers of ten that do not crowd.
    """

    name = "lr"
    slot = "tabs"
    caption = "LR"

    suggestion = Float(None, allow_none=True, help="LR suggested by the last range test.")

    @classmethod
    def build(cls, host: PanelHost) -> LRPanel:
        panel = cls(host.session, host.guard, host.refresh, is_running=lambda: host.running)
        panel.remember_lrs()
        return panel

    def __init__(
        self,
        session: Any,
        guard: Callable[[str], Callable],
        on_change: Callable[[], None],
        *,
        is_running: Callable[[], bool] = lambda: False,
        **kwargs: Any,
    ) -> None:
        self.session = session
        self._guard = guard
        self._on_change = on_change
        self._is_running = is_running
        self._updating = False
        self.sliders: list[widgets.FloatLogSlider] = []
        self.infos: list[widgets.HTML] = []
        self.slider_box = widgets.VBox()
        self.range_button = widgets.Button(
            description="LR range test",
            icon="search",
            layout=widgets.Layout(width="auto"),
            tooltip="Train briefly with an exponentially growing LR; weights are restored afterwards",
        )
        self.range_button.add_class("tlw-lr-range")
        self.range_button.on_click(guard("LR range test")(lambda _b: self.range_test()))
        self.apply_button = widgets.Button(
            description="apply suggestion", icon="check", disabled=True, layout=widgets.Layout(width="auto")
        )
        self.apply_button.add_class("tlw-lr-apply")
        self.apply_button.on_click(guard("apply LR suggestion")(lambda _b: self.apply_suggestion()))
        self.message = widgets.HTML()
        self.message.add_class("tlw-lr-message")
        self.x = bq.LogScale()
        self.y = bq.LinearScale()
        self.curve = bq.Lines(
            x=np.zeros(0),
            y=np.zeros((1, 0)),
            scales={"x": self.x, "y": self.y},
            colors=["#9ecae1", "#08519c"],
            labels=["loss", "smoothed"],
            display_legend=True,
        )
        self.pick = bq.Lines(
            x=np.zeros(0),
            y=np.zeros(0),
            scales={"x": self.x, "y": self.y},
            colors=["#e6550d"],
            line_style="dashed",
            labels=["suggested LR"],
            display_legend=True,
        )
        self.x_axis = bq.Axis(scale=self.x, label="learning rate", tick_format=".0e", grid_lines="none")
        self.y_axis = bq.Axis(scale=self.y, side="left", label="loss", grid_lines="dashed")
        self.figure = bq.Figure(
            marks=[self.curve, self.pick],
            axes=[self.x_axis, self.y_axis],
            fig_margin=dict(MARGIN),
            layout=widgets.Layout(width="100%", height="220px", min_width=f"{FIGURE_MIN_WIDTH}px"),
            animation_duration=0,
            display_toolbar=False,
            # The range test's loss is flat, then climbs at the high LRs (right): top left stays clear.
            legend_location="top-left",
            legend_text={"font-size": "10px"},
        )
        self.figure.add_class("tlw-lr-figure")
        self.figure_box = widgets.VBox()  # the plot joins after the first test (see HeatmapPanel)
        super().__init__(
            children=[
                self.slider_box,
                widgets.HBox(
                    [self.range_button, self.apply_button, self.message],
                    layout=widgets.Layout(align_items="center"),
                ),
                self.figure_box,
            ],
            **kwargs,
        )
        self.add_class("tlw-lr-panel")
        self._build()

    # -- sliders ------------------------------------------------------------------------------
    def _build(self) -> None:
        groups = self.session.optimizer.param_groups
        self.sliders, self.infos, rows = [], [], []
        for i, g in enumerate(groups):
            lr = float(g["lr"])
            slider = widgets.FloatLogSlider(
                value=_clamp(lr),
                base=10,
                min=LOG_MIN,
                max=LOG_MAX,
                step=0.05,
                description=f"group {i}",
                readout_format=".2e",
                continuous_update=False,
                layout=widgets.Layout(width="420px"),
            )
            slider.add_class("tlw-lr")
            slider.add_class(f"tlw-lr-group-{i}")
            slider.observe(self._guard(f"LR slider group {i}")(self._moved(i)), names="value")
            info = widgets.HTML()
            self.sliders.append(slider)
            self.infos.append(info)
            rows.append(widgets.HBox([slider, info], layout=widgets.Layout(align_items="center")))
        self.slider_box.children = rows

    def _moved(self, group: int) -> Callable[[dict[str, Any]], None]:
        def on_change(change: dict[str, Any]) -> None:
            if self._updating:
                return
            self.session.set_lr(float(change["new"]), group=group)
            self.draw(self.session)
            self._on_change()

        return on_change

    def draw(self, session: Any) -> None:
        """Sliders follow the effective LRs (scheduler moves); rebuilt when groups were added."""
        groups = session.optimizer.param_groups
        if len(groups) != len(self.sliders):
            self._build()
        sched = getattr(session, "scheduler", None)
        bases = getattr(sched, "base_lrs", None) if sched is not None else None
        counts = [sum(p.numel() for p in g["params"]) for g in groups]
        owners = group_owners(session)
        self._updating = True
        try:
            for i, (g, slider, info) in enumerate(zip(groups, self.sliders, self.infos)):
                lr = float(g["lr"])
                if not math.isclose(slider.value, _clamp(lr), rel_tol=1e-9):
                    slider.value = _clamp(lr)
                text = f"<small>effective <b>{lr:.3e}</b>"
                if isinstance(bases, list) and i < len(bases):
                    text += f" · schedule base {float(bases[i]):.2e} ({type(sched).__name__})"
                text += f" · {counts[i]:,} params"
                names, stale = owners[i]
                if names:
                    text += f" · {html.escape(names)}"
                if stale:
                    # A layer replaced after the optimizer was built: its old tensors are still updated.
                    why = "tensors the model no longer holds (a layer replaced after the optimizer was built)"
                    stale_text = f"{stale:,} of them not in the model"
                    text += f" · <span class='tlw-lr-stale' title='{why}'>{stale_text}</span>"
                text += "</small>"
                if info.value != text:
                    info.value = text
        finally:
            self._updating = False
        self.range_button.disabled = self._is_running() or getattr(session, "kind", "") != "runner"

    # -- range test ---------------------------------------------------------------------------
    def range_test(self, **options: Any) -> Any:
        """Run the LR range test on the session (a Runner) and plot it; returns its result."""
        if self._is_running():
            self.message.value = "<small>pause the run first</small>"
            return None
        try:
            from tlwidgets.diagnostics.checks import lr_range_test
        except ImportError as exc:
            self.message.value = (
                f"<small>the LR range test is not available in this install "
                f"(tlwidgets.diagnostics.checks.lr_range_test: {html.escape(str(exc))})</small>"
            )
            return None
        self.message.value = "<small>running the LR range test…</small>"
        result = lr_range_test(self.session, **options)
        lrs = np.asarray(result.lrs, dtype=np.float64)
        losses = np.asarray(result.losses, dtype=np.float64)
        losses = np.where(np.isfinite(losses), losses, np.nan)
        suggestion = getattr(result, "suggestion", None)
        self.suggestion = float(suggestion) if suggestion is not None and math.isfinite(suggestion) else None
        smoothed = getattr(result, "smoothed", None)
        if smoothed is not None and len(smoothed) == len(lrs):
            smoothed = np.asarray(smoothed, dtype=np.float64)
            y = np.vstack([losses, np.where(np.isfinite(smoothed), smoothed, np.nan)])
        else:
            y = losses[None, :]
        with self.curve.hold_sync():
            self.curve.x, self.curve.y = lrs, y
            self.curve.labels = ["loss", "smoothed"][: len(y)]
        positive = lrs[np.isfinite(lrs) & (lrs > 0)]
        if positive.size:
            # d3 labels every 2 ... 9 between powers of ten on a log axis: "1e-5" labels need
            # their own width and a gap between them.
            spacing = label_width("1e-5") + MIN_GAP_PX
            ticks = log_ticks(
                float(positive.min()), float(positive.max()), PLOT_MIN_WIDTH, min_spacing_px=spacing
            )
            self.x_axis.tick_values = np.array(ticks)
        finite = losses[np.isfinite(losses)]
        with self.pick.hold_sync():
            if self.suggestion is not None and finite.size:
                self.pick.x = np.array([self.suggestion, self.suggestion])
                self.pick.y = np.array([finite.min(), finite.max()])
            else:
                self.pick.x, self.pick.y = np.zeros(0), np.zeros(0)
        if not self.figure_box.children:
            self.figure_box.children = [self.figure]
        self.apply_button.disabled = self.suggestion is None
        if self.suggestion is not None:
            self.apply_button.description = f"apply {self.suggestion:.2e}"
            self.message.value = (
                f"<small>suggested LR <b>{self.suggestion:.2e}</b> (weights restored)</small>"
            )
        else:
            self.message.value = "<small>no suggestion: the loss did not decrease over the range</small>"
        self._on_change()
        return result

    def apply_suggestion(self) -> None:
        """Set group 0 to the suggested LR; other groups keep their ratio to group 0."""
        if self.suggestion is None:
            return
        groups = self.session.optimizer.param_groups
        base = float(groups[0]["lr"])
        for i in range(len(groups)):
            ratio = float(groups[i]["lr"]) / base if base > 0 and i else 1.0
            self.session.set_lr(self.suggestion * ratio, group=i)
        self.draw(self.session)
        self._on_change()


def _clamp(lr: float) -> float:
    return float(min(max(lr, 10**LOG_MIN), 10**LOG_MAX))


def group_owners(session: Any) -> list[tuple[str, int]]:
    """Per optimizer group: the model's top-level modules whose parameters it holds (``"backbone,
    head"``; ``"-"`` for none) and how many of its elements belong to no parameter of the model."""
    name_of = {id(p): n for n, p in session.named_params}
    out = []
    for g in session.optimizer.param_groups:
        tops: dict[str, int] = {}
        stale = 0
        for p in g["params"]:
            n = name_of.get(id(p))
            if n is None:
                stale += p.numel()
            else:
                top = n.split(".")[0] if "." in n else "<model>"
                tops[top] = tops.get(top, 0) + 1
        names = ", ".join(tops) if len(tops) <= 4 else ", ".join(list(tops)[:4]) + f" +{len(tops) - 4}"
        out.append((names, stale))
    return out
