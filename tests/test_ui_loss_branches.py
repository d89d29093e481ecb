"""The loss panel overlays the timelines abandoned by rewinds (issue #14, part 3: before/after)."""

from __future__ import annotations

import numpy as np
from helpers import make_batches, make_runner

import tlwidgets as tlw
from tlwidgets.ui.loss import MAX_BRANCHES_SHOWN


def _dash(**options):
    runner = make_runner(train_data=make_batches(n_batches=4), lr=0.5, momentum=0.9, **options)
    return runner, tlw.Dashboard(runner)


def test_a_run_never_rewound_draws_no_branch_and_no_branch_legend():
    runner, dash = _dash()
    runner.run(steps=6)
    dash.loss.draw(runner)
    assert dash.loss.branches.x.size == 0 and dash.loss.branches.labels == []
    # (the run's own series are always named: #16)
    assert not dash.loss.branches.display_legend and dash.loss.smooth.display_legend


def test_after_a_rewind_the_abandoned_timeline_is_drawn_dashed_with_a_legend():
    runner, dash = _dash()
    start = runner.checkpoint("start")
    runner.run(steps=8)
    runner.rewind(start, reason="Rewind to step 0 and set lr=0.05")
    runner.set_lr(0.05)
    runner.run(steps=5)
    dash.loss.draw(runner)
    line = dash.loss.branches
    assert line in dash.loss.figure.marks
    assert line.line_style == "dashed" and line.display_legend and dash.loss.smooth.display_legend
    assert line.labels == ["before: Rewind to step 0 and set lr=0.05"]
    x = np.atleast_2d(line.x)  # (bqplot keeps a single line 1-D)
    assert x.shape == (1, 8)
    np.testing.assert_array_equal(x[0], np.arange(1, 9))
    # The overlay is the abandoned run's loss (smoothed like the current one); the new run goes on.
    assert np.isfinite(line.y).all() and len(dash.loss.raw.x) == 5
    assert line.colors[0] != dash.loss.raw.colors[0]


def test_branches_of_different_lengths_are_padded_and_only_the_newest_are_shown():
    runner, dash = _dash()
    start = runner.checkpoint("start")
    for n in range(1, MAX_BRANCHES_SHOWN + 3):
        runner.run(steps=n)
        runner.rewind(start, reason=f"try {n}")
    dash.loss.draw(runner)
    line = dash.loss.branches
    shown = list(range(3, MAX_BRANCHES_SHOWN + 3))
    assert line.labels == [f"before: try {n}" for n in shown]
    assert line.x.shape == (MAX_BRANCHES_SHOWN, max(shown))
    assert np.isfinite(line.x).all()  # padded by repeating the last point, never a NaN x
    assert len(set(line.colors)) == MAX_BRANCHES_SHOWN  # the newest darkest, older ones lighter
