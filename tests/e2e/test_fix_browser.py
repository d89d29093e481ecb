"""Findings you can act on, in a real browser: a ``tlw-fix`` button repairs the run (#14 part 5).

JupyterLab in headless Chromium runs a notebook that sets up a broken run on scikit-learn's digits
and shows ``tlw.Dashboard(runner)``. The test finds the finding's card in the dashboard's findings
panel (``.tlw-findings``), clicks its ``button.tlw-fix`` *in the browser*, and checks three sides
of the click:

- the page: the button shows its whole label (not cut off with an ellipsis), the confirmation line
  (``tlw-fix-done``) appears on the card, the card turns resolved (``tlw-finding-resolved``:
  greyed, listed after the active findings) and loses its ``tlw-fix`` button;
- the kernel (read with ``lab.execute``): the optimizer, the LR, the step and ``history`` changed
  as the action says, recorded as control changes, and ``finding.resolved`` / ``resolved_step``;
- training on, started with the dashboard's own Run button: validation accuracy well above chance,
  a finite loss, and the finding still resolved in the kernel and on the page.

Cases: (a) a fine-tune whose new head was left out of the optimizer ("Add to optimizer"),
(b) the MLP with SGD at lr 3.0, momentum 0.9 ("Rewind to step 0 and set lr=..."), (c) actions
that do not apply are not offered as buttons (no rewind without a checkpoint from before the
damage; nothing once the LR was changed by hand through the LR slider), and (d) two findings at
once: the resolved card moves below the active one, and a fix clicked during a run pauses the run
and is applied when it has stopped.

Screenshots before and after each click go to ``tests/e2e/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

TIMEOUT_MS = 60_000
#: Each test must stay well inside this (a shared 2-core machine: generous, bounded waits).
TEST_BUDGET_S = 90.0
#: Chance accuracy: 5 classes on the fine-tune split (digits 5-9), 10 on the MLP.
CHANCE_FINETUNE, CHANCE_MLP = 0.2, 0.1
#: "Well above chance" after the fix and three epochs (the unit tests' bar, tests/test_actions.py).
REPAIRED_ACCURACY = 0.8

SETUP_HEAD = """\
# A fine-tune on digits: a pretrained backbone, a new 5-class head ... assigned after the optimizer
# was built, so Adam never sees the head (the zoo's "head-not-in-optimizer" setup).
import torch

import tlwidgets as tlw
from tlwidgets import zoo

torch.set_num_threads(1)
parts = zoo.get("head-not-in-optimizer").build(0)"""

SETUP_LR_HIGH = """\
# The MLP on digits with SGD at lr 3.0, momentum 0.9: every step overshoots and kills ReLU units.
import torch

import tlwidgets as tlw
from tlwidgets import zoo

torch.set_num_threads(1)
parts = zoo.get("mlp-digits").build(0)
parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=3.0, momentum=0.9)"""

SETUP_HEAD_EVAL = (
    SETUP_HEAD
    + """
parts["model"].eval()  # and a second bug: the model is left in eval mode (batch norm frozen)"""
)

SHOW_DASHBOARD = """\
dashboard = tlw.Dashboard(runner)
dashboard"""


# ---------------------------------------------------------------------------------------- helpers
def kernel(lab: Any, page: Any, expr: str) -> Any:
    """``expr`` evaluated in the notebook's kernel, as JSON (a warning on stderr cannot garble it)."""
    out = lab.execute(page, f"import json as _json\nprint('@@' + _json.dumps({expr}))")
    lines = [line for line in out.splitlines() if line.startswith("@@")]
    assert lines, f"no answer from the kernel for {expr!r}: {out!r}"
    return json.loads(lines[-1][2:])


def finding_expr(code: str) -> str:
    """Kernel expression: the runner's finding of ``code``."""
    return f"next(f for f in runner.findings if f.code == {code!r})"


def at_step(n: int) -> re.Pattern:
    """The status line's "step N" for exactly N ("step 1" must not match "step 10")."""
    return re.compile(rf"\bstep {n}\b")


def card(page: Any, code: str) -> Any:
    """The findings panel's card (``.tlw-finding-row``) of the finding ``code``. Its code is the
    first ``<code>`` of the card's heading; other codes appear only under "likely caused by"."""
    heading = page.locator(
        ".tlw-finding > div:first-child > code", has_text=re.compile(rf"^{re.escape(code)}$")
    )
    return page.locator(".tlw-findings .tlw-finding-row").filter(has=heading)


def shot(lab: Any, page: Any, target: Any, name: str) -> None:
    """A screenshot (artifacts folder) with ``target`` (a card, the findings panel) scrolled into
    view: JupyterLab scrolls the notebook inside its own panel, so a full-page shot alone would
    show the top of the notebook."""
    target.first.scroll_into_view_if_needed()
    lab.screenshot(page, name)


def open_dashboard(lab: Any, name: str, setup: str, options: str = "") -> Any:
    """Write and run the notebook (``setup``, the runner on its ``parts`` with ``options``, then
    the dashboard); show the dashboard's Findings tab."""
    from playwright.sync_api import expect

    cells = [f"{setup}\nrunner = tlw.Runner(**parts{options})", SHOW_DASHBOARD]
    page = lab.open_notebook(lab.write_notebook(name, cells))
    lab.run_all(page)
    expect(page.locator(".tlw-dashboard")).to_be_visible(timeout=TIMEOUT_MS)
    show_findings(page)
    return page


def show_findings(page: Any) -> None:
    from playwright.sync_api import expect

    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="Findings").click()
    expect(page.locator(".tlw-findings")).to_be_visible(timeout=TIMEOUT_MS)


def run_in_browser(lab: Any, page: Any, steps: int) -> None:
    """Type ``steps`` into the Run box and click the dashboard's Run button; wait until the status
    line shows the run's end and Run is enabled again, and check the kernel ran exactly that."""
    from playwright.sync_api import expect

    start = kernel(lab, page, "runner.global_step")
    assert kernel(lab, page, "dashboard.controls.mode.value") == "steps"
    box = page.locator(".tlw-run-steps input")
    box.fill(str(steps))
    box.press("Enter")
    got = lab.poll(
        lambda: kernel(lab, page, "dashboard.controls.steps.value"), lambda v: v == steps, timeout=20
    )
    assert got == steps, f"the Run box did not reach the kernel ({got})"
    run = page.locator("button.tlw-run")
    expect(run).to_be_enabled()
    run.click()
    expect(page.locator(".tlw-status")).to_contain_text(at_step(start + steps), timeout=TIMEOUT_MS)
    expect(run).to_be_enabled(timeout=TIMEOUT_MS)
    assert kernel(lab, page, "[runner.global_step, runner.running, dashboard.last_result.stopped_by]") == [
        start + steps,
        False,
        "steps",
    ]


def expect_whole_labels(row: Any) -> None:
    """Every button on the card (its ``tlw-fix`` actions, "show step N") shows its whole label: a
    label cut off with an ellipsis would hide what the action does (the LR it sets)."""
    from playwright.sync_api import expect

    buttons = row.locator("button")
    expect(buttons.first).to_be_visible()
    cut = buttons.evaluate_all(
        "(bs) => bs.filter((b) => b.scrollWidth > b.clientWidth + 1)"
        ".map((b) => `${b.textContent.trim()}: ${b.clientWidth} of ${b.scrollWidth} px`)"
    )
    assert not cut, f"button labels cut off: {cut}"


def rows_in_order(page: Any) -> list[list[Any]]:
    """``[code, resolved]`` of every card in the panel, top to bottom."""
    return page.locator(".tlw-findings").evaluate(
        """(panel) => Array.from(panel.querySelectorAll('.tlw-finding-row')).map((row) => [
             row.querySelector('.tlw-finding > div:first-child > code').textContent,
             row.classList.contains('tlw-finding-resolved'),
           ])"""
    )


def expect_shown_resolved(page: Any, code: str, step: int) -> None:
    """The card of ``code`` is shown resolved at ``step``: class ``tlw-finding-resolved``, greyed
    (opacity and grayscale from the dashboard's CSS), no ``tlw-fix`` button left, after every
    active finding."""
    from playwright.sync_api import expect

    row = card(page, code)
    expect(row).to_have_count(1)
    expect(row).to_have_class(re.compile(r"\btlw-finding-resolved\b"), timeout=TIMEOUT_MS)
    expect(row.locator(".tlw-resolved-mark")).to_contain_text(f"resolved at step {step}")
    expect(row.locator("button.tlw-fix")).to_have_count(0, timeout=TIMEOUT_MS)
    opacity, css_filter = row.evaluate("(el) => [getComputedStyle(el).opacity, getComputedStyle(el).filter]")
    assert float(opacity) < 1 and "grayscale" in css_filter, (
        f"not greyed: opacity {opacity}, filter {css_filter}"
    )
    flags = [resolved for _, resolved in rows_in_order(page)]
    assert flags == sorted(flags), f"a resolved card is listed before an active one: {rows_in_order(page)}"


def expect_repaired(lab: Any, page: Any, code: str, chance: float) -> None:
    """Kernel side after training on: accuracy well above chance, finite loss, still resolved."""
    acc = kernel(lab, page, "runner.evaluate()['accuracy']")
    assert acc > REPAIRED_ACCURACY, f"validation accuracy {acc:.3f} after the fix (chance {chance})"
    assert kernel(lab, page, "bool(__import__('numpy').isfinite(runner.history.loss[-20:]).all())")
    assert kernel(lab, page, f"{finding_expr(code)}.resolved"), f"{code} came back after training on"
    assert kernel(lab, page, "dashboard.errors.count") == 0


# ------------------------------------------------------------------------------------------ tests
def test_add_to_optimizer_button_repairs_a_head_left_out_of_the_optimizer(lab):
    """(a) param-not-in-optimizer: the card offers "Add to optimizer"; a click in the browser puts
    the head's parameters in a new optimizer group (a recorded ``unfreeze`` control), confirms it on
    the card and shows the finding resolved at step 0 (greyed, after the active ones, no button).
    Three epochs run from the Run button then reach > 80% validation accuracy (chance 20%: the head
    would never train without the fix)."""
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    code = "param-not-in-optimizer"
    page = open_dashboard(lab, "fix_head.ipynb", SETUP_HEAD)
    row = card(page, code)
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    expect(row).not_to_have_class(re.compile(r"\btlw-finding-resolved\b"))
    fix = row.locator("button.tlw-fix")
    expect(fix).to_have_count(1)
    expect(fix).to_be_visible()
    expect(fix).to_have_text("Add to optimizer")
    assert kernel(lab, page, f"[a.label for a in {finding_expr(code)}.actions]") == ["Add to optimizer"]
    assert kernel(
        lab, page, "[len(runner.optimizer.param_groups), runner.param_group_of()['head.weight']]"
    ) == [
        1,
        None,
    ]
    expect(row.locator(".tlw-fix-done")).to_have_count(0)
    expect_whole_labels(row)
    shot(lab, page, row, "before-fix")

    fix.click()

    # The page: the confirmation line, then the resolved card.
    expect(row.locator(".tlw-fix-done")).to_contain_text("Added 2 parameter(s)", timeout=TIMEOUT_MS)
    expect_shown_resolved(page, code, step=0)
    expect(page.locator(".tlw-findings")).to_contain_text("1 resolved")
    shot(lab, page, row, "after-fix")
    # The kernel: the head is in a new group at the backbone's LR, recorded as a control change.
    state = kernel(
        lab,
        page,
        "[len(runner.optimizer.param_groups), runner.param_group_of()['head.weight'],"
        " runner.param_group_of()['head.bias'], runner.optimizer.param_groups[1]['lr'],"
        " runner.optimizer.param_groups[0]['lr'], runner.history.controls[-1].kind]",
    )
    assert state[:3] == [2, 1, 1], f"the head is not in a new optimizer group: {state}"
    assert state[3] == pytest.approx(state[4]) and state[5] == "unfreeze"
    assert kernel(lab, page, f"[{finding_expr(code)}.resolved, {finding_expr(code)}.resolved_step]") == [
        True,
        0,
    ]
    assert kernel(lab, page, f"[a.label for a in {finding_expr(code)}.actions]") == []

    # Train on from the browser: three epochs.
    run_in_browser(lab, page, 3 * kernel(lab, page, "len(runner.train_data)"))
    expect_repaired(lab, page, code, CHANCE_FINETUNE)
    assert kernel(lab, page, f"{finding_expr(code)}.resolved_step") == 0
    expect_shown_resolved(page, code, step=0)
    shot(lab, page, row, "trained-on")
    elapsed = time.perf_counter() - t0
    print(f"param-not-in-optimizer fix in the browser: {elapsed:.1f} s")
    assert elapsed < TEST_BUDGET_S


def test_rewind_and_set_lr_button_repairs_an_lr_far_too_high(lab):
    """(b) lr-too-high (SGD momentum 0.9, lr 3.0): after one epoch run from the browser the
    accuracy is near chance and the card offers "Rewind to step 0 and set lr=X". A click rewinds
    the runner to step 0 (the abandoned timeline kept in ``history.branches``, labelled with the
    action), sets the LR to X (recorded: checkpoint, rewind, set_lr), confirms on the card and
    shows the finding resolved at step 0. Three epochs from the Run button then reach > 80%
    validation accuracy (chance 10%) with the finding still resolved."""
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    code = "lr-too-high"
    page = open_dashboard(lab, "fix_lr.ipynb", SETUP_LR_HIGH)
    epoch = kernel(lab, page, "len(runner.train_data)")
    run_in_browser(lab, page, epoch)  # the damage
    assert kernel(lab, page, "runner.evaluate()['accuracy']") < 0.3
    row = card(page, code)
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    fix = row.locator("button.tlw-fix")
    expect(fix).to_have_count(1, timeout=TIMEOUT_MS)
    expect(fix).to_be_visible()
    label = fix.inner_text().strip()
    assert kernel(lab, page, f"[a.label for a in {finding_expr(code)}.actions]") == [label]
    assert label.startswith("Rewind to step 0 and set lr="), label
    new_lr = float(label.rsplit("=", 1)[1])
    assert 0.01 <= new_lr <= 0.1  # from the measured update/weight ratio, not 3.0 / 10
    expect_whole_labels(row)
    shot(lab, page, row, "before-fix")

    fix.click()

    expect(row.locator(".tlw-fix-done")).to_contain_text("Rewound to step 0", timeout=TIMEOUT_MS)
    expect(row.locator(".tlw-fix-done")).to_contain_text(f"to {label.rsplit('=', 1)[1]}")
    expect(page.locator(".tlw-status")).to_contain_text(at_step(0), timeout=TIMEOUT_MS)
    expect_shown_resolved(page, code, step=0)
    shot(lab, page, row, "after-fix")
    state = kernel(
        lab,
        page,
        "[runner.global_step, runner.optimizer.param_groups[0]['lr'],"
        " [c.kind for c in runner.history.controls][-3:],"
        " [[b.start, b.end, b.label] for b in runner.history.branches]]",
    )
    assert state[0] == 0, f"not rewound: global step {state[0]}"
    assert state[1] == pytest.approx(new_lr)
    assert state[2] == ["checkpoint", "rewind", "set_lr"]
    assert state[3] == [[0, epoch, label]], f"the abandoned timeline: {state[3]}"
    assert kernel(lab, page, f"[{finding_expr(code)}.resolved, {finding_expr(code)}.resolved_step]") == [
        True,
        0,
    ]

    run_in_browser(lab, page, 3 * epoch)
    expect_repaired(lab, page, code, CHANCE_MLP)
    assert kernel(lab, page, "runner.optimizer.param_groups[0]['lr']") == pytest.approx(new_lr)
    expect_shown_resolved(page, code, step=0)
    shot(lab, page, row, "trained-on")
    elapsed = time.perf_counter() - t0
    print(f"lr-too-high fix in the browser: {elapsed:.1f} s")
    assert elapsed < TEST_BUDGET_S


def test_actions_that_do_not_apply_are_not_offered_as_buttons(lab):
    """(c) lr-too-high without automatic checkpoints: there is no checkpoint from before the
    damage, so the card offers only "Set lr=X" (no rewind button). Once the LR is changed by hand
    through the dashboard's LR slider, the LR the finding named is no longer in force: the card
    stays (active: the numbers have not said it is over) but offers no ``tlw-fix`` button, and the
    finding has no actions in the kernel."""
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    code = "lr-too-high"
    page = open_dashboard(lab, "fix_not_offered.ipynb", SETUP_LR_HIGH, options=", auto_checkpoints=0")
    run_in_browser(lab, page, kernel(lab, page, "len(runner.train_data)"))
    assert kernel(lab, page, "[len(runner.checkpoints), len(runner.auto_checkpoints)]") == [0, 0]
    row = card(page, code)
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    fixes = row.locator("button.tlw-fix")
    expect(fixes).to_have_count(1, timeout=TIMEOUT_MS)
    expect(fixes).to_have_text(re.compile(r"^\s*Set lr="))
    expect(page.locator(".tlw-findings button.tlw-fix", has_text="Rewind")).to_have_count(0)
    assert [
        a.startswith("Set lr=") for a in kernel(lab, page, f"[a.label for a in {finding_expr(code)}.actions]")
    ] == [True]
    shot(lab, page, row, "before-hand-change")

    # Change the LR by hand in the LR tab: type into the slider's text box.
    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="LR").click()
    readout = page.locator(".tlw-lr-group-0 .widget-readout")
    expect(readout).to_be_visible(timeout=TIMEOUT_MS)
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("1.00e-2")
    page.keyboard.press("Enter")
    lr = lab.poll(
        lambda: kernel(lab, page, "runner.optimizer.param_groups[0]['lr']"),
        lambda v: v == pytest.approx(0.01),
        timeout=20,
    )
    assert lr == pytest.approx(0.01), f"the LR slider did not reach the optimizer (lr={lr})"
    assert kernel(lab, page, "runner.history.controls[-1].kind") == "set_lr"

    show_findings(page)
    expect(row).to_have_count(1)
    expect(row.locator("button.tlw-fix")).to_have_count(0, timeout=TIMEOUT_MS)
    expect(row).not_to_have_class(re.compile(r"\btlw-finding-resolved\b"))
    assert kernel(
        lab, page, f"[[a.label for a in {finding_expr(code)}.actions], {finding_expr(code)}.resolved]"
    ) == [[], False]
    assert kernel(lab, page, "dashboard.errors.count") == 0
    shot(lab, page, row, "after-hand-change")
    elapsed = time.perf_counter() - t0
    print(f"actions not offered, in the browser: {elapsed:.1f} s")
    assert elapsed < TEST_BUDGET_S


def test_resolved_card_moves_below_active_ones_and_a_fix_mid_run_pauses_it(lab):
    """Two findings at once: the fine-tune's head left out of the optimizer (an error, listed
    first) and the model left in eval mode (a warning). Clicking "Add to optimizer" resolves the
    first, and its card moves *below* the still active eval-mode card in the page. Then, while a
    long run started from the Run button is going on, clicking "Switch to train mode" pauses the
    run (a control cannot change mid-step) and applies the fix once it has stopped: Run is enabled
    again, the run stopped by the pause, the model is in train mode (a recorded ``train_mode``
    control) and the card confirms it. A few more steps and both cards are resolved, greyed, below
    any active one, with no ``tlw-fix`` button left on them."""
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    head, mode = "param-not-in-optimizer", "eval-mode-training"
    page = open_dashboard(lab, "fix_order.ipynb", SETUP_HEAD_EVAL)
    run_in_browser(lab, page, 5)
    head_row, mode_row = card(page, head), card(page, mode)
    expect(mode_row).to_have_count(1, timeout=TIMEOUT_MS)
    codes = [c for c, _ in rows_in_order(page)]
    assert codes.index(head) < codes.index(mode), f"the error is not listed first: {codes}"
    expect(head_row.locator("button.tlw-fix")).to_have_text("Add to optimizer")
    expect(mode_row.locator("button.tlw-fix")).to_have_text("Switch to train mode")
    expect_whole_labels(head_row)
    expect_whole_labels(mode_row)
    shot(lab, page, page.locator(".tlw-findings"), "before-fix")

    head_row.locator("button.tlw-fix").click()

    expect_shown_resolved(page, head, step=5)
    codes = lab.poll(lambda: [c for c, _ in rows_in_order(page)], lambda cs: cs.index(mode) < cs.index(head))
    assert codes.index(mode) < codes.index(head), (
        f"the resolved card did not move below the active one: {codes}"
    )
    expect(mode_row).not_to_have_class(re.compile(r"\btlw-finding-resolved\b"))
    assert kernel(lab, page, "[f.code for f in runner.findings if not f.resolved]") == [mode]
    shot(lab, page, page.locator(".tlw-findings"), "after-fix")

    # A long run from the browser; the second fix is clicked while it goes on.
    box = page.locator(".tlw-run-steps input")
    box.fill("100000")
    box.press("Enter")
    lab.poll(lambda: kernel(lab, page, "dashboard.controls.steps.value"), lambda v: v == 100000, timeout=20)
    run = page.locator("button.tlw-run")
    run.click()
    expect(run).to_be_disabled(timeout=TIMEOUT_MS)
    page.wait_for_function(
        "() => { const m = document.querySelector('.tlw-status').textContent.match(/\\bstep (\\d+)\\b/);"
        " return m && parseInt(m[1]) >= 15; }",
        timeout=TIMEOUT_MS,
        polling=50,
    )
    mode_row.locator("button.tlw-fix").click()
    expect(run).to_be_enabled(timeout=TIMEOUT_MS)
    expect(mode_row.locator(".tlw-fix-done")).to_contain_text("train mode", timeout=TIMEOUT_MS)
    state = kernel(
        lab,
        page,
        "[runner.running, dashboard.last_result.stopped_by, runner.model.training,"
        " all(m.training for m in runner.model.modules()), runner.history.controls[-1].kind, runner.global_step]",
    )
    assert state[:5] == [False, "pause", True, True, "train_mode"], state
    assert 15 <= state[5] < 1000, f"the run was not paused by the click: step {state[5]}"

    run_in_browser(lab, page, 5)
    resolved = kernel(lab, page, "[[f.code, f.resolved_step] for f in runner.findings if f.resolved]")
    assert dict(resolved).keys() >= {head, mode}, resolved
    # (How far the long run got before the pause varies; a finding it raised on the way would be
    # listed active above these two: expect_shown_resolved checks the order, not that it is alone.)
    expect_shown_resolved(page, head, step=5)
    expect_shown_resolved(page, mode, step=dict(resolved)[mode])
    assert kernel(lab, page, "dashboard.errors.count") == 0
    shot(lab, page, page.locator(".tlw-findings"), "trained-on")
    elapsed = time.perf_counter() - t0
    print(f"resolved order and a fix mid-run, in the browser: {elapsed:.1f} s")
    assert elapsed < TEST_BUDGET_S
