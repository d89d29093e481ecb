"""The plots read like TensorBoard's or W&B's (#16 points 4-7), asserted on widget state.

Heatmap: empty / frozen / measured cells are distinct states with distinct fills (the
fills worked out as the browser's colour scale does), a parameter frozen and later
unfrozen stays grey at the steps it was frozen, colours follow the LR rules' band, a
hover fills the tooltip with parameter, step, value and state, step labels never touch.
Loss: a legend names every series, one step shows its point on a sane axis, no
fractional steps, control labels merged instead of piled up, a huge validation point
does not flatten the training curve, log ticks do not crowd. LR: axes labelled, series named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_batches, make_data, one_thread  # noqa: F401
from torch import nn

import tlwidgets as tlw
from tlwidgets.diagnostics.rules.trend import update_ratio_band
from tlwidgets.ui import heatmap as hm
from tlwidgets.ui import loss as lossmod
from tlwidgets.ui.ticks import CHAR_EM, LINE_EM, label_extents, overlapping

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _runner(lr: float = 0.1, **options) -> tlw.Runner:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    options.setdefault("auto_checkpoints", 0)
    return tlw.Runner(model, nn.CrossEntropyLoss(), opt, make_batches(n_batches=4), **options)


@pytest.fixture
def runner():
    r = _runner()
    yield r
    r.close()


@pytest.fixture
def dash(runner):
    d = tlw.Dashboard(runner)
    yield d
    d.close()


def _hex(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i : i + 2], 16) for i in (1, 3, 5))


def browser_fills(panel: hm.HeatmapPanel) -> np.ndarray:
    """The fill of every cell as the browser computes it: bqplot's ColorScale spaces its colours
    evenly over [min, max] and interpolates linearly in RGB between neighbours."""
    scale = panel.color_scale
    colors = [_hex(c) for c in scale.colors]
    domain = np.linspace(scale.min, scale.max, len(colors))
    out = np.empty(panel.grid.color.shape, dtype=object)
    for idx, v in np.ndenumerate(panel.grid.color):
        v = min(max(v, scale.min), scale.max)
        j = min(int(np.searchsorted(domain, v, side="right")) - 1, len(colors) - 2)
        t = (v - domain[j]) / (domain[j + 1] - domain[j])
        out[idx] = tuple(round(a + (b - a) * t) for a, b in zip(colors[j], colors[j + 1]))
    return out


# ----------------------------------------------------------------------------------- heatmap
def test_before_the_first_step_every_cell_is_empty_not_frozen(dash):
    h = dash.heatmap
    dash.refresh()
    assert (h.states == "empty").all()
    assert (h.grid.color == h.state_values["empty"]).all()
    assert {f for f in browser_fills(h).ravel()} == {_hex(hm.EMPTY_COLOR)}
    assert "no steps yet" in h.title.value
    assert "no data yet" in h.legend.value and "frozen" in h.legend.value


def test_empty_frozen_and_measured_cells_have_distinct_fills(dash, runner):
    runner.freeze("2")
    runner.step()
    dash.refresh()
    h = dash.heatmap
    states, fills = h.states, browser_fills(h)
    assert {"empty", "frozen", "measured"} == set(states.ravel())  # column 2: no step 2 yet
    by_state = {s: {f for f in fills[states == s]} for s in hm.STATES}
    assert by_state["empty"] == {_hex(hm.EMPTY_COLOR)}
    assert by_state["frozen"] == {_hex(hm.FROZEN_COLOR)}
    assert not by_state["measured"] & (by_state["empty"] | by_state["frozen"])
    assert len({hm.EMPTY_COLOR, hm.FROZEN_COLOR}) == 2 and hm.STATE_COLORS["frozen"] == hm.FROZEN_COLOR
    # no measured colour anywhere on the key is white or the frozen grey
    key = h.key
    measured = {key.color_at(key.lo + i * (key.hi - key.lo) / 200) for i in range(201)}
    assert not measured & {hm.EMPTY_COLOR, hm.FROZEN_COLOR}


def test_a_parameter_frozen_then_unfrozen_stays_grey_at_the_steps_it_was_frozen(runner):
    runner.freeze("0")  # the first Linear, through the runner's controls
    runner.run(steps=21)
    runner.unfreeze("0")
    runner.run(steps=9)
    d = tlw.Dashboard(runner)
    try:
        d.refresh()
        h = d.heatmap
        rows = [runner.param_names.index("0.weight"), runner.param_names.index("0.bias")]
        steps = np.asarray(h.grid.column)
        assert steps[0] == 1 and steps[-1] == 30
        frozen_cols = steps <= 21
        assert (h.states[np.ix_(rows, np.flatnonzero(frozen_cols))] == "frozen").all()
        assert (h.states[np.ix_(rows, np.flatnonzero(~frozen_cols))] == "measured").all()
        assert (h.grid.color[np.ix_(rows, np.flatnonzero(frozen_cols))] == h.state_values["frozen"]).all()
        fills = browser_fills(h)
        assert all(
            f == _hex(hm.FROZEN_COLOR) for f in fills[np.ix_(rows, np.flatnonzero(frozen_cols))].ravel()
        )
        # (the old heatmap painted these dark blue: an update of 0 in the coldest colour)
        assert all(
            f != _hex(hm.FROZEN_COLOR) for f in fills[np.ix_(rows, np.flatnonzero(~frozen_cols))].ravel()
        )
        # the layer never frozen is measured at every step
        other = runner.param_names.index("2.weight")
        assert (h.states[other] == "measured").all()
        assert not any(t.startswith("❄") for t in h.row_axis.tick_labels.values())
    finally:
        d.close()


def test_a_parameter_never_frozen_without_gradient_is_measured_not_frozen():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _model()
            self.spare = nn.Linear(3, 3)  # never called: no gradient, never frozen

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Unused()
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.1),
        make_batches(),
        auto_checkpoints=0,
    )
    d = tlw.Dashboard(r)
    try:
        r.run(steps=3)
        d.refresh()
        row = r.param_names.index("spare.weight")
        assert (d.heatmap.states[row, :3] == "measured").all()
        assert (d.heatmap.grid.color[row, :3] == d.heatmap.key.lo).all()  # an update of 0: coldest
    finally:
        d.close()
        r.close()


def test_colours_follow_the_band_the_lr_rules_use(dash, runner):
    band = update_ratio_band(runner.optimizer)
    key = dash.heatmap.key
    assert key.band == pytest.approx((math.log10(band.low), math.log10(band.high)))
    greens = {key.color_at(v) for v in np.linspace(key.band[0] + 0.01, key.band[1] - 0.01, 20)}
    assert all(_hex(c)[1] > _hex(c)[0] and _hex(c)[1] > _hex(c)[2] for c in greens)  # green inside
    above = _hex(key.color_at(key.band[1] + 0.05))
    below = _hex(key.color_at(key.band[0] - 0.05))
    assert above[0] > above[2] and below[2] > below[0]  # warm above, cold below
    # Between the band and `extreme` the rules name the LR only when the loss misbehaves: yellow to
    # orange, never the red of "too high whatever the loss does".
    fast = _hex(key.color_at((key.band[1] + math.log10(band.extreme)) / 2))
    red = _hex(key.color_at(math.log10(band.extreme) + 0.05))
    assert fast[1] > 120 and red[1] < 80
    legend = dash.heatmap.legend.value
    assert "tlw-legend-band" in legend and "healthy 3e-5–5e-2" in legend and "tlw-legend-fast" in legend
    # A healthy run (no findings): its weights are green, its head bias at most "fast", nothing red.
    r = _runner(lr=0.05)
    d = tlw.Dashboard(r)
    try:
        r.run(steps=20)
        d.refresh()
        assert not r.findings_with("lr-too-high") and not r.findings_with("lr-too-low")
        h = d.heatmap
        for name in ("0.weight", "0.bias", "2.weight"):
            logs = np.log10(h.values[r.param_names.index(name)])
            assert ((logs >= key.band[0]) & (logs <= key.band[1])).mean() > 0.9, name
        assert (h.values[h.states == "measured"] < band.extreme).all()
        assert all(f[1] > 80 for f in browser_fills(h)[h.states == "measured"])  # no red cell
    finally:
        d.close()
        r.close()


def test_hover_shows_parameter_step_value_and_state(dash, runner):
    h = dash.heatmap
    assert h.grid.tooltip is h.cell_tooltip and h.grid.interactions.get("hover") == "tooltip"
    assert "tlw-heatmap-tooltip" in h.cell_tooltip._dom_classes
    runner.freeze("2")
    runner.run(steps=3)
    dash.refresh()
    row = runner.param_names.index("0.weight")
    # what a hover over a cell sends from the browser
    h.grid._handle_custom_msgs(
        None, {"event": "hover", "data": {"rowNum": row, "columnNum": 2, "color": -2.0}}
    )
    text = h.cell_tooltip.value
    value = h.values[row, 2]
    assert "0.weight" in text and "step 3" in text and "measured" in text and f"{value:.2e}" in text
    d = h.describe(row, 2)
    assert tuple(d) == hm.TOOLTIP_FIELDS
    assert d["state"] == "measured" and d["step"] == "3" and "inside the healthy band" in d["value"]
    frozen_row = runner.param_names.index("2.bias")
    assert h.describe(frozen_row, 0)["state"] == "frozen"
    h.hover(frozen_row, 0)
    assert "frozen" in h.cell_tooltip.value


def _heatmap_label_extents(h: hm.HeatmapPanel) -> tuple[list[int], list[tuple[float, float]]]:
    steps = [int(s) for s in h.grid.column]
    labelled = [s for s in steps if h.col_axis.tick_labels.get(str(s))]
    band = hm.PLOT_MIN_WIDTH / len(steps)
    positions = [(steps.index(s) + 0.5) * band for s in labelled]
    return labelled, label_extents(positions, [str(s) for s in labelled], hm.TICK_FONT_PX)


def test_heatmap_step_labels_never_touch_and_the_title_says_which_steps(dash, runner):
    runner.run(steps=57)
    dash.refresh()
    h = dash.heatmap
    labelled, extents = _heatmap_label_extents(h)
    assert len(labelled) >= 3 and not overlapping(extents)
    assert "steps 8–57" in h.title.value


def test_sparse_measurement_labels_measured_steps_and_titles_them():
    r = _runner(measure_every=5, dense_steps=10)
    d = tlw.Dashboard(r)
    try:
        r.run(steps=300)
        d.refresh()
        h = d.heatmap
        steps = [int(s) for s in h.grid.column]
        assert len(steps) == 50 and {b - a for a, b in zip(steps, steps[1:])} == {5}
        labelled, extents = _heatmap_label_extents(h)
        assert set(labelled) <= set(steps) and not overlapping(extents)
        assert f"last 50 measured steps ({steps[0]}–{steps[-1]}, every 5th)" in h.title.value
        assert "last 50 steps" not in h.title.value
    finally:
        d.close()
        r.close()


# ----------------------------------------------------------------------------------- loss
def test_the_loss_legend_names_every_series(runner):
    model = runner.model
    x, y = make_data(16)
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        runner.optimizer,
        make_batches(n_batches=4),
        val_data=[(x, y)],
        auto_checkpoints=0,
    )
    d = tlw.Dashboard(r)
    try:
        r.run(steps=8)  # two epochs: two validation points
        d.refresh()
        loss = d.loss
        assert loss.figure.legend_location
        named = {m.labels[0]: m for m in (loss.raw, loss.smooth, loss.val)}
        assert named["train loss"].display_legend and loss.raw.display_legend
        assert loss.smooth.display_legend and loss.smooth.labels == ["smoothed"]
        assert loss.val.display_legend and loss.val.labels == ["validation"]
        assert not loss.branches.display_legend  # (no rewind: no abandoned timeline to name)
        assert loss.figure.legend_location == "top-right"
    finally:
        d.close()
        r.close()


def test_one_step_shows_its_point_on_an_integer_axis(dash, runner):
    runner.step()
    dash.refresh()
    loss = dash.loss
    assert list(loss.raw.x) == [1.0] and loss.raw.marker == "circle"
    assert loss.x.min < 1 < loss.x.max
    assert list(loss.x_axis.tick_values) == [0.0, 1.0, 2.0]
    assert loss.y.min < loss.raw.y[0] < loss.y.max


@pytest.mark.parametrize("steps", [2, 3, 5, 17, 120])
def test_step_ticks_are_integers_whose_labels_do_not_touch(runner, steps):
    d = tlw.Dashboard(runner)
    try:
        runner.run(steps=steps)
        d.refresh()
        loss = d.loss
        ticks = list(loss.x_axis.tick_values)
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert loss.x_axis.tick_format == "d"
        lo, hi = loss.x.min, loss.x.max
        positions = [(t - lo) / (hi - lo) * lossmod.PLOT_MIN_WIDTH for t in ticks]
        assert not overlapping(label_extents(positions, [str(int(t)) for t in ticks], lossmod.TICK_FONT_PX))
        assert loss.raw.marker == ("circle" if steps <= lossmod.MARKERS_UNTIL else None)
        # the heatmap's history figure too, once a parameter is selected
        d.heatmap.select("0.weight")
        hist_ticks = list(d.heatmap.history_x_axis.tick_values)
        assert hist_ticks and all(float(t).is_integer() for t in hist_ticks)
    finally:
        d.close()


def test_control_labels_at_one_step_are_merged_and_close_ones_do_not_pile_up(dash, runner):
    runner.step()
    runner.freeze("0")
    runner.set_lr(0.05)
    runner.unfreeze("0")
    runner.step()
    runner.set_lr(0.02)  # one step later: too close to label apart on a two-step axis
    runner.run(steps=40)
    runner.set_lr(0.01)
    runner.step()
    dash.refresh()
    loss = dash.loss
    texts = list(loss.marker_labels.text)
    xs = list(np.atleast_1d(loss.marker_labels.x))
    assert len(texts) == len(xs) == 2
    assert "(+3 more)" in texts[0]  # the step-1 controls merged into the step-2 label
    assert texts[1] == "set_lr 0.01"
    max_chars = int((lossmod.PLOT_HEIGHT - 8) / (CHAR_EM * lossmod.MARKER_FONT_PX))
    assert all(len(t) <= max_chars for t in texts)
    # labels (rotated: one text line wide) are at least a line apart at the figure's least width
    per_px = lossmod.PLOT_MIN_WIDTH / (loss.x.max - loss.x.min)
    assert (xs[1] - xs[0]) * per_px >= LINE_EM * lossmod.MARKER_FONT_PX
    # every control step keeps its line
    assert sorted(np.asarray(loss.markers.x)[:, 0].tolist()) == [1.0, 2.0, 42.0]
    # the full text is in the marker heads, shown on hover
    names = list(loss.marker_heads.names)
    assert "freeze 0" in names[0] and "unfreeze 0" in names[0] and "set_lr 0.02" in names[0]
    assert loss.marker_heads.tooltip.fields == ["name"]
    assert loss.marker_heads.interactions == {"hover": "tooltip"}


def test_a_huge_validation_point_does_not_flatten_the_training_curve(runner):
    x, y = make_data(16)
    r = tlw.Runner(
        runner.model,
        nn.CrossEntropyLoss(),
        runner.optimizer,
        make_batches(n_batches=4),
        val_data=[(x * 1e4, y)],  # unnormalized validation inputs: a validation loss in the thousands
        auto_checkpoints=0,
    )
    d = tlw.Dashboard(r)
    try:
        r.run(steps=5)  # the epoch (4 batches) ends at the fifth step's fetch: one validation point
        d.refresh()
        loss = d.loss
        val = r.history.val_loss[0, 1]
        train = r.history.loss
        assert val > 50 * train.max()
        assert loss.y.max < 3 * train.max()  # the training curve keeps the plot
        assert loss.val.y[0] <= loss.y.max  # the point sits on the top edge ...
        assert list(loss.off_scale.text) == [f"↑ {val:.4g}"]  # ... labelled with its value
        assert lossmod.robust_range(np.array([1.0, 2.0]), np.array([2.5]))[:2] == (1.0, 2.5)  # near: kept
    finally:
        d.close()
        r.close()


def test_log_y_ticks_do_not_crowd(runner):
    r = _runner(lr=0.5)
    d = tlw.Dashboard(r)
    try:
        r.run(steps=60)
        d.loss.log_y.value = True
        d.refresh()
        loss = d.loss
        ticks = list(loss.y_axis.tick_values)
        assert len(ticks) >= 2
        lo, hi = math.log10(loss.y.min), math.log10(loss.y.max)
        pos = [(math.log10(t) - lo) / (hi - lo) * lossmod.PLOT_HEIGHT for t in ticks]
        assert min(b - a for a, b in zip(pos, pos[1:])) >= 2 * LINE_EM * lossmod.TICK_FONT_PX * 0.9
    finally:
        d.close()
        r.close()


# ----------------------------------------------------------------------------------- LR panel
def test_lr_plot_has_axis_labels_and_named_series(dash, runner, monkeypatch):
    import sys
    import types

    lr = dash.lr
    assert lr.x_axis.label == "learning rate" and lr.y_axis.label == "loss"
    assert lr.curve.display_legend and lr.pick.display_legend and lr.pick.labels == ["suggested LR"]
    lrs = np.logspace(-7, 1, 40)

    def fake_range_test(session, **options):
        return types.SimpleNamespace(
            lrs=lrs, losses=np.linspace(2.0, 1.0, 40), smoothed=np.linspace(2.0, 1.0, 40), suggestion=1e-3
        )

    module = types.ModuleType("tlwidgets.diagnostics.checks")
    module.lr_range_test = fake_range_test
    monkeypatch.setitem(sys.modules, "tlwidgets.diagnostics.checks", module)
    lr.range_test()
    assert lr.curve.labels == ["loss", "smoothed"]
    ticks = list(lr.x_axis.tick_values)
    assert len(ticks) >= 3 and all(math.log10(t).is_integer() for t in ticks)


def test_a_legend_too_wide_for_the_right_edge_starts_from_the_left():
    # bqplot's box is 16 px per character from the right edge: a branch label of 40 characters
    # would start it left of the plot
    assert lossmod.legend_location(["train loss", "smoothed", "validation"]) == "top-right"
    assert lossmod.legend_location(["before: Rewind to step 0 and set lr=0.044"]) == "bottom-left"
    r = _runner(lr=0.5)
    d = tlw.Dashboard(r)
    try:
        start = r.checkpoint("start")
        r.set_lr(100.0)  # the abandoned run: far too high an LR, the loss explodes
        r.run(steps=6)
        r.rewind(start, reason="Rewind to step 0 and set lr=0.05")
        r.set_lr(0.05)
        r.run(steps=3)
        d.refresh()
        assert d.loss.branches.display_legend
        assert d.loss.figure.legend_location == "bottom-left"
        # the abandoned run blew up: it leaves the plot at the top instead of flattening this run
        branch = np.asarray(d.loss.branches.y, dtype=float)
        assert np.nanmax(branch) > 10 * d.loss.y.max >= np.nanmax(d.loss.raw.y)
    finally:
        d.close()
        r.close()
