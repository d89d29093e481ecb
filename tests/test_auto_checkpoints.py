"""Automatic checkpoints (issue #14, part 3) and the abandoned timelines a rewind keeps.

The runner checkpoints by itself before a run, before a control change and every N steps, within a
count and a memory bound, never for a one-shot source; the user's ``runner.checkpoints`` are left
alone. A finding's "rewind to before the damage" then works in a plain ``Runner(...).run()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_batches, make_runner

from tlwidgets import zoo
from tlwidgets.core.history import MAX_BRANCHES


def _labels(runner) -> list[str]:
    return [c.label for c in runner.auto_checkpoints]


def _lr_too_high_runner(**options):
    """mlp on digits with SGD momentum 0.9 at lr 3.0 (the issue's example); no manual checkpoint."""
    parts = zoo.get("lr-too-high").build(0)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=3.0, momentum=0.9)
    parts.update(options)
    from tlwidgets import Runner

    return Runner(**parts)


# ---------------------------------------------------------------------- the case
def test_lr_too_high_action_rewinds_to_the_automatic_checkpoint_and_repairs_the_run():
    runner = _lr_too_high_runner()
    runner.run(epochs=2)
    assert runner.evaluate()["accuracy"] < 0.3  # the damage (dead units, near chance)
    assert not runner.checkpoints  # the user took none
    f = next(f for f in runner.findings if f.code == "lr-too-high")
    action = f.actions[0]
    assert action.label.startswith("Rewind to step 0 and set lr="), action.label
    abandoned = runner.global_step
    action.apply()
    assert runner.global_step == 0
    runner.run(epochs=3)
    assert np.isfinite(runner.history.loss[-20:]).all()
    assert runner.evaluate()["accuracy"] > 0.8
    # The abandoned timeline stays reachable, labelled with what rewound it.
    branch = runner.history.branches[-1]
    assert branch.label == action.label and branch.start == 0 and branch.end == abandoned
    assert list(branch.step) == list(range(1, abandoned + 1)) and len(branch.loss) == abandoned
    assert len(branch.val_loss) == 2  # its two epoch ends


def test_without_automatic_checkpoints_the_same_run_can_only_set_the_lr():
    runner = _lr_too_high_runner(auto_checkpoints=0)
    runner.run(epochs=2)
    f = next(f for f in runner.findings if f.code == "lr-too-high")
    assert f.actions[0].label.startswith("Set lr=")
    assert len(runner.auto_checkpoints) == 0


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("over-regularization", "Rewind to step 0 and set weight_decay="),
        ("scheduler-too-fast", "Rewind to step 0 and step the scheduler per epoch"),
    ],
)
def test_the_other_rewinding_actions_find_the_automatic_checkpoint_too(code, label):
    runner = zoo.get(code).runner(0)
    runner.run(epochs=2)
    f = next(f for f in runner.findings if f.code == code)
    action = f.actions[0]
    assert action.label.startswith(label), action.label
    action.apply()
    runner.run(epochs=3)
    assert runner.evaluate()["accuracy"] > 0.8 and f.resolved
    assert runner.history.branches[-1].label == action.label


# ---------------------------------------------------------------------- when they are taken
def test_one_before_a_run_and_none_twice_for_the_same_state():
    runner = make_runner(auto_checkpoint_every=0)
    runner.run(steps=2)
    assert _labels(runner) == ["auto: before run"] and runner.auto_checkpoints[0].step == 0
    runner.run(steps=2)  # the state at step 2 was not kept yet: one more
    assert [c.step for c in runner.auto_checkpoints] == [0, 2]
    runner.run(steps=0)
    runner.run(steps=0)  # nothing happened since the first: no second copy of the same state
    assert [c.step for c in runner.auto_checkpoints] == [0, 2, 4]
    mine = runner.checkpoint("mine")
    runner.run(steps=1)  # the user's checkpoint already holds this state
    assert [c.step for c in runner.auto_checkpoints] == [0, 2, 4]
    # The user's list and the controls are what they were without the feature.
    assert list(runner.checkpoints) == [mine]
    assert [c.kind for c in runner.history.controls] == ["checkpoint"]
    assert all(c.auto for c in runner.auto_checkpoints) and not mine.auto


def test_one_before_each_control_change_labelled_with_its_kind():
    runner = make_runner(auto_checkpoint_every=0)
    runner.run(steps=3)
    before = runner.model[0].weight.detach().clone()
    runner.set_lr(0.01)
    runner.run(steps=2)
    runner.freeze("0")
    assert _labels(runner) == [
        "auto: before run",
        "auto: before set_lr",
        "auto: before run",
        "auto: before freeze",
    ]
    assert [c.step for c in runner.auto_checkpoints] == [0, 3, 3, 5]
    # The one before set_lr restores the LR and weights from before the change.
    runner.rewind(runner.auto_checkpoints[1])
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert torch.equal(runner.model[0].weight, before)
    assert runner.model[0].weight.requires_grad


def test_controls_in_a_row_share_the_checkpoint_from_before_the_first():
    runner = make_runner(auto_checkpoint_every=0)
    runner.run(steps=2)
    for lr in (0.05, 0.02, 0.01, 0.005):  # an LR slider dragged at a step boundary
        runner.set_lr(lr)
    assert _labels(runner) == ["auto: before run", "auto: before set_lr"]
    runner.rewind(runner.auto_checkpoints[-1])
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    runner.set_lr(0.05)  # right after the rewind: the state is the checkpoint's own
    assert len(runner.auto_checkpoints) == 2


def test_a_control_called_mid_step_takes_none():
    runner = make_runner(auto_checkpoint_every=0)
    runner.step_stage()  # FETCH: mid-step now
    runner.set_lr(0.05)
    assert _labels(runner) == []
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_every_n_steps_thinned_to_the_count_keeping_the_first_and_the_newest():
    runner = make_runner(train_data=make_batches(n_batches=8), auto_checkpoints=4, auto_checkpoint_every=5)
    runner.run(steps=60)
    steps = [c.step for c in runner.auto_checkpoints]
    assert len(steps) == 4 and steps[0] == 0 and steps[-1] == 60
    assert steps == sorted(steps) and min(np.diff(steps)) >= 10  # spread out, not bunched at the end
    assert all(c.label in ("auto: before run", f"auto: step {c.step}") for c in runner.auto_checkpoints)


def test_memory_bound_relative_to_the_model_state():
    runner = make_runner(momentum=0.9, auto_checkpoint_every=1, auto_checkpoint_memory=5.0)
    runner.run(steps=20)
    state = sum(t.numel() * t.element_size() for t in runner.model.state_dict().values())
    one = runner.auto_checkpoints[-1].nbytes
    assert one == 2 * state  # weights + a momentum buffer each
    assert runner.auto_checkpoints[0].nbytes == state  # before the first step: no momentum yet
    assert len(runner.auto_checkpoints) == 3 and runner.auto_checkpoints.nbytes <= 5.0 * state
    tiny = make_runner(momentum=0.9, auto_checkpoint_memory=0.5)  # one copy would exceed it
    tiny.run(steps=3)
    assert len(tiny.auto_checkpoints) == 0


def test_on_an_accelerator_none_that_would_take_much_of_its_free_memory(monkeypatch):
    import tlwidgets.core.runner as runner_module

    assert runner_module._accelerator_room(torch.device("cpu")) is None  # off a GPU: no such check
    runner = make_runner(momentum=0.9, auto_checkpoint_every=1)
    state = runner._state_bytes
    monkeypatch.setattr(runner_module, "_accelerator_room", lambda device: 40 * state)  # 3x: 7.5%
    runner.run(steps=2)
    assert len(runner.auto_checkpoints) == 3
    monkeypatch.setattr(runner_module, "_accelerator_room", lambda device: 10 * state)  # 2x: 20%
    runner.run(steps=2)
    assert len(runner.auto_checkpoints) == 3


def test_never_for_a_one_shot_source():
    runner = make_runner(train_data=iter(make_batches()))
    runner.run(steps=3)
    runner.set_lr(0.05)
    assert len(runner.auto_checkpoints) == 0
    with pytest.raises(ValueError, match="one-shot"):
        runner.checkpoint()


def test_they_change_no_number_of_the_run():
    def losses(**options) -> np.ndarray:
        torch.manual_seed(0)
        runner = make_runner(train_data=make_batches(n_batches=6), momentum=0.9, **options)
        runner.run(steps=10)
        runner.set_lr(0.05)
        runner.run(epochs=2)
        return runner.history.loss

    np.testing.assert_array_equal(losses(auto_checkpoints=0), losses(auto_checkpoint_every=1))


@pytest.mark.parametrize(
    "options",
    [{"auto_checkpoints": -1}, {"auto_checkpoint_every": 1.5}, {"auto_checkpoint_memory": -1.0}],
)
def test_options_out_of_range_raise(options):
    with pytest.raises(ValueError, match="auto_checkpoint"):
        make_runner(**options)


# ---------------------------------------------------------------------- rewind: branches
def test_rewind_keeps_the_abandoned_loss_as_a_branch_and_forgets_its_checkpoints():
    runner = make_runner(auto_checkpoint_every=2)
    start = runner.checkpoint("start")
    runner.run(steps=6)
    old_loss = runner.history.loss.copy()
    runner.rewind(start)
    # None before the run (the user's holds that state); those of the abandoned timeline go.
    assert [c.step for c in runner.auto_checkpoints] == []
    (branch,) = runner.history.branches
    assert branch.label == "rewind to start" and (branch.start, branch.end) == (0, 6)
    np.testing.assert_array_equal(branch.loss, old_loss)
    runner.run(steps=3)
    runner.rewind(start, reason="try again")
    assert runner.history.branches[-1].label == "try again" and len(runner.history.branches[-1].loss) == 3
    runner.rewind(start)  # nothing abandoned: no empty branch
    assert len(runner.history.branches) == 2
    for _ in range(MAX_BRANCHES + 3):  # bounded
        runner.run(steps=1)
        runner.rewind(start)
    assert len(runner.history.branches) == MAX_BRANCHES
