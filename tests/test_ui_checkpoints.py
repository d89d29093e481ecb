"""The dashboard's checkpoint list offers the automatic checkpoints too (#14 part 3): the state before a
run or a control, what a rewind "to before the damage" wants."""

from __future__ import annotations

import pytest
from helpers import one_thread  # noqa: F401

import tlwidgets as tlw
from tlwidgets import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_checkpoint_list_holds_the_users_and_the_automatic_ones_newest_first():
    runner = zoo.get("mlp-digits").runner(0)
    d = tlw.Dashboard(runner)
    runner.run(steps=5)  # an automatic checkpoint before the run
    mine = runner.checkpoint("mine")
    runner.set_lr(0.01)  # and one before the control
    runner.run(steps=3)
    d.refresh()
    options = d.controls.checkpoints.options
    offered = [ck for _, ck in options]
    autos = list(runner.auto_checkpoints)
    assert autos and all(ck in offered for ck in autos) and mine in offered
    assert len(offered) == len(autos) + 1
    steps = [(ck.step, ck.id) for ck in offered]
    assert steps == sorted(steps, reverse=True)  # newest first
    label = dict((ck.id, lab) for lab, ck in options)
    assert label[mine.id] == f"#{mine.id} step 5 · mine"
    assert any("auto" in label[ck.id] for ck in autos)
    first_auto = min(autos, key=lambda ck: ck.step)
    assert first_auto.step == 0
    d.controls.checkpoints.value = first_auto
    d.rewind()  # what the Rewind button does
    assert runner.global_step == 0 and runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    d.close()
    runner.close()
