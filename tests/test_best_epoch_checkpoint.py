"""An automatic checkpoint at the best validation epoch, so early stopping works after one run().

At an epoch end whose validation loss is the best so far (and finite) the runner takes an automatic
checkpoint (``"auto: best validation (epoch N)"``); the count and memory bounds still hold and the
newest such checkpoint is never the one thinned away. The fit panel's "Rewind to epoch N (early stop)"
is then offered after a single ``run(epochs=K)`` and restores the best epoch's weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from helpers import make_batches, make_runner, overfitting_digits_runner

import tlwidgets as tlw
from tlwidgets.core.checkpoint import AutoCheckpoints
from tlwidgets.core.events import Event
from tlwidgets.diagnostics.fit import Verdict, fit_actions, fit_report
from tlwidgets.ui.fit import FitPanel

torch.set_num_threads(1)


def _overfit(widths=(64, 512, 512, 10), **options) -> tlw.Runner:
    """tests/test_fit.py's overfitting setup: 50 digits for a big MLP, Adam at 3e-3."""
    return overfitting_digits_runner(widths, **options)


def _best_labels(runner: tlw.Runner) -> list[str]:
    return [c.label for c in runner.auto_checkpoints if c.label.startswith("auto: best validation")]


def test_one_run_offers_the_early_stop_and_it_restores_the_best_epoch():
    runner = _overfit()
    runner.run(epochs=8)  # one call: 16 steps, no periodic checkpoint (every 100)
    report = fit_report(runner)
    assert report.verdict is Verdict.OVERFITTING, report.reason
    assert report.best_epoch < report.epoch
    best = runner.auto_checkpoints.best
    assert best is not None and best.step == report.best_step
    assert best.label == f"auto: best validation (epoch {report.best_epoch})"
    # One per improving epoch (every epoch up to the best improves here), in the bounds.
    assert _best_labels(runner)[-1] == best.label and len(runner.auto_checkpoints) <= 8
    panel = FitPanel(lambda where: lambda fn: fn, session=runner)
    try:
        panel.draw(runner)
        labels = [b.description for b in panel.fix_buttons()]
        early = f"Rewind to epoch {report.best_epoch} (early stop)"
        assert labels[0] == early, labels
        assert fit_actions(runner, report)[0].label == early
        panel.fix_buttons()[0].click()
        assert "Rewound to the end of epoch" in panel.confirmation()
    finally:
        panel.close()
    assert runner.global_step == report.best_step and len(runner.history.epochs) == report.best_epoch
    # The best epoch's weights: the same validation loss as recorded then.
    assert math.isclose(runner.evaluate()["loss"], report.best_val_loss, rel_tol=1e-6, abs_tol=1e-7)
    for name, value in runner.model.state_dict().items():
        assert torch.equal(value, best.model_state[name]), name


def test_bounds_hold_over_a_long_run_and_the_newest_best_is_never_thinned():
    keep, memory = 4, 10.0  # Adam: ~3x the model's state per checkpoint, so about 3 fit
    runner = _overfit(
        (64, 256, 10), auto_checkpoints=keep, auto_checkpoint_every=3, auto_checkpoint_memory=memory
    )
    budget = memory * runner._state_bytes
    seen: list[int] = []

    def check(record) -> None:
        cks = runner.auto_checkpoints
        assert len(cks) <= keep and cks.nbytes <= budget
        vals = [(e.val_loss, e.step) for e in runner.history.epochs]
        best_step = min(vals)[1]  # (distinct losses: no tie)
        assert cks.best is not None and cks.best.step == best_step
        assert any(c is cks.best for c in cks)
        seen.append(len(cks))

    runner.events.on(Event.EPOCH, check)
    runner.run(epochs=60)  # the best at about epoch 20, then the validation loss creeps up
    assert len(seen) == 60
    assert runner.auto_checkpoints.best.step < runner.global_step / 2  # kept through 40 epochs of thinning
    labels = [c.label for c in runner.auto_checkpoints]
    assert len(_best_labels(runner)) >= 1 and any(lbl.startswith("auto: step") for lbl in labels)
    steps = [c.step for c in runner.auto_checkpoints]
    assert steps == sorted(steps) and steps[-1] == runner.global_step - runner.global_step % 3


def test_thinning_keeps_the_best_and_forgets_it_when_a_rewind_drops_it():
    @dataclasses.dataclass
    class Fake:
        step: int
        id: int
        label: str = ""
        nbytes: int = 1

    ids = itertools.count()
    cks = AutoCheckpoints(keep=3, max_bytes=100)
    cks.add(Fake(0, next(ids)))
    best = Fake(4, next(ids))
    cks.add(best, best=True)
    for step in range(5, 60, 5):
        cks.add(Fake(step, next(ids)))
        assert len(cks) == 3 and cks.best is best and cks[-1].step == step
    newer = Fake(60, next(ids))
    cks.add(newer, best=True)
    assert cks.best is newer  # the old best is thinned like any other now
    one = AutoCheckpoints(keep=1, max_bytes=100)
    one.add(best, best=True)
    one.add(Fake(70, next(ids)))
    assert list(one) == [best]  # keep=1: the best, not the newest
    cks.drop_after(30)
    assert cks.best is None


def test_a_rewind_before_the_best_starts_the_count_again():
    runner = make_runner(val_data=make_batches(seed=1))
    runner.run(epochs=3)
    assert runner.auto_checkpoints.best is not None
    runner.rewind(runner.auto_checkpoints[0])  # "auto: before run": the epochs are gone
    assert runner.auto_checkpoints.best is None and not runner.history.epochs
    runner.run(epochs=1)
    assert runner.auto_checkpoints.best.label == "auto: best validation (epoch 1)"


def test_none_without_validation_none_for_one_shot_data_and_none_when_turned_off():
    runner = make_runner()
    runner.run(epochs=3)
    assert runner.auto_checkpoints.best is None and not _best_labels(runner)
    one_shot = make_runner(train_data=iter(make_batches()), val_data=make_batches(seed=1))
    one_shot.run(epochs=1)
    assert len(one_shot.auto_checkpoints) == 0
    off = make_runner(val_data=make_batches(seed=1), auto_checkpoints=0)
    off.run(epochs=2)
    assert len(off.auto_checkpoints) == 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_they_change_no_number_of_the_run(momentum):
    def losses(**options) -> np.ndarray:
        torch.manual_seed(0)
        runner = make_runner(
            train_data=make_batches(n_batches=6), val_data=make_batches(seed=1), momentum=momentum, **options
        )
        runner.run(epochs=4)
        return np.concatenate([runner.history.loss, [e.val_loss for e in runner.history.epochs]])

    np.testing.assert_array_equal(losses(auto_checkpoints=0), losses())
