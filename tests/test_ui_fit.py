"""The fit panel (``tlw-fit``) without a browser: its widgets and traits, the empty state, the curves
against the baseline, the verdict line, and the ``tlw-fix`` buttons (shown only when an action applies;
a click changes the runner through its controls and shows a confirmation line).

ipywidgets swallows exceptions raised in widget callbacks (it logs "Exception in callback") and the
dashboard reports its own in its error area (logged on ``tlwidgets.ui``): the autouse fixture fails a
test on either kind of record, unless the test expects one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_ui_dashboard as _dashboard_tests
import torch
from helpers import digits_runner, one_thread, overfitting_digits_runner  # noqa: F401

import tlwidgets as tlw
from tlwidgets.diagnostics.fit import Verdict, fit_actions, fit_report
from tlwidgets.ui import FitPanel
from tlwidgets.ui.fit import EMPTY_TEXT, epoch_ticks
from tlwidgets.zoo.models import mlp

#: Fails a test on an exception swallowed in a widget callback (test_ui_dashboard.py).
callback_errors = _dashboard_tests.callback_errors
pytestmark = pytest.mark.usefixtures("one_thread", "callback_errors")


def _healthy():
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    return digits_runner(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))


def _overfit():
    return overfitting_digits_runner()


def _classes(widget) -> set[str]:
    return set(widget._dom_classes)


@pytest.fixture
def dash():
    made = []

    def make(runner):
        d = tlw.Dashboard(runner)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_epoch_ticks_are_integers_that_fit():
    assert list(epoch_ticks(1, 1)) == [1.0]
    assert list(epoch_ticks(1, 8)) == [float(i) for i in range(1, 9)]
    ticks = epoch_ticks(1, 95)
    assert 3 <= len(ticks) <= 12 and np.all(ticks == np.round(ticks)) and ticks[0] >= 1 and ticks[-1] <= 95
    assert epoch_ticks(3, 2).size == 0


def test_the_panel_is_a_tab_with_its_class_and_an_empty_state(dash):
    runner = _healthy()
    d = dash(runner)
    panel = d.fit
    assert isinstance(panel, FitPanel) and d.panels["fit"] is panel
    assert "tlw-fit" in _classes(panel)
    assert "Fit" in d.tabs.titles
    assert panel.verdict == "" and panel.report is None and panel.fix_buttons() == []
    assert panel.empty.value == EMPTY_TEXT and panel.empty.layout.display is None
    assert panel.plots.layout.display == "none"
    runner.run(steps=3)  # steps but no epoch end: still empty
    d.refresh()
    assert panel.verdict == "" and panel.plots.layout.display == "none"


def test_a_healthy_run_draws_train_against_validation_and_offers_no_fix(dash):
    runner = _healthy()
    d = dash(runner)
    runner.run(epochs=1)
    d.refresh()
    panel = d.fit
    assert panel.verdict == Verdict.TOO_EARLY.value and d.tabs.titles[d.tabs.titles.index("Fit")] == "Fit"
    runner.run(epochs=2)
    d.refresh()
    assert panel.verdict == Verdict.GOOD_FIT.value
    assert panel.empty.layout.display == "none" and panel.plots.layout.display is None
    assert "Good fit" in panel.verdict_line.value and "tlw-fit-verdict" in _classes(panel.verdict_line)
    assert panel.fix_buttons() == [] and panel.actions == ()
    assert "Fit: good fit" in d.tabs.titles
    # The curves: one point per epoch, named in the legend, the chance baseline dashed.
    for plot, what in ((panel.loss_plot, "loss"), (panel.acc_plot, "accuracy")):
        assert list(plot.train.x) == [1.0, 2.0, 3.0] and len(plot.val.y) == 3
        assert plot.train.labels == [f"train {what}"] and plot.val.labels == [f"validation {what}"]
        assert plot.train.display_legend and plot.val.display_legend
        assert plot.baseline.line_style == "dashed" and plot.baseline.display_legend
        assert plot.baseline.labels[0].startswith("chance (10 classes)")
        assert plot.x_axis.label == "epoch" and plot.y_axis.label == what and plot.x_axis.tick_format == "d"
        assert list(plot.x_axis.tick_values) == [1.0, 2.0, 3.0]
        assert not plot.goal.display_legend  # no target given
    epochs = runner.history.epochs
    assert list(panel.loss_plot.train.y) == pytest.approx([e.train_loss for e in epochs])
    assert list(panel.acc_plot.val.y) == pytest.approx([e.val_metrics["accuracy"] for e in epochs])
    assert panel.loss_plot.baseline.y[0] == pytest.approx(math.log(10))
    assert panel.acc_plot.baseline.y[0] == pytest.approx(0.1)


def test_a_target_is_drawn_and_judged(dash, callback_errors):
    runner = _healthy()
    d = dash(runner)
    runner.run(epochs=3)
    d.refresh()
    panel = d.fit
    assert panel.target_box.description == "target acc"
    panel.target_box.value = "0.999"  # typed: a stricter goal than a 3-epoch MLP reaches
    assert panel.target == 0.999
    assert panel.report.baseline.target_accuracy == 0.999
    assert panel.acc_plot.goal.display_legend and panel.acc_plot.goal.y[0] == pytest.approx(0.999)
    assert "the target" in panel.verdict_line.value
    panel.target = None
    assert panel.target_box.value == "" and panel.report.baseline.target_accuracy is None
    panel.target = 0.5
    assert panel.target_box.value == "0.5" and panel.verdict == Verdict.GOOD_FIT.value
    panel.target_box.value = "abc"  # refused in the error area; the target stays
    assert panel.target == 0.5 and d.errors.count == 1 and "must be a number" in d.errors.text
    panel.target_box.value = "95"  # a percentage is no accuracy
    assert panel.target == 0.5 and d.errors.count == 2 and "95% is 0.95" in d.errors.text
    assert len(callback_errors.take()) == 2  # both refusals were expected


def test_overfitting_shows_fix_buttons_and_a_click_changes_the_runner(dash):
    runner = _overfit()
    d = dash(runner)
    for _ in range(8):
        runner.run(epochs=1)  # each run() leaves an automatic checkpoint at the epoch boundary
    d.refresh()
    panel = d.fit
    assert panel.verdict == Verdict.OVERFITTING.value and "Fit: overfitting" in d.tabs.titles
    report = panel.report
    buttons = panel.fix_buttons()
    assert [b.description for b in buttons] == [a.label for a in fit_actions(runner, report)]
    assert [b.description for b in buttons] == [
        f"Rewind to epoch {report.best_epoch} (early stop)",
        "Raise weight decay to 0.0005",
    ]
    assert all("tlw-fix" in _classes(b) for b in buttons) and all(b.tooltip for b in buttons)
    assert "tlw-fixes" in _classes(panel.fixes) and panel.confirmation() == ""
    # Weight decay first: through the controls, confirmed, the button follows the new state.
    buttons[1].click()
    assert runner.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert runner.history.controls[-1].kind == "set_weight_decay"
    assert (
        "tlw-fix-done" in panel.confirmation()
        and "weight_decay of the optimizer to 0.0005" in panel.confirmation()
    )
    labels = [b.description for b in panel.fix_buttons()]
    assert "Raise weight decay to 0.005" in labels and "Raise weight decay to 0.0005" not in labels
    # Early stop: back to the best epoch, the abandoned epochs dropped from the plot.
    early = next(b for b in panel.fix_buttons() if "early stop" in b.description)
    early.click()
    assert runner.global_step == report.best_step and len(runner.history.epochs) == report.best_epoch
    assert list(panel.loss_plot.train.x) == [float(i) for i in range(1, report.best_epoch + 1)]
    assert "Rewound to the end of epoch" in panel.confirmation()
    assert not any("early stop" in b.description for b in panel.fix_buttons())


def test_an_early_stop_clicked_during_a_dashboard_run_pauses_the_run_then_rewinds(dash):
    import asyncio

    runner = _overfit()
    d = dash(runner)
    for _ in range(8):
        runner.run(epochs=1)
    d.refresh()
    best_step = d.fit.report.best_step
    button = next(b for b in d.fit.fix_buttons() if "early stop" in b.description)

    async def main() -> None:
        task = d.run("steps", 500)
        for _ in range(40):  # a few stages into the run (epochs of two steps end in it)
            await asyncio.sleep(0)
        assert runner.running and len(runner.history.epochs) > 8  # epochs ended since it was offered
        button.click()  # a rewind cannot happen mid-run: pause, then apply
        await task
        for _ in range(3):
            await asyncio.sleep(0)  # the done callbacks

    asyncio.run(main())
    assert not runner.running and runner.global_step == best_step
    assert "Rewound to the end of epoch" in d.fit.confirmation() and d.errors.count == 0


def test_underfitting_offers_a_higher_lr_that_the_click_sets(dash):
    torch.manual_seed(0)
    model = mlp([64, 10])
    runner = digits_runner(model, torch.optim.SGD(model.parameters(), lr=1e-4))
    d = dash(runner)
    runner.run(epochs=3)
    d.refresh()
    panel = d.fit
    assert panel.verdict == Verdict.UNDERFITTING.value
    (button,) = panel.fix_buttons()
    assert button.description.startswith("Raise lr to ") and "tlw-fix" in _classes(button)
    new = float(button.description.removeprefix("Raise lr to "))
    button.click()
    assert runner.optimizer.param_groups[0]["lr"] == new and runner.history.controls[-1].kind == "set_lr"
    assert panel.fix_buttons() == []  # the LR it was offered for is gone
    assert "Set the LR of the optimizer" in panel.confirmation()
    runner.run(epochs=3)
    d.refresh()
    assert panel.verdict in (Verdict.GOOD_FIT.value, Verdict.TOO_EARLY.value), panel.verdict_line.value


def test_the_panel_follows_a_rewind_and_works_on_its_own(dash):
    runner = _healthy()
    panel = FitPanel(lambda where: lambda fn: fn, session=runner)
    assert "tlw-fit" in _classes(panel)
    ck = runner.checkpoint()
    runner.run(epochs=2)
    panel.draw(runner)
    assert panel.verdict == Verdict.GOOD_FIT.value and len(panel.loss_plot.train.x) == 2
    runner.rewind(ck)
    panel.draw(runner)
    assert panel.verdict == "" and panel.plots.layout.display == "none"
    report = fit_report(runner)
    assert report.verdict is Verdict.TOO_EARLY and report.epochs == 0
    panel.close()
