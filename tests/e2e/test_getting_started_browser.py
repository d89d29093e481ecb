"""GettingStarted in JupyterLab in a real browser: it runs top to bottom and every dashboard renders.

nbval runs the notebook headless (no front end); this test opens it in JupyterLab, runs all
cells and checks, for every ``tlw.Dashboard`` the notebook displays, that the widget view
rendered with its parts: status line, stage chips, the update heatmap and the loss plot as SVG,
and the findings panel.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "GettingStarted.ipynb"


def _displayed_dashboards() -> int:
    """Code cells whose last line displays a ``tlw.Dashboard`` (directly or through a name)."""
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code" or "tlw.Dashboard(" not in cell.source:
            continue
        last = cell.source.strip().splitlines()[-1].strip()
        if last.startswith("tlw.Dashboard(") or (
            last.isidentifier() and f"{last} = tlw.Dashboard(" in cell.source
        ):
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
    for i in range(expected):
        board = dashboards.nth(i)
        board.scroll_into_view_if_needed()
        assert board.is_visible(), f"dashboard {i} is not visible"
        assert board.locator(".tlw-status").count() == 1, f"dashboard {i}: no status line"
        assert board.locator(".tlw-stage").count() == 7, f"dashboard {i}: stage chips missing"
        assert board.locator(".tlw-findings").count() == 1, f"dashboard {i}: no findings panel"
        for part in ("tlw-heatmap", "tlw-loss"):
            svg = board.locator(f".{part} svg").first
            svg.wait_for(state="attached", timeout=30_000)
            box = svg.bounding_box()
            assert box is not None and box["width"] > 50 and box["height"] > 50, (
                f"dashboard {i}: {part} empty"
            )
    # No widget failed to render ("Error displaying widget" / "Loading widget..." left behind).
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not any("Error displaying widget" in text for text in outputs)
    lab.screenshot(page, "getting-started")
