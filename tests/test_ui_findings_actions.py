"""The findings panel's action buttons (``tlw-fix``), without a browser: a click changes the kernel's
state and shows a confirmation line; training on, the finding's card shows resolved (greyed).

ipywidgets swallows exceptions raised in button callbacks (it logs "Exception in callback") and the
dashboard reports its own in its error area (logged on ``tlwidgets.ui``): the autouse fixture fails a
test on either kind of record.
"""

from __future__ import annotations

import pytest
import test_ui_dashboard as _dashboard_tests
import torch
from test_actions import _lr_too_high_runner

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.core.events import Event

torch.set_num_threads(1)
#: Fails a test on an exception swallowed in a widget callback (test_ui_dashboard.py).
callback_errors = _dashboard_tests.callback_errors
pytestmark = pytest.mark.usefixtures("callback_errors")


def _index(panel, code: str) -> int:
    for i in range(panel.count):
        if panel.finding(i).code == code:
            return i
    raise AssertionError(f"{code} not listed: {[panel.finding(i).code for i in range(panel.count)]}")


def _fix_buttons(root) -> list:
    out, stack = [], [root]
    while stack:
        w = stack.pop()
        if "tlw-fix" in getattr(w, "_dom_classes", ()):
            out.append(w)
        stack.extend(getattr(w, "children", ()) or ())
    return out


def test_a_fix_button_adds_the_head_to_the_optimizer_and_the_card_shows_resolved():
    runner = zoo.get("head-not-in-optimizer").runner(0)
    d = tlw.Dashboard(runner)
    try:
        d.refresh()
        panel = d.findings
        i = _index(panel, "param-not-in-optimizer")
        buttons = panel.fix_buttons(i)
        assert [b.description for b in buttons] == ["Add to optimizer"]
        assert all("tlw-fix" in b._dom_classes for b in buttons)
        assert buttons[0].tooltip.startswith("Add head.weight, head.bias")
        assert _fix_buttons(d) == buttons  # the only tlw-fix buttons of the dashboard, found by class
        assert panel.confirmation(i) == ""
        buttons[0].click()
        # The kernel's state changed: the head is in a new optimizer group, recorded as a control.
        assert runner.param_group_of()["head.weight"] == 1
        assert runner.history.controls[-1].kind == "unfreeze"
        j = _index(panel, "param-not-in-optimizer")
        assert "Added 2 parameter(s)" in panel.confirmation(j)
        assert 'class="tlw-fix-done"' in panel.list.children[j].children[0].value  # on the card
        assert panel.fix_buttons(j) == []  # applied: no longer offered
        row = panel.list.children[j]
        assert "tlw-finding-resolved" in row._dom_classes
        assert "resolved at step 0" in panel.finding(j)._repr_html_()
        assert "resolved" in panel.header.value
        assert d.errors.count == 0
    finally:
        d.close()
        runner.close()


def test_rewind_and_set_lr_from_the_dashboard_then_the_finding_resolves():
    runner = _lr_too_high_runner(3.0)
    d = tlw.Dashboard(runner)
    try:
        runner.checkpoint("start")
        runner.run(epochs=1)
        d.refresh()
        panel = d.findings
        i = _index(panel, "lr-too-high")
        assert not panel.finding(i).resolved
        assert "tlw-finding-resolved" not in panel.list.children[i]._dom_classes
        button = panel.fix_buttons(i)[0]
        assert button.description.startswith("Rewind to step 0 and set lr=")
        new_lr = float(button.description.rsplit("=", 1)[1])
        button.click()
        assert runner.global_step == 0
        assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(new_lr)
        j = _index(panel, "lr-too-high")
        assert "Rewound to step 0" in panel.confirmation(j)
        runner.run(epochs=3)
        d.refresh()
        j = _index(panel, "lr-too-high")
        assert panel.finding(j).resolved
        assert "tlw-finding-resolved" in panel.list.children[j]._dom_classes
        assert runner.evaluate()["accuracy"] > 0.8
        assert d.errors.count == 0
    finally:
        d.close()
        runner.close()


def test_a_resolution_between_steps_marks_the_panel_dirty_only_then():
    runner = _lr_too_high_runner(
        0.5, auto_checkpoints=0
    )  # no checkpoint from before: the fix sets the LR only
    d = tlw.Dashboard(runner)
    try:
        runner.run(epochs=2)
        d.refresh()
        panel = d.findings
        i = _index(panel, "lr-too-high")
        panel.fix_buttons(i)[0].click()  # set the LR only: resolved once the numbers say so
        answers: list[bool | None] = []
        on_event = panel.on_event

        def spy(event, payload):
            answer = on_event(event, payload)
            if event is Event.STEP:
                answers.append(answer)
            return answer

        panel.on_event = spy  # the dashboard asks the panel on every event
        runner.run(steps=60)
        # Dirty on the step that resolved the finding, not on the other steps (a redraw per step
        # would rank the findings and rebuild cards at the step rate).
        assert answers.count(True) == 1 and answers.count(False) == len(answers) - 1
        d.refresh()
        j = _index(panel, "lr-too-high")
        assert panel.finding(j).resolved
        assert "tlw-finding-resolved" in panel.list.children[j]._dom_classes
    finally:
        d.close()
        runner.close()


def test_a_fix_clicked_during_a_dashboard_run_pauses_the_run_then_applies():
    import asyncio

    runner = _lr_too_high_runner(3.0)
    d = tlw.Dashboard(runner)
    try:
        runner.checkpoint("start")
        runner.run(epochs=1)
        d.refresh()
        panel = d.findings
        button = panel.fix_buttons(_index(panel, "lr-too-high"))[0]
        new_lr = float(button.description.rsplit("=", 1)[1])

        async def main() -> None:
            task = d.run("steps", 500)
            for _ in range(20):  # a few stages into the run
                await asyncio.sleep(0)
            assert runner.running
            button.click()  # a rewind cannot happen mid-run: pause, then apply
            await task
            for _ in range(3):
                await asyncio.sleep(0)  # the done callbacks

        asyncio.run(main())
        assert not runner.running and runner.global_step == 0  # rewound after the run stopped
        assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(new_lr)
        assert "Rewound to step 0" in panel.confirmation(_index(panel, "lr-too-high"))
        assert d.errors.count == 0
    finally:
        d.close()
        runner.close()


def test_a_cards_buttons_never_shrink_so_their_labels_stay_whole():
    """Regression (found by tests/e2e/test_fix_browser.py): in JupyterLab the card's long text
    squeezed its buttons, so "Rewind to step 0 and set lr=0.044" showed as "Rewind to ..." (the LR
    it sets hidden) and "show step 20" as "show st...". The buttons' box and the select button
    must not shrink (flex ``0 0 auto``, width from their labels); the text is what gives way."""
    runner = _lr_too_high_runner(3.0)
    d = tlw.Dashboard(runner)
    try:
        runner.run(epochs=1)
        d.refresh()
        panel = d.findings
        i = _index(panel, "lr-too-high")
        body, fixes, select = panel.list.children[i].children
        assert fixes.layout.flex == "0 0 auto" and fixes.layout.width == "auto"
        assert select is panel.select_button(i) and select.layout.flex == "0 0 auto"
        assert select.layout.width == "auto"
        for b in panel.fix_buttons(i):
            assert b.layout.width == "auto" and b.layout.max_width is None
        assert panel.fix_buttons(i)[0].description.startswith("Rewind to step 0 and set lr=")
        assert body.layout.flex == "1 1 auto"  # the text wraps in the room left
    finally:
        d.close()
        runner.close()
