"""Widget tests of tlw.Dashboard without a browser: clicks, slider values and toggles drive the runner.

ipywidgets catches exceptions raised in button callbacks and only logs "Exception in callback";
the dashboard itself reports exceptions in its error area (and logs them on ``tlwidgets.ui``). The
autouse ``callback_errors`` fixture fails a test on either kind of record unless the test takes
them explicitly, so no exception can pass silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import tlwidgets as tlw
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.events import Event
from tlwidgets.core.plugins import NullDiagnoser
from tlwidgets.core.records import StepSummary
from tlwidgets.core.stages import Stage

torch.set_num_threads(1)

CONTRACT_CLASSES = [
    "tlw-dashboard",
    "tlw-step-stage",
    "tlw-step",
    "tlw-run",
    "tlw-pause",
    "tlw-stage",
    "tlw-stage-current",
    "tlw-heatmap",
    "tlw-loss",
    "tlw-freeze",
    "tlw-lr",
    "tlw-findings",
    "tlw-status",
]


# --------------------------------------------------------------------------- fixtures and helpers


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class CallbackErrors:
    """Log records that mean an exception happened in a widget callback or a dashboard run."""

    def __init__(self, collector: _Collector) -> None:
        self._collector = collector

    def bad(self) -> list[logging.LogRecord]:
        out, seen = [], set()
        for r in self._collector.records:
            swallowed = "Exception in callback" in r.getMessage()
            ours = r.name.startswith("tlwidgets") and r.levelno >= logging.ERROR
            if (swallowed or ours) and id(r) not in seen:
                seen.add(id(r))
                out.append(r)
        return out

    def take(self) -> list[str]:
        """Return the messages of the bad records so far and forget them (the test expected them)."""
        bad = self.bad()
        ids = {id(r) for r in bad}
        self._collector.records = [r for r in self._collector.records if id(r) not in ids]
        return [r.getMessage() for r in bad]


@pytest.fixture(autouse=True)
def callback_errors():
    collector = _Collector()
    loggers = [logging.getLogger(), logging.getLogger("traitlets"), logging.getLogger("tlwidgets")]
    for lg in loggers:
        lg.addHandler(collector)
    errors = CallbackErrors(collector)
    try:
        yield errors
    finally:
        for lg in loggers:
            lg.removeHandler(collector)
    bad = errors.bad()
    if bad:
        pytest.fail(
            "exception(s) in widget callbacks or dashboard runs:\n"
            + "\n".join(f"{r.name}: {r.getMessage()}" for r in bad),
            pytrace=False,
        )


def make_data(n: int = 128, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def make_runner(**kwargs) -> tlw.Runner:
    model = kwargs.pop("model", None) or make_model()
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = kwargs.pop("data", None) or make_data()
    return tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, **kwargs)


@pytest.fixture
def runner():
    r = make_runner(val_data=make_data(32, seed=1))
    yield r
    r.close()


@pytest.fixture
def dash(runner):
    d = tlw.Dashboard(runner)
    yield d
    d.close()


def all_widgets(root) -> list:
    out, stack = [], [root]
    while stack:
        w = stack.pop()
        out.append(w)
        stack.extend(getattr(w, "children", ()) or ())
    return out


def with_class(root, css: str) -> list:
    return [w for w in all_widgets(root) if css in getattr(w, "_dom_classes", ())]


def current_chip(d) -> str:
    chips = [s.value for s, c in d.pipeline.chips.items() if "tlw-stage-current" in c._dom_classes]
    assert len(chips) == 1, chips
    return chips[0]


# --------------------------------------------------------------------------- the fixture itself


def test_swallowed_callback_exception_is_detected(callback_errors):
    import ipywidgets as widgets

    button = widgets.Button()

    def broken(_b):
        raise ZeroDivisionError("boom")

    button.on_click(broken)
    button.click()  # ipywidgets catches this and only logs it
    messages = callback_errors.take()
    assert any("Exception in callback" in m and "boom" in m for m in messages), messages


# --------------------------------------------------------------------------- structure


def test_contract_css_classes_present(dash, runner):
    for css in CONTRACT_CLASSES:
        assert with_class(dash, css), f"no widget with class {css}"
    assert len(with_class(dash, "tlw-stage")) == 7
    assert len(with_class(dash, "tlw-stage-current")) == 1
    # one freeze toggle per module holding parameters, one LR slider per optimizer group
    assert len(with_class(dash, "tlw-freeze")) == 3
    assert len(with_class(dash, "tlw-lr")) == len(runner.optimizer.param_groups)
    # the panels are public attributes
    for name in ("controls", "status", "pipeline", "heatmap", "loss", "freeze", "lr", "findings", "errors"):
        assert getattr(dash, name) is not None


def test_dashboard_rejects_other_objects():
    with pytest.raises(TypeError, match="Runner"):
        tlw.Dashboard(object())


def test_chips_are_in_stage_order(dash):
    labels = [c.description.split()[1] for c in dash.pipeline.chips.values()]
    assert labels == [s.value for s in Stage.ordered()]


# --------------------------------------------------------------------------- stepping


def test_step_stage_click_advances_stage_and_moves_current_chip(dash, runner):
    assert current_chip(dash) == "fetch"
    seen = []
    for expected in ["zero_grad", "to_device", "forward", "loss", "backward", "step", "fetch"]:
        dash.controls.step_stage_button.click()
        assert runner.stage.value == expected
        assert current_chip(dash) == expected
        seen.append(runner.stage.value)
    assert runner.global_step == 1
    # after a complete step every chip is marked ok
    for chip in dash.pipeline.chips.values():
        assert "tlw-stage-ok" in chip._dom_classes
        assert chip.button_style == "success"


def test_step_click_advances_global_step_and_status(dash, runner):
    dash.controls.step_button.click()
    dash.controls.step_button.click()
    assert runner.global_step == 2
    assert dash.status.text.startswith("step 2 · epoch 0 · next: fetch")
    assert "step 2" in dash.status.value
    # the heatmap and loss show both steps
    assert list(dash.loss.raw.x) == [1.0, 2.0]
    np.testing.assert_allclose(dash.loss.raw.y, runner.history.loss)
    assert dash.heatmap.grid.color.shape == (len(runner.param_names), 2)


def test_run_n_steps_synchronously(dash, runner):
    dash.controls.mode.value = "steps"
    dash.controls.steps.value = 12
    dash.controls.run_button.click()
    assert runner.global_step == 12
    assert dash.last_result.stopped_by == "steps"
    assert not dash.running and not dash.controls.run_button.disabled
    assert "step 12" in dash.status.text
    assert "stopped by steps" in dash.controls.message.value


def test_run_one_epoch(dash, runner):
    dash.controls.mode.value = "epoch"
    dash.controls.run_button.click()
    assert runner.epoch == 1
    assert runner.global_step == 8  # 128 examples / 16 per batch
    assert dash.last_result.stopped_by == "epochs"
    assert len(dash.loss.val.x) == 1  # one validation point
    assert dash.loss.val.y[0] == pytest.approx(runner.history.val_loss[0, 1])


class _FindingAt(NullDiagnoser):
    """A rule set that reports one warning after a given step (independent of the real rules)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, session):
        if session.global_step >= self.at:
            return [
                make_finding("loss-plateau", "test finding", step=session.global_step, severity="warning")
            ]
        return []


def test_run_until_a_finding_stops_there(callback_errors):
    r = make_runner(diagnoser=_FindingAt(7))
    d = tlw.Dashboard(r)
    try:
        d.controls.mode.value = "finding"
        d.controls.steps.value = 50
        d.controls.run_button.click()
        assert r.global_step == 7
        assert d.last_result.stopped_by == "pause"
        assert "loss-plateau" in d.controls.message.value
        assert d.findings.count == 1
    finally:
        d.close()
        r.close()


def test_pause_during_an_async_run_stops_it(dash, runner):
    async def main():
        dash.controls.mode.value = "steps"
        dash.controls.steps.value = 100_000
        task = dash.run()
        assert isinstance(task, asyncio.Task)
        assert dash.running and dash.controls.run_button.disabled and not dash.controls.pause_button.disabled
        while runner.global_step < 5:
            await asyncio.sleep(0)
        # the LR slider acts while the run goes on (between two stages)
        dash.lr.sliders[0].value = 0.01
        assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
        dash.controls.pause_button.click()
        paused_at = runner.global_step
        result = await task
        return paused_at, result

    paused_at, result = asyncio.run(main())
    assert result.stopped_by == "pause"
    assert runner.global_step - paused_at <= 1  # stopped at the next stage boundary
    assert not dash.running and not dash.controls.run_button.disabled
    assert dash.controls.pause_button.disabled
    assert "paused" in dash.status.text
    assert f"step {runner.global_step}" in dash.status.text
    assert any(c.kind == "set_lr" for c in runner.history.controls)


def test_one_run_at_a_time(dash, runner):
    async def main():
        dash.controls.steps.value = 100_000
        task = dash.run()
        second = dash.run()
        assert second is None
        assert "already in progress" in dash.controls.message.value
        await asyncio.sleep(0)
        dash.pause()
        return await task

    result = asyncio.run(main())
    assert result.stopped_by == "pause"


def test_exception_in_an_async_run_is_shown(dash, runner, callback_errors, monkeypatch):
    async def failing_run(**kwargs):
        await asyncio.sleep(0)
        raise RuntimeError("run exploded")

    monkeypatch.setattr(runner, "run_async", failing_run)

    async def main():
        task = dash.run()
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)  # let the done callback run

    asyncio.run(main())
    assert not dash.running
    assert dash.errors.count == 1
    assert "run exploded" in dash.errors.html.value
    assert any("run exploded" in m for m in callback_errors.take())


def test_exception_in_a_click_is_shown_not_swallowed(dash, runner, callback_errors, monkeypatch):
    def broken():
        raise ValueError("step broke")

    monkeypatch.setattr(runner, "step_stage", broken)
    dash.controls.step_stage_button.click()
    assert dash.errors.count == 1
    assert "step broke" in dash.errors.text
    assert dash.errors.layout.display is None  # visible
    messages = callback_errors.take()
    assert any("step broke" in m for m in messages)
    assert not any("Exception in callback" in m for m in messages)  # ours caught it first


def test_failing_stage_marks_chip_error_and_shows_the_finding(callback_errors):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)
            self.head = nn.Linear(3, 2)  # wrong input size

        def forward(self, x):
            return self.head(self.fc(x))

    model = Broken()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        for _ in range(4):
            d.controls.step_stage_button.click()
        assert r.stage is Stage.FORWARD  # stays at the failed stage
        chip = d.pipeline.chips[Stage.FORWARD]
        assert "tlw-stage-error" in chip._dom_classes and chip.button_style == "danger"
        assert "tlw-stage-current" in chip._dom_classes
        assert d.errors.count == 1 and "forward" in d.errors.text
        assert d.findings.count >= 1
        assert d.findings.finding(0).severity == "error"
        assert callback_errors.take()  # the stage error was logged as an error on purpose
    finally:
        d.close()
        r.close()


# --------------------------------------------------------------------------- LR


def test_lr_slider_calls_set_lr(dash, runner):
    slider = dash.lr.sliders[0]
    slider.value = 0.002
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
    # an edit from the front end goes through the same path
    slider.set_state({"value": 0.0003})
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.0003)
    kinds = [c.kind for c in runner.history.controls]
    assert kinds == ["set_lr", "set_lr"]
    assert "3.000e-04" in dash.lr.infos[0].value


def test_lr_slider_follows_the_scheduler_without_feedback(callback_errors):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, make_data(), scheduler=sched)
    d = tlw.Dashboard(r)
    try:
        d.run("epoch")
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
        assert d.lr.sliders[0].value == pytest.approx(0.05)
        assert not [c for c in r.history.controls if c.kind == "set_lr"]  # no feedback into set_lr
        assert "schedule base" in d.lr.infos[0].value
        # moving the slider rescales the schedule's base so the shape is kept
        d.lr.sliders[0].value = 0.02
        assert sched.base_lrs[0] == pytest.approx(0.04)
    finally:
        d.close()
        r.close()


def test_new_param_group_gets_a_slider(callback_errors):
    model = make_model()
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    for n, p in model.named_parameters():
        if n.startswith("4."):
            p.requires_grad_(False)
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(body, lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        assert len(d.lr.sliders) == 1
        d.freeze.toggles["4"].value = False  # unfreeze the head: the optimizer gains a group
        assert len(r.optimizer.param_groups) == 2
        assert len(d.lr.sliders) == 2
        assert len(with_class(d, "tlw-lr")) == 2
        d.lr.sliders[1].value = 0.001
        assert r.optimizer.param_groups[1]["lr"] == pytest.approx(0.001)
    finally:
        d.close()
        r.close()


def test_lr_range_test_plot_and_apply(dash, runner, monkeypatch):
    calls = []

    def fake_range_test(session, **options):
        calls.append(session)
        lrs = np.logspace(-5, 0, 20)
        return types.SimpleNamespace(lrs=lrs, losses=np.linspace(2.0, 1.0, 20), suggestion=3e-3)

    module = types.ModuleType("tlwidgets.diagnostics.checks")
    module.lr_range_test = fake_range_test
    monkeypatch.setitem(sys.modules, "tlwidgets.diagnostics.checks", module)
    dash.lr.range_button.click()
    assert calls == [runner]
    assert len(dash.lr.curve.x) == 20
    assert dash.lr.figure_box.children == (dash.lr.figure,)
    assert dash.lr.suggestion == pytest.approx(3e-3)
    assert not dash.lr.apply_button.disabled
    dash.lr.apply_button.click()
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert dash.lr.sliders[0].value == pytest.approx(3e-3)


def test_lr_range_test_missing_is_explained(dash, monkeypatch):
    monkeypatch.setitem(sys.modules, "tlwidgets.diagnostics.checks", None)  # import fails
    dash.lr.range_button.click()
    assert "not available" in dash.lr.message.value
    assert dash.lr.apply_button.disabled


# --------------------------------------------------------------------------- freeze


def test_freeze_toggle_changes_requires_grad_and_heatmap_row(dash, runner):
    dash.controls.step_button.click()
    toggle = dash.freeze.toggles["2"]
    assert toggle.description == "trainable"
    toggle.value = True  # click: freeze module "2"
    params = dict(runner.model.named_parameters())
    assert not params["2.weight"].requires_grad and not params["2.bias"].requires_grad
    assert params["0.weight"].requires_grad
    assert toggle.description == "frozen" and toggle.button_style == "info"
    rows = [runner.param_names.index("2.weight"), runner.param_names.index("2.bias")]
    values, _ = dash.heatmap.matrix(runner)
    assert np.isnan(values[rows]).all()  # frozen rows have no value ...
    grey = dash.heatmap.state_values["frozen"]
    assert (dash.heatmap.states[rows, 0] == "frozen").all()  # (column 1 pads: "empty", no step 2 yet)
    color = dash.heatmap.grid.color
    assert (color[rows, 0] == grey).all()  # ... and are painted with the grey stop
    assert color[runner.param_names.index("0.weight"), 0] > grey  # (column 1 pads: one step so far)
    assert dash.heatmap.row_axis.tick_labels[str(rows[0])].startswith("❄")
    # second click unfreezes
    toggle.set_state({"value": False})
    assert params["2.weight"].requires_grad and params["2.bias"].requires_grad
    assert toggle.description == "trainable"
    assert not dash.heatmap.row_axis.tick_labels[str(rows[0])].startswith("❄")
    kinds = [c.kind for c in runner.history.controls]
    assert kinds == ["freeze", "unfreeze"]
    # the loss plot marks both controls at the step they happened (one line and label for the step)
    assert list(dash.loss.markers.x) == [1.0, 1.0]  # (bqplot squeezes a single line to 1-D)
    assert list(dash.loss.marker_labels.text) == ["freeze 2 · unfreeze 2"]


def test_partly_frozen_module_shows_partly(dash, runner):
    runner.freeze("2.bias")
    dash.refresh()
    assert dash.freeze.states["2"] == "partly"
    assert dash.freeze.toggles["2"].button_style == "warning"
    dash.freeze.toggles["2"].value = True  # a click on "partly" freezes all of it
    assert not runner.model[2].weight.requires_grad


def test_unfreeze_next_block_goes_from_the_output_down(dash, runner):
    runner.freeze("")
    dash.refresh()
    assert all(s == "frozen" for s in dash.freeze.states.values())
    order = []
    for _ in range(3):
        before = set(runner.frozen())
        dash.freeze.next_button.click()
        thawed = before - set(runner.frozen())
        order.append(sorted({n.split(".")[0] for n in thawed}))
    assert order == [["4"], ["2"], ["0"]]
    assert dash.freeze.next_button.disabled  # nothing left to unfreeze


def test_blocks_split_a_dominant_backbone():
    from tlwidgets.ui.freeze import blocks

    model = nn.Sequential()
    model.add_module("stem", nn.Linear(4, 4))
    model.add_module("body", nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)]))
    model.add_module("head", nn.Linear(64, 2))
    names = [n for n, _ in model.named_parameters()]
    assert blocks(model, names) == ["stem", "body.0", "body.1", "body.2", "head"]


def test_freeze_bn_statistics_option():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        d.freeze.toggles["1"].value = True  # freeze the batch-norm layer's affine parameters
        assert model[1].training  # statistics still update: option off
        d.freeze.bn_stats.value = True
        assert not model[1].training and r.freeze_bn_stats
        d.freeze.bn_stats.value = False
        assert model[1].training
    finally:
        d.close()
        r.close()


def test_freeze_bn_statistics_option_goes_through_the_control_api():
    # The checkbox used to put layers in eval mode and release them by editing the session's
    # private state: no control event, no history row, no marker on the loss plot.
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        d.freeze.toggles["1"].value = True
        n = len(r.history.controls)
        d.freeze.bn_stats.value = True
        d.freeze.bn_stats.value = False
        changes = r.history.controls[n:]
        assert [(c.kind, c.detail["on"], c.detail["modules"]) for c in changes] == [
            ("bn_eval", True, ["1"]),
            ("bn_eval", False, ["1"]),
        ]
        assert r.bn_eval == () and model[1].training and not r.freeze_bn_stats
        r.set_bn_eval(True)  # set from code: the checkbox follows
        d.refresh()
        assert d.freeze.bn_stats.value is True
        assert len(r.history.controls) == n + 3  # following it did not record another change
    finally:
        d.close()
        r.close()


# --------------------------------------------------------------------------- findings and selection


def test_findings_panel_lists_a_head_missing_from_the_optimizer(callback_errors):
    model = make_model()
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(body, lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        assert d.findings.count >= 1
        f = d.findings.finding(0)
        assert f.code == "param-not-in-optimizer"
        assert "param-not-in-optimizer" in d.findings.list.children[0].children[0].value
        assert "4.weight" in f.params
        assert d.tabs.titles[0].startswith("Findings (")
        d.findings.select_button(0).click()
        assert d.selected_param == "4.weight"
        assert d.heatmap.selected_param == "4.weight"
        assert d.selected_step == f.step
        # the freeze panel shows the head is in no optimizer group
        assert "not in optimizer" in d.freeze.infos["4"].value
    finally:
        d.close()
        r.close()


def test_heatmap_click_selects_parameter_and_shows_history(dash, runner):
    for _ in range(3):
        dash.controls.step_button.click()
    row = runner.param_names.index("2.weight")
    # what a click on a cell sends from the browser
    dash.heatmap.grid._handle_custom_msgs(
        None, {"event": "element_click", "data": {"rowNum": row, "columnNum": 1, "color": -3.1}}
    )
    assert dash.selected_param == "2.weight"
    assert dash.selected_step == 2
    assert dash.heatmap.history_box.children == (dash.heatmap.history_figure,)
    assert dash.heatmap.history_box.layout.display is None
    np.testing.assert_allclose(dash.heatmap.history_lines.x, runner.history.step)
    np.testing.assert_allclose(dash.heatmap.history_lines.y[0], runner.history.update_ratio[:, row])
    assert "2.weight" in dash.heatmap.history_figure.title
    assert list(dash.loss.cursor.x) == [2.0, 2.0]
    assert dash.heatmap.grid.selected.tolist() == [[row, c] for c in range(3)]  # the row is outlined


def test_heatmap_values_are_log10_update_ratio_then_grad_norm(dash, runner):
    for _ in range(5):
        dash.controls.step_button.click()
    hist = runner.history
    naive = np.log10(hist.update_norm / hist.weight_norm).T
    np.testing.assert_allclose(dash.heatmap.matrix(runner)[0], naive, rtol=1e-6)
    np.testing.assert_allclose(dash.heatmap.grid.color, np.clip(naive, -7, 0), rtol=1e-6)
    np.testing.assert_array_equal(dash.heatmap.grid.column, hist.step)
    # colour stops: "empty" two below -7 and "frozen" one below, then -7 ... 0 (green at -3)
    assert dash.heatmap.color_scale.min == -9 and dash.heatmap.color_scale.max == 0
    assert dash.heatmap.key.color_at(-3.0) == "#65b472"
    dash.heatmap.switch.value = "grad_norm"
    grads = np.log10(hist.grad_norm).T
    np.testing.assert_allclose(dash.heatmap.matrix(runner)[0], grads, rtol=1e-6)
    lo, hi = dash.heatmap.domain
    assert lo <= np.percentile(grads, 1) and hi >= np.percentile(grads, 99)
    np.testing.assert_allclose(dash.heatmap.grid.color, np.clip(grads, lo, hi), rtol=1e-6)
    assert "gradient norm" in dash.heatmap.title.value
    assert "no grad" in dash.heatmap.legend.value and "healthy" not in dash.heatmap.legend.value
    dash.heatmap.switch.value = "update_ratio"
    assert dash.heatmap.domain == (-7.0, 0.0)
    legend = dash.heatmap.legend.value
    assert "frozen" in legend and "healthy 3e-5–5e-2" in legend and "1e-6" in legend


def test_heatmap_keeps_only_recent_steps(runner):
    d = tlw.Dashboard(runner, heatmap_steps=10)
    try:
        d.run("steps", 25)
        assert d.heatmap.grid.color.shape == (len(runner.param_names), 10)
        np.testing.assert_array_equal(d.heatmap.grid.column, np.arange(16, 26))
    finally:
        d.close()


def test_chip_click_shows_record_and_graph_view_marks_disconnected(callback_errors):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)
            self.unused = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x)

    model = Branchy()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), make_data())
    d = tlw.Dashboard(r)
    try:
        for _ in range(5):
            d.step_stage()
        d.pipeline.chips[Stage.FORWARD].click()
        assert d.pipeline.shown_stage == "forward"
        html = d.pipeline.record_view.value
        assert "activations" not in html or "module" in html
        assert "fc" in html and "(16, 2)" in html  # activation table and output shape
        d.pipeline.chips[Stage.FETCH].click()
        assert "(16, 8)" in d.pipeline.record_view.value and "float32" in d.pipeline.record_view.value
        d.pipeline.graph_button.value = True
        graph = d.pipeline.graph_view.value
        assert "unused.weight" in graph and "tlw-unreached" in graph
        assert "2 reached, 2 trainable but disconnected" in graph
    finally:
        d.close()
        r.close()


def test_step_stage_follows_the_open_record(dash, runner):
    dash.pipeline.chips[Stage.FETCH].click()
    dash.controls.step_stage_button.click()
    assert dash.pipeline.shown_stage == "fetch"  # the stage just run
    dash.controls.step_stage_button.click()
    assert dash.pipeline.shown_stage == "zero_grad"
    assert "grads before" in dash.pipeline.record_view.value


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_and_rewind_buttons(dash, runner):
    dash.controls.checkpoint_button.click()
    assert len(runner.checkpoints) == 1
    losses = []
    dash.run("steps", 4)
    losses.append(runner.history.loss.copy())
    dash.controls.rewind_button.click()
    assert runner.global_step == 0
    assert len(runner.history) == 0
    assert "rewound" in dash.controls.message.value
    dash.run("steps", 4)
    np.testing.assert_array_equal(runner.history.loss, losses[0])  # replay is exact
    assert [c.kind for c in runner.history.controls] == ["checkpoint", "rewind"]


def test_checkpoint_of_a_one_shot_data_source_says_why_in_the_controls():
    runner = make_runner(data=(b for b in make_data()))  # a generator cannot be replayed
    dash = tlw.Dashboard(runner)
    try:
        dash.controls.checkpoint_button.click()
        assert len(runner.checkpoints) == 0
        assert "one-shot" in dash.controls.message.value
    finally:
        dash.close()
        runner.close()


def test_checkpoint_button_disabled_mid_step(dash, runner):
    dash.step_stage()
    assert dash.controls.checkpoint_button.disabled
    dash.step()
    assert not dash.controls.checkpoint_button.disabled


# --------------------------------------------------------------------------- throttling


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_200_step_events_within_100ms_give_at_most_two_redraws(runner):
    clock = FakeClock()
    d = tlw.Dashboard(runner, clock=clock)
    try:
        clock.t += 1.0
        before = d.refresher.redraws
        for i in range(200):
            runner.events.emit(Event.STEP, StepSummary(i + 1, 0, i, 1.0, [0.05], False, 0.001))
            clock.t += 0.1 / 200
        assert d.refresher.redraws - before <= 2
        assert d.refresher.dirty  # the rest waits for the next allowed redraw
        clock.t += 0.2
        runner.events.emit(Event.STEP, StepSummary(201, 0, 200, 1.0, [0.05], False, 0.001))
        assert d.refresher.redraws - before <= 3
        assert not d.refresher.dirty
    finally:
        d.close()


def test_real_run_redraws_at_most_ten_per_second(runner):
    d = tlw.Dashboard(runner)
    try:
        import time

        before = d.refresher.redraws
        t0 = time.perf_counter()
        d.session.run(steps=300)  # a run started outside the dashboard: event-driven redraws only
        elapsed = time.perf_counter() - t0
        redraws = d.refresher.redraws - before
        assert redraws <= 10 * elapsed + 1
        d.refresh()
        assert f"step {runner.global_step}" in d.status.text
    finally:
        d.close()


def test_deferred_redraw_draws_the_end_of_a_burst(runner):
    async def main():
        d = tlw.Dashboard(runner)
        try:
            d.refresher.last_draw = d.refresher.clock()  # a redraw just happened
            runner.step()  # events during the throttle window: only marked dirty
            assert d.refresher.dirty
            for _ in range(50):
                await asyncio.sleep(0.01)
                if not d.refresher.dirty:
                    break
            assert not d.refresher.dirty
            assert "step 1" in d.status.text
        finally:
            d.close()

    asyncio.run(main())


def test_refresher_interval_grows_with_slow_redraws():
    from tlwidgets.ui.refresh import Refresher

    clock = FakeClock()
    drawn = []

    def slow_draw(parts):
        drawn.append(set(parts))
        clock.t += 0.05  # a 50 ms redraw

    r = Refresher(slow_draw, max_rate=10, max_fraction=0.05, clock=clock)
    r.mark("a")
    assert r.redraws == 1 and r.interval == pytest.approx(1.0)  # 50 ms / 5 %
    clock.t += 0.5
    r.mark("b")
    assert r.redraws == 1
    clock.t += 0.6
    r.mark("c")
    assert r.redraws == 2 and drawn[-1] == {"b", "c"}


# --------------------------------------------------------------------------- watch()


def test_watcher_dashboard_in_a_user_loop(callback_errors):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        d = tlw.Dashboard(w)
        try:
            assert d.controls.step_button.layout.display == "none"
            assert d.controls.run_button.layout.display == "none"
            assert d.controls.pause_button.layout.display == "none"
            for x, y in make_data():
                opt.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                opt.step()
            d.refresh()
            assert w.global_step == 8
            assert d.status.text.startswith("step 8")
            assert "watching" in d.status.text
            assert d.heatmap.grid.color.shape == (len(w.param_names), 8)
            np.testing.assert_allclose(d.loss.raw.y, w.history.loss)
            assert "tlw-stage-ok" in d.pipeline.chips[Stage.STEP]._dom_classes
            # freeze and LR controls act on the watcher
            d.freeze.toggles["0"].value = True
            assert not model[0].weight.requires_grad
            d.lr.sliders[0].value = 0.001
            assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
            with pytest.raises(RuntimeError, match="own loop"):
                d.step()
        finally:
            d.close()


def test_watcher_dashboard_after_the_loop_shows_no_made_up_costs(callback_errors):
    # Shown after the loop ended (as in the tutorial): no step was timed while the dashboard was
    # open, so the costs are unknown ("–"), not 0.00 ms.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for x, y in make_data():
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    d = tlw.Dashboard(w)
    try:
        d.refresh()
        assert d.status.text.startswith("step 8")
        assert "tracking –" in d.status.text and "ui –" in d.status.text
        assert "0.00 ms" not in d.status.text
    finally:
        d.close()


# --------------------------------------------------------------------------- misc


def test_close_unsubscribes_and_restores_the_tracker(runner):
    d = tlw.Dashboard(runner)
    tracker_methods = dict(runner.tracker.__dict__)
    assert "measure_grads" in tracker_methods  # timed while the dashboard lives
    d.close()
    assert "measure_grads" not in runner.tracker.__dict__
    redraws = d.refresher.redraws
    runner.run(steps=3)
    assert d.refresher.redraws == redraws


@pytest.mark.parametrize("closed_first", ["older", "newer"])
def test_two_dashboards_on_one_runner_keep_their_own_tracking_meters(runner, closed_first):
    d1 = tlw.Dashboard(runner)
    d2 = tlw.Dashboard(runner)
    try:
        runner.run(steps=3)
        for d in (d1, d2):
            assert d.tracking.steps == 3 and d.tracking.seconds > 0
        gone, kept = (d1, d2) if closed_first == "older" else (d2, d1)
        gone.close()
        before = kept.tracking.seconds
        runner.run(steps=3)
        assert kept.tracking.steps == 6
        assert kept.tracking.seconds > before  # closing the other dashboard did not stop this meter
        assert gone.tracking.steps == 3
        kept.refresh()
        assert "tracking –" not in kept.status.text
    finally:
        d1.close()
        d2.close()
    # the last one closed restores the tracker's own methods
    assert "measure_grads" not in runner.tracker.__dict__
    assert "before_step" not in runner.tracker.stats.__dict__


def test_tracking_cost_is_measured(dash, runner):
    dash.run("steps", 20)
    assert dash.tracking.steps == 20
    assert dash.tracking.ms_per_step() > 0
    assert math.isfinite(dash.tracking.ms_per_step())
    assert "tracking" in dash.status.text and "steps/s" in dash.status.text


def test_record_html_formats_every_stage(runner):
    from tlwidgets.ui.format import record_html

    for _ in range(7):
        rec = runner.step_stage()
        html = record_html(rec, runner.param_names)
        assert rec.stage.value in html
        assert "Traceback" not in html
    assert "update/weight" in record_html(runner.records[Stage.STEP], runner.param_names)
    assert "grad norm" in record_html(runner.records[Stage.BACKWARD], runner.param_names)


def test_refresher_part_intervals_defer_costly_parts():
    from tlwidgets.ui.refresh import Refresher

    clock = FakeClock()
    drawn: list[set[str]] = []
    r = Refresher(
        lambda parts: drawn.append(set(parts)), max_rate=10, clock=clock, part_intervals={"heatmap": 0.25}
    )
    r.mark("heatmap", "status")
    assert drawn == [{"heatmap", "status"}]
    clock.t += 0.1
    r.mark("heatmap", "status")
    assert drawn[-1] == {"status"} and r.dirty == {"heatmap"}  # the heatmap waits for its own interval
    clock.t += 0.16
    r.mark("status")
    assert drawn[-1] == {"heatmap", "status"} and not r.dirty
    clock.t += 0.01
    r.dirty.add("heatmap")
    r.flush()  # a forced redraw (a click, the end of a run) draws everything
    assert drawn[-1] == {"heatmap"}


def test_lr_range_test_with_the_real_check_restores_the_weights(dash, runner):
    pytest.importorskip("tlwidgets.diagnostics.checks")
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    lr_before = runner.optimizer.param_groups[0]["lr"]
    result = dash.lr.range_test(num_steps=20)
    assert result is not None and len(dash.lr.curve.x) == len(result.lrs)
    for k, v in runner.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert runner.optimizer.param_groups[0]["lr"] == lr_before
    assert runner.global_step == 0 and len(runner.history) == 0
    if result.suggestion is not None:
        dash.lr.apply_button.click()
        assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(result.suggestion)
