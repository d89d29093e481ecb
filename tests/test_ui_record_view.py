"""Stage records as a learner meets them (#16 point 9): Step stage shows what just ran, the record says
which step it belongs to in the status line's numbering, bars and long tables are visible, and the
status line does not quote a speed before anything ran."""

from __future__ import annotations

import re

import pytest
from helpers import one_thread  # noqa: F401

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.ui.format import record_html

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dashboard():
    runner = zoo.get("finetune-digits").runner(0)
    d = tlw.Dashboard(runner)
    yield d
    d.close()
    runner.close()


def test_step_stage_opens_the_record_of_the_stage_that_ran(dashboard):
    pipe = dashboard.pipeline
    assert pipe.shown_stage is None and pipe.record_view.layout.display == "none"
    dashboard.step_stage()
    assert pipe.shown_stage == "fetch" and pipe.record_view.layout.display != "none"
    assert "<b>fetch</b>" in pipe.record_view.value
    dashboard.step_stage()
    assert pipe.shown_stage == "zero_grad" and "<b>zero_grad</b>" in pipe.record_view.value


def test_a_record_counts_steps_as_the_status_line_does(dashboard):
    runner = dashboard.session
    rec = dashboard.step_stage()
    assert rec.step == 0  # the API: steps done before it
    assert ">step 1</span>" in dashboard.pipeline.record_view.value
    assert "exact statistics" in dashboard.pipeline.record_view.value
    for _ in range(6):
        dashboard.step_stage()
    assert runner.global_step == 1 and dashboard.status.text.startswith("step 1 ")  # the same step, done


def test_label_bars_have_their_size_inline_and_a_count_per_class(dashboard):
    rec = dashboard.step_stage()
    html = record_html(rec)
    counts = [int(c) for c in rec["label_counts"]]
    widths = [int(w) for w in re.findall(r"background:#6baed6;width:(\d+)px", html)]
    assert len(widths) == len(counts) and max(widths) == 80
    for c, w in zip(counts, widths):
        assert w == round(80 * c / max(counts)) or (c and w == 1)


def test_the_parameter_table_says_how_many_rows_it_has(dashboard):
    runner = dashboard.session
    for _ in range(6):
        rec = runner.step_stage()
    assert rec.stage is tlw.Stage.BACKWARD
    html = record_html(rec, runner.param_names)
    n = len(runner.param_names)
    assert f"{n} parameter tensor(s) (scroll for all)" in html
    assert html.count("<tr>") >= n  # every row is there (the view scrolls; nothing is cut)


def test_the_status_line_shows_no_speed_before_a_run(dashboard):
    dashboard.step_stage()
    assert "· – steps/s ·" in dashboard.status.text  # was "0.0 steps/s (last run)" before any run
    dashboard.run(steps=3)
    assert "– steps/s" not in dashboard.status.text and "steps/s (last run)" in dashboard.status.text


def test_step_stage_asks_twice_before_writing_nan_gradients_into_the_weights():
    """A learner clicking Step stage after run() stopped on NaN gradients damaged the weights with one
    click (found in a browser run of GettingStarted section 5)."""
    import torch
    from torch import nn

    class LogFeatures(nn.Module):
        def forward(self, x):
            return torch.log(x)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), LogFeatures(), nn.Linear(8, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data)
    d = tlw.Dashboard(runner)
    result = runner.run(steps=2)
    assert result.steps == 0
    while runner.stage is not tlw.Stage.STEP:  # a loss of NaN stops at LOSS; step on to BACKWARD
        runner.step_stage()
    assert runner.holding_non_finite_grads
    before = [p.detach().clone() for p in model.parameters()]
    assert d.step_stage() is None  # refused once, with a message
    assert "NaN/Inf" in d.controls.message.value and runner.stage is tlw.Stage.STEP
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rec = d.step_stage()  # asked twice: applied, as step_stage() documents
    assert rec.stage is tlw.Stage.STEP and not runner.holding_non_finite_grads
    d.close()
    runner.close()
