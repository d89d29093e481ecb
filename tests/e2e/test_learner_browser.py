"""GettingStarted as a learner meets it (issue #16), in JupyterLab and Notebook 7 in Chromium.

- ``test_cell_by_cell_with_step_clicks``: the tutorial run one cell at a time, with one or two
  *Step stage* clicks in each dashboard right after it is displayed (the next cells share that
  dashboard's runner), gives no error output in any cell, to the end of the notebook.
- ``test_run_all_plots_are_readable``: after Run All, in every dashboard of the tutorial, no two
  tick labels of a bqplot axis overlap or touch; each loss plot's legend names its series;
  hovering a heatmap cell shows a tooltip with its value; and the heatmap's empty / frozen /
  measured cells (their states read from the kernel) are painted in distinct fills, all three
  states occurring in the tutorial.
- ``test_dashboard_in_notebook7``: the small dashboard notebook opened in Notebook 7
  (``/notebooks/<path>``) renders the dashboard with drawn bqplot figures, and a Step click
  changes the runner's state in the kernel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GETTING_STARTED = REPO / "notebooks" / "GettingStarted.ipynb"
SMALL_DASHBOARD = HERE / "notebooks" / "dashboard.ipynb"
TIMEOUT_MS = 60_000
CELL_TIMEOUT_S = 120.0

# --------------------------------------------------------------------------- in-page helpers

# Run code cell ``index`` alone (as Shift+Enter without moving on does), wait for its execution to
# finish, and return its error outputs. The cell's node is tagged ``data-tlw-cell`` so Playwright
# can find the widgets in its output.
_JS_RUN_CELL = """
async ([path, index, timeoutMs]) => {
  const app = window.jupyterapp;
  const panel = window.__tlwFindPanel(path);
  app.shell.activateById(panel.id);
  const notebook = panel.content;
  notebook.activeCellIndex = index;
  notebook.deselectAll();
  const cell = notebook.widgets[index];
  cell.node.setAttribute('data-tlw-cell', String(index));
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`cell ${index} did not finish within ${timeoutMs} ms`)), timeoutMs);
  });
  try { await Promise.race([app.commands.execute('notebook:run-cell'), timeout]); }
  finally { clearTimeout(timer); }
  const errors = [];
  for (let j = 0; j < cell.model.outputs.length; j++) {
    const out = cell.model.outputs.get(j).toJSON();
    if (out.output_type === 'error') errors.push(`${out.ename}: ${out.evalue}`);
  }
  return {errors, count: cell.model.executionCount};
}
"""

_JS_CODE_CELLS = """
(path) => {
  const cells = window.__tlwFindPanel(path).content.model.cells;
  const out = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type === 'code') out.push([i, cell.sharedModel.getSource()]);
  }
  return out;
}
"""

# Every rendered tick label of every axis (``g.axis``: a d3 axis group, one per bqplot Axis) under
# ``root``, with its box in page pixels. Labels not drawn (empty text, zero size: a hidden tab)
# are left out.
_JS_AXIS_LABELS = """
(root) => Array.from(root.querySelectorAll('g.axis')).map((axis) => {
  const owner = axis.closest('[class*="tlw-"]');
  const labels = Array.from(axis.querySelectorAll('g.tick text'))
    .map((t) => ({text: t.textContent.trim(), box: t.getBoundingClientRect(), style: getComputedStyle(t)}))
    .filter((t) => t.text && t.box.width > 0 && t.box.height > 0
                   && t.style.display !== 'none' && t.style.visibility !== 'hidden'
                   && parseFloat(t.style.opacity || '1') > 0)
    .map((t) => ({text: t.text, left: t.box.left, right: t.box.right, top: t.box.top, bottom: t.box.bottom}));
  const owners = owner ? Array.from(owner.classList).filter((c) => c.startsWith('tlw-')) : [];
  const title = axis.querySelector('text.axislabel');
  return {owner: owners.join('.'), label: title ? title.textContent.trim() : '', labels};
})
"""

_JS_LEGEND_TEXTS = """
(root) => Array.from(root.querySelectorAll('text.legendtext'))
  .filter((t) => t.getBoundingClientRect().width > 0)
  .map((t) => t.textContent.trim())
"""


def touching(labels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of labels whose boxes overlap or touch (share an edge): no gap between them."""
    found = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            apart = (
                a["right"] < b["left"]
                or b["right"] < a["left"]
                or a["bottom"] < b["top"]
                or b["bottom"] < a["top"]
            )
            if not apart:
                found.append((a["text"], b["text"]))
    return found


def shows_dashboard(lab, page, count: int) -> bool:
    """True when the cell run as ``In[count]`` displayed a ``tlw.Dashboard`` (its result)."""
    code = f"print(isinstance(Out.get({count}), __import__('tlwidgets').Dashboard))"
    return lab.execute(page, code).strip().splitlines()[-1] == "True"


def kernel_json(lab, page, code: str) -> Any:
    """Run ``code`` (which prints one JSON line last) in the kernel; return the parsed value."""
    out = lab.execute(page, code).strip().splitlines()
    return json.loads(out[-1])


def wait_kernel_idle(page, lab, timeout_ms: int = TIMEOUT_MS) -> None:
    page.wait_for_function(
        """(path) => {
          const panel = window.__tlwFindPanel(path);
          const kernel = panel.sessionContext.session.kernel;
          return kernel.status === 'idle';
        }""",
        arg=lab.notebook_path(page),
        timeout=timeout_ms,
        polling=50,
    )


def click_step_stage(page, lab, board, clicks: int, session: str) -> list[str]:
    """Click the dashboard's Step stage ``clicks`` times. After each click, read the stage the
    runner is at from the kernel (``session`` is the expression naming the dashboard's runner;
    the read queues behind the click's message) and wait until the highlighted chip names it.
    Returns the stages read."""
    from playwright.sync_api import expect

    button = board.locator("button.tlw-step-stage")
    current = board.locator(".tlw-stage-current")
    seen = []
    for _ in range(clicks):
        expect(button).to_be_enabled(timeout=TIMEOUT_MS)
        button.click()
        stage = lab.execute(page, f"print(({session}).stage.value)").strip().splitlines()[-1]
        if board.locator(".tlw-stage").count():  # a dashboard of some parts may have no chips
            expect(current).to_contain_text(stage, timeout=TIMEOUT_MS)
        seen.append(stage)
    return seen


# --------------------------------------------------------------------------- tests


def test_cell_by_cell_with_step_clicks(lab, record_property):
    """Issue #16, point 1: every cell of GettingStarted succeeds however the learner clicked.

    The notebook is run one code cell at a time (each finishes before the next starts). After
    every cell, the newest dashboard displayed so far whose runner can step gets one or two
    *Step stage* clicks (alternately): the one the cell just displayed, or the one the following
    cells share a runner with. Each click is confirmed by reading the runner's stage in the
    kernel and waiting until the highlighted chip names it, so the next cell meets a runner left
    mid-step. No cell may produce an error output (read from the cell models), and no output
    area may show a Python traceback on stderr.
    """
    import time

    t0 = time.perf_counter()
    page = lab.open_notebook(GETTING_STARTED)
    path = lab.notebook_path(page)
    cells = page.evaluate(_JS_CODE_CELLS, path)
    clicked: dict[int, list[str]] = {}  # cell index -> stages after the clicks that followed it
    failures: list[str] = []
    latest = None  # (cell index, dashboard locator, kernel expression of its runner)
    n_clicks = 1
    for index, source in cells:
        result = page.evaluate(_JS_RUN_CELL, [path, index, int(CELL_TIMEOUT_S * 1000)])
        wait_kernel_idle(page, lab)
        if result["count"] is None:
            failures.append(f"cell {index} did not run")
            break
        if result["errors"]:
            failures.append(f"cell {index} ({source.splitlines()[0][:60]!r}): " + "; ".join(result["errors"]))
            break  # later cells depend on this one
        if shows_dashboard(lab, page, result["count"]):
            board = page.locator(f'[data-tlw-cell="{index}"] .tlw-dashboard')
            board.wait_for(state="visible", timeout=TIMEOUT_MS)
            button = board.locator("button.tlw-step-stage")
            # A watcher's dashboard cannot step (its button is hidden or disabled).
            if button.count() and button.is_visible() and button.is_enabled():
                latest = (index, board, f"Out[{result['count']}].session")
        if latest is None:
            continue
        board_index, board, session = latest
        stages = click_step_stage(page, lab, board, n_clicks, session)
        clicked[index] = [f"dashboard of cell {board_index}: " + " -> ".join(stages)]
        n_clicks = 3 - n_clicks  # 1, 2, 1, 2 ...
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    tracebacks = [t for t in stderr.all_inner_texts() if "Traceback" in t or "Error" in t.split("\n")[-1]]
    lab.screenshot(page, "cell-by-cell")
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("clicks", json.dumps(clicked))
    assert not failures, "cells failed after Step-stage clicks:\n" + "\n".join(failures)
    assert not tracebacks, "tracebacks on stderr:\n" + "\n---\n".join(tracebacks)
    boards_clicked = {v[0].split(":")[0] for v in clicked.values()}
    assert len(boards_clicked) >= 4, f"too few dashboards were clicked: {clicked}"


# The tutorial's dashboards, read in the kernel: they are the cells' results (``Out``), in
# notebook order; for each, its parts and the state of every heatmap cell.
_KERNEL_DASHBOARDS = """
import json as _json
import tlwidgets as _tlw
from tlwidgets.ui import heatmap as _hm
_boards = [(k, v) for k, v in sorted(Out.items()) if isinstance(v, _tlw.Dashboard)]
print(_json.dumps({
    "colors": _hm.STATE_COLORS,
    "boards": [
        {
            "out": k,
            "parts": list(b.panels),
            "states": b.panels["heatmap"].states.tolist() if "heatmap" in b.panels else None,
        }
        for k, b in _boards
    ],
}))
del _boards
"""


def fill_mismatches(fills: list[list[str]], states: list[list[str]], colors: dict[str, str]) -> list[str]:
    """Cells whose drawn fill does not match their state: ``colors[state]`` for a state without a
    value, none of those fills for a measured cell."""
    if [len(r) for r in fills] != [len(r) for r in states]:
        return [f"grid {[len(r) for r in fills]} drawn, the kernel has {[len(r) for r in states]}"]
    bad = []
    for r, (row, row_states) in enumerate(zip(fills, states)):
        for c, (fill, state) in enumerate(zip(row, row_states)):
            ok = fill == colors[state] if state in colors else fill not in colors.values()
            if not ok:
                bad.append(f"cell ({r}, {c}) {state} drawn {fill}")
    return bad


def test_run_all_plots_are_readable(lab, record_property):
    """Issue #16, points 4, 6 and 7, checked in every dashboard of GettingStarted after Run All.

    (a) No two tick labels of any drawn bqplot axis (heatmap, loss, LR range test, whatever the
    dashboard shows, and the figures of each tab, opened one by one: the fit panel's) overlap or
    touch: their rendered text boxes have a gap between them.
    (b) Each loss plot (``.tlw-loss``) that draws a curve shows a legend naming its series
    ("train loss" at least).
    (c) Hovering a measured heatmap cell shows the bqplot tooltip holding the heatmap's tooltip
    widget, whose text is that cell's (``HeatmapPanel.describe`` in the kernel): its step and
    its value.
    (d) Every heatmap cell's fill matches its state read from the kernel
    (``HeatmapPanel.states``): empty cells in ``STATE_COLORS["empty"]``, frozen ones in
    ``STATE_COLORS["frozen"]``, measured ones in neither; the two fills differ, and all three
    states occur in the tutorial's dashboards (empty columns of steps not taken, the frozen
    backbone of section 4, measured cells everywhere).
    """
    import time

    from playwright.sync_api import expect

    t0 = time.perf_counter()
    page = lab.open_notebook(GETTING_STARTED)
    lab.run_all(page, timeout=300)
    t_run = time.perf_counter() - t0
    kernel = kernel_json(lab, page, _KERNEL_DASHBOARDS)
    expected = len(kernel["boards"])
    assert expected >= 5, f"{expected} dashboards in the tutorial, one a section expected"
    boards = page.locator(".jp-OutputArea-output .tlw-dashboard")
    boards.nth(expected - 1).wait_for(state="attached", timeout=TIMEOUT_MS)
    assert boards.count() == expected, f"{boards.count()} dashboards drawn, {expected} displayed"
    colors = {state: lab.css_colour(page, c) for state, c in kernel["colors"].items()}
    assert colors["empty"] != colors["frozen"], f"empty and frozen share a fill: {colors}"

    problems: list[str] = []
    states_seen: set[str] = set()
    tab_axes: list = []
    checked = {"axes": 0, "labels": 0, "legends": 0, "tooltips": 0, "heatmaps": 0}
    for i, info in enumerate(kernel["boards"]):
        board = boards.nth(i)
        board.scroll_into_view_if_needed()
        where = f"dashboard {i} (Out[{info['out']}], parts {info['parts']})"
        heatmap, loss = board.locator(".tlw-heatmap"), board.locator(".tlw-loss")
        if info["states"] is not None:
            heatmap.locator("rect.heatmapcell").first.wait_for(state="attached", timeout=TIMEOUT_MS)
        if loss.count():
            loss.locator("svg g.axis").first.wait_for(state="attached", timeout=TIMEOUT_MS)

        # (a) tick labels, every axis drawn in this dashboard, then in each of its tabs (a figure
        # in a hidden tab is laid out when its tab is shown).
        def check_axes(tab: str = "", board=board, where=where, seen_axes=set()) -> None:  # noqa: B006
            axes = lab.poll(
                lambda: (board.evaluate(_JS_AXIS_LABELS), time.sleep(0.2), board.evaluate(_JS_AXIS_LABELS)),
                lambda pair: pair[0] == pair[2],  # laid out: two reads 0.2 s apart agree
                timeout=5,
                interval=0,
            )[2]
            tab_axes.append((where, tab, [(a["owner"], a["label"], len(a["labels"])) for a in axes]))
            for axis in axes:
                key = (axis["owner"], axis["label"], tuple(label["text"] for label in axis["labels"]))
                if not axis["labels"] or key in seen_axes:
                    continue
                seen_axes.add(key)
                checked["axes"] += 1
                checked["labels"] += len(axis["labels"])
                for a, b in touching(axis["labels"]):
                    problems.append(
                        f"{where}{tab}: {axis['owner']} axis {axis['label']!r}: labels {a!r} and {b!r} touch"
                    )

        check_axes()
        tabs = board.locator(".tlw-tabs .lm-TabBar-tab")
        first_tab = tabs.first.inner_text().strip() if tabs.count() else ""
        for t in range(tabs.count()):
            tabs.nth(t).click()
            check_axes(f", tab {tabs.nth(t).inner_text().strip()!r}")
        if first_tab:
            tabs.filter(has_text=first_tab).first.click()

        # (b) the loss legend names its series (when there is one: a runner stopped before its
        # first step, as in the NaN section, has no loss to draw).
        if loss.count() and any(c["points"] for c in lab.line_curves(loss)):
            legend = loss.evaluate(_JS_LEGEND_TEXTS)
            checked["legends"] += 1
            if "train loss" not in legend:
                problems.append(f"{where}: the loss legend {legend} does not name 'train loss'")

        if info["states"] is None:
            continue
        # (d) states -> fills, against the kernel's states of the same cells.
        # Fills and the kernel's states read together until they agree: a throttled redraw may
        # still be on its way to either side right after Run All.
        states_code = f"import json; print(json.dumps(Out[{info['out']}].panels['heatmap'].states.tolist()))"
        fills, states = lab.poll(
            lambda h=heatmap, code=states_code: (lab.heatmap_fills(h), kernel_json(lab, page, code)),
            lambda pair: not fill_mismatches(pair[0], pair[1], colors),
            timeout=20,
        )
        bad = fill_mismatches(fills, states, colors)
        if bad:
            problems.append(f"{where}: {len(bad)} heatmap cells in the wrong fill, e.g. {bad[:4]}")
        states_seen.update(s for row in states for s in row)
        checked["heatmaps"] += 1

        # (c) hover a measured cell: the tooltip shows that cell's step and value.
        measured = [(r, c) for r, row in enumerate(states) for c, s in enumerate(row) if s == "measured"]
        if not measured:
            continue
        r, c = measured[len(measured) // 2]
        said = kernel_json(
            lab,
            page,
            f"import json; print(json.dumps(Out[{info['out']}].panels['heatmap'].describe({r}, {c})))",
        )
        cell = heatmap.locator("g.heatmaprow").nth(r).locator("rect.heatmapcell").nth(c)
        cell.scroll_into_view_if_needed()
        cell.hover()
        tooltip = page.locator(".bqplot_mark_tooltip .tlw-heatmap-tooltip").filter(visible=True)
        try:
            expect(tooltip).to_have_count(1, timeout=10_000)
            expect(tooltip).to_contain_text(f"step {said['step']}", timeout=10_000)
            expect(tooltip).to_contain_text(said["value"], timeout=10_000)
            checked["tooltips"] += 1
        except AssertionError as err:
            shown = tooltip.all_inner_texts()
            problems.append(
                f"{where}: hovering cell ({r}, {c}) shows {shown}, expected {said}: {str(err)[:200]}"
            )
        page.mouse.move(1, 1)
    shot = lab.screenshot(page, "run-all")
    record_property("run_all_seconds", round(t_run, 1))
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("checked", json.dumps(checked))
    record_property("tab_axes", json.dumps(tab_axes))
    assert states_seen >= {"empty", "frozen", "measured"}, (
        f"states seen in the tutorial: {sorted(states_seen)}"
    )
    assert not problems, f"(screenshot {shot})\n" + "\n".join(problems)
    assert checked["tooltips"] and checked["legends"] and checked["labels"], checked


def test_dashboard_in_notebook7(lab):
    """Issue #16, point 11: the dashboard works in Notebook 7, not only in JupyterLab.

    The small dashboard notebook is opened at ``/notebooks/<path>`` and run through the
    notebook's own Run menu (as a person does). The dashboard renders (``tlw-dashboard`` with its
    seven stage chips), its bqplot figures are drawn (heatmap cells and a loss axis in SVG, no
    "Error displaying widget"), and a *Step stage* click runs FETCH in the kernel: the runner
    moves from stage fetch to zero_grad.
    """
    from playwright.sync_api import expect

    page = lab.open_notebook7(SMALL_DASHBOARD)
    assert "/notebooks/" in page.url
    assert page.locator(".jp-LabShell").count() == 0, "this is JupyterLab, not Notebook 7"
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    board = page.locator(".tlw-dashboard")
    expect(board).to_be_visible(timeout=TIMEOUT_MS)
    expect(board.locator(".tlw-stage")).to_have_count(7, timeout=TIMEOUT_MS)
    expect(board.locator(".tlw-heatmap rect.heatmapcell").first).to_be_attached(timeout=TIMEOUT_MS)
    expect(board.locator(".tlw-loss svg g.axis").first).to_be_attached(timeout=TIMEOUT_MS)
    wait_kernel_idle(page, lab)
    assert lab.execute(page, "print(runner.stage.value)").strip() == "fetch"
    click_step_stage(page, lab, board, 1, "runner")
    assert lab.execute(page, "print(runner.stage.value)").strip() == "zero_grad"
    outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "Error displaying widget" not in outputs
    lab.screenshot(page, "notebook7")
