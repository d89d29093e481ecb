"""GettingStarted in JupyterLab in a real browser: it runs top to bottom and every dashboard renders.

nbval runs the notebook headless (no front end); this test opens it in JupyterLab, runs all
cells and checks, for every ``tlw.Dashboard`` the notebook displays, that the widget view
rendered with its parts (status line, stage chips, findings panel) and that its plots show its
runner's data: with N the global step on its status line, the loss line holds N points and the
update heatmap one row per parameter by min(N, 50) steps, grey only in frozen rows (as many as
❄ labels), in more than one colour.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "GettingStarted.ipynb"
STATUS_STEP = re.compile(r"\bstep (\d+)\b")  # "step 12 · epoch 0 · ..."; not "12 steps/s"
#: The heatmap shows the newest 50 measured steps. run() and watch() measure every one of the
#: first 200 steps, so after N steps it shows min(N, 50) columns (at least 2: bqplot squeezes a
#: single column away, so the panel pads one for the step not taken yet, grey).
HEATMAP_STEPS = 50
# The raw loss line's colour (the LossPanel default every Dashboard uses), read in the kernel so
# the test follows a change of palette; a throwaway panel, no names left in the notebook.
RAW_LOSS_COLOUR = (
    "print(__import__('tlwidgets.ui.loss').ui.loss.LossPanel(lambda _: lambda f: f).raw.colors[0])"
)


def _displayed_dashboards() -> int:
    """Code cells whose last line displays a ``tlw.Dashboard``: directly, or through a name bound to one
    in this cell or an earlier one (a trailing comment allowed)."""
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    count = 0
    bound: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        bound |= set(re.findall(r"^(\w+) = tlw\.Dashboard\(", cell.source, flags=re.M))
        last = cell.source.strip().splitlines()[-1].split("#")[0].strip() if cell.source.strip() else ""
        if last.startswith("tlw.Dashboard(") or (last.isidentifier() and last in bound):
            count += 1
    return count


def test_getting_started_dashboards_render_in_jupyterlab(lab):
    expected = _displayed_dashboards()
    assert expected >= 5  # the tutorial's sections each show one

    page = lab.open_notebook(NOTEBOOK)
    lab.run_all(page, timeout=300)

    dashboards = page.locator(".jp-OutputArea-output .tlw-dashboard")
    dashboards.nth(expected - 1).wait_for(state="attached", timeout=60_000)
    assert dashboards.count() == expected
    raw_colour = lab.execute(page, RAW_LOSS_COLOUR).strip().splitlines()[-1]  # after any warning
    for i in range(expected):
        board = dashboards.nth(i)
        board.scroll_into_view_if_needed()
        assert board.is_visible(), f"dashboard {i} is not visible"
        assert board.locator(".tlw-status").count() == 1, f"dashboard {i}: no status line"
        if board.locator(".tlw-heatmap").count() == 0:  # a view of some panels (parts=["lr"])
            assert board.locator(".tlw-lr-panel svg").count() >= 1, f"dashboard {i}: no LR plot"
            continue
        assert board.locator(".tlw-stage").count() == 7, f"dashboard {i}: stage chips missing"
        assert board.locator(".tlw-findings").count() == 1, f"dashboard {i}: no findings panel"
        for part in ("tlw-heatmap", "tlw-loss"):
            svg = board.locator(f".{part} svg").first
            svg.wait_for(state="attached", timeout=30_000)
            box = svg.bounding_box()
            assert box is not None and box["width"] > 50 and box["height"] > 50, (
                f"dashboard {i}: {part} empty"
            )
        status = board.locator(".tlw-status").inner_text()
        match = STATUS_STEP.search(status)
        assert match, f"dashboard {i}: no step on the status line {status!r}"
        steps = int(match.group(1))
        # Every step of the tutorial's short runs is kept and drawn (no decimation below 1500).
        try:
            if steps:  # (a run stopped before its first step, section 5's NaN, has no line to draw)
                lab.expect_line_points(board.locator(".tlw-loss"), raw_colour, steps)
        except AssertionError as err:
            raise AssertionError(f"dashboard {i} at step {steps}: {err}") from None
        # Every row is as long as the steps say (the row count comes from the page: the tutorial's
        # models differ). Which cell is empty, frozen or measured is checked against the kernel's
        # HeatmapPanel.states in test_learner_browser.py::test_run_all_plots_are_readable.
        heatmap = board.locator(".tlw-heatmap")
        rows = heatmap.locator("g.heatmaprow").count()
        columns = max(2, min(HEATMAP_STEPS, steps))
        fills = lab.heatmap_fills(heatmap)
        assert rows >= 2, f"dashboard {i}: {rows} heatmap rows"
        assert len(fills) == rows and {len(r) for r in fills} == {columns}, (
            f"dashboard {i} at step {steps}: heatmap {len(fills)} rows of {sorted({len(r) for r in fills})} "
            f"cells, expected {rows} x {columns}"
        )
        if steps:  # a frozen parameter is grey at the steps it was frozen; the rest are coloured
            colours = {f for row in fills for f in row}
            assert len(colours) > 2, f"dashboard {i}: the heatmap shows only {colours}"
    # No widget failed to render ("Error displaying widget" / "Loading widget..." left behind).
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not any("Error displaying widget" in text for text in outputs)
    lab.screenshot(page, "getting-started")
