"""The shared action-button code and the public helpers the fit's actions use.

:class:`~tlwidgets.ui.action_buttons.ActionButtons` draws the ``tlw-fix`` buttons of the findings panel
and of the fit panel; :func:`~tlwidgets.core.actions.rewind_keeping` keeps the abandoned run as a
checkpoint only where one can be taken (``Runner.at_step_boundary``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import make_runner

from tlwidgets.core.actions import Action, is_decoupled_decay, rewind_keeping
from tlwidgets.ui.action_buttons import NO_SHRINK, ActionButtons, confirmation_html


def _plain_guard(where: str):
    return lambda fn: fn


def _action(label: str, log: list[str]) -> Action:
    def run() -> str:
        log.append(label)
        return f"did {label}"

    return Action(label, f"does {label}", "test", ("test", ()), run)


def test_at_step_boundary_is_false_only_while_a_batch_is_held():
    runner = make_runner()
    assert runner.at_step_boundary
    runner.step_stage()  # FETCH: a batch is held now
    assert not runner.at_step_boundary
    runner.step()  # the rest of the step
    assert runner.at_step_boundary


def test_rewind_keeping_keeps_the_abandoned_run_only_at_a_boundary():
    runner = make_runner(auto_checkpoints=0)
    start = runner.checkpoint("start")
    runner.run(steps=3)
    tail = rewind_keeping(runner, start, "try again", fixing="lr-too-high")
    kept = runner.checkpoints[-1]
    assert kept.label == "before the fix of lr-too-high" and kept.step == 3
    assert f"checkpoint {kept.id}" in tail and runner.global_step == 0
    runner.run(steps=2)
    runner.step_stage()  # mid-step: no checkpoint can be taken, the rewind alone happens
    assert rewind_keeping(runner, start, "again", fixing="overfitting") == ""
    assert runner.checkpoints[-1] is kept and runner.global_step == 0


def test_is_decoupled_decay():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    adamw = torch.optim.AdamW([w], weight_decay=0.01)
    sgd = torch.optim.SGD([w], lr=0.1, weight_decay=5e-4)
    assert is_decoupled_decay(adamw.param_groups[0], adamw)
    assert not is_decoupled_decay(sgd.param_groups[0], sgd)


def test_buttons_keep_their_widgets_for_the_same_offer_and_apply_the_newest_action():
    applied: list[str] = []
    redrawn: list[int] = []
    buttons = ActionButtons(_plain_guard, lambda: redrawn.append(1), vertical=True)
    assert "tlw-fixes" in buttons.box._dom_classes and buttons.box.layout.flex == NO_SHRINK
    buttons.show([_action("A", applied), _action("B", applied)])
    first = buttons.buttons
    assert [b.description for b in first] == ["A", "B"]
    assert all("tlw-fix" in b._dom_classes and b.layout.width == "auto" for b in first)
    newer = _action("B", applied)
    buttons.show([_action("A", applied), newer])  # the same labels: the same widgets
    assert buttons.buttons == first
    first[1].click()
    assert applied == ["B"] and newer.done == "did B" and redrawn == [1]
    buttons.show([])
    assert buttons.buttons == [] and all(b.comm is None for b in first)  # closed
    buttons.close()


def test_a_click_during_a_run_pauses_it_and_applies_once_it_stopped():
    class Task:
        def __init__(self) -> None:
            self.callbacks: list[Any] = []

        def done(self) -> bool:
            return False

        def add_done_callback(self, fn: Any) -> None:
            self.callbacks.append(fn)

    class Host:
        task = Task()
        paused = False

        def pause(self) -> None:
            self.paused = True

    class Session:
        running = True

    host, applied = Host(), []
    buttons = ActionButtons(_plain_guard, lambda: None, host=host)
    buttons.show([_action("A", applied)], Session())
    buttons.buttons[0].click()
    assert host.paused and applied == []  # not mid-run
    host.task.callbacks[0](host.task)
    assert applied == ["A"]


def test_a_label_no_longer_offered_raises_through_the_guard():
    seen: list[str] = []

    def guard(where: str):
        def wrap(fn):
            def called(*args: Any) -> None:
                try:
                    fn(*args)
                except RuntimeError as exc:
                    seen.append(f"{where}: {exc}")

            return called

        return wrap

    buttons = ActionButtons(guard, lambda: None, where="fix test")
    buttons.show([_action("A", [])])
    button = buttons.buttons[0]
    buttons._actions.clear()  # (what a stale widget would see)
    button.click()
    assert seen == ["fix test: 'A' is no longer offered"]


@pytest.mark.parametrize("lines", [(), ("Set lr=0.1 <b>",)])
def test_confirmation_html_escapes_each_line(lines):
    out = confirmation_html(lines)
    assert out.count('class="tlw-fix-done"') == len(lines)
    assert "<b>" not in out
