"""Smoke test of the browser harness: widgets render, a click makes a kernel round trip, bqplot
draws SVG, and the same notebook renders in Voila."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SMOKE = Path(__file__).resolve().parent / "notebooks" / "smoke.ipynb"
SMOKE_POINTS = 5  # the smoke figure's line: x=[0, 1, 2, 3, 4] (tests/e2e/make_notebooks.py)
REPO_TLWIDGETS = Path(__file__).resolve().parents[2] / "tlwidgets"
TIMEOUT_MS = 60_000


def test_lab_widgets_roundtrip_and_bqplot(lab, record_property):
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    page = lab.open_notebook(SMOKE)
    t_open = time.perf_counter()
    lab.run_all(page)
    t_run = time.perf_counter()

    button = page.locator("button.tlw-smoke")
    expect(button).to_be_visible(timeout=TIMEOUT_MS)
    expect(button).to_have_text("Click me")
    label = page.locator(".tlw-smoke-label")
    expect(label).to_have_text("not clicked", timeout=TIMEOUT_MS)

    # The kernel imports this repository's tlwidgets (PYTHONPATH or the editable install).
    expect(page.locator(".tlw-smoke-path")).to_have_text(str(REPO_TLWIDGETS), timeout=TIMEOUT_MS)

    # Kernel round trip: the click handler runs in the kernel and sets the label's value.
    button.click()
    expect(label).to_have_text("clicked 1", timeout=TIMEOUT_MS)
    button.click()
    expect(label).to_have_text("clicked 2", timeout=TIMEOUT_MS)
    assert lab.execute(page, "print(len(clicks))").strip() == "2"

    # bqplot rendered the line with all its points; a failed render shows the widget's text repr
    # ("Figure(...)") instead, and a path that exists but lost its data would have fewer points.
    figure = page.locator(".tlw-smoke-figure")
    expect(figure.locator("svg path.line").first).to_be_attached(timeout=TIMEOUT_MS)
    # Poll: the path element can be attached a moment before bqplot sets its data.
    curves = lab.poll(lambda: lab.line_curves(figure), lambda cs: [c["points"] for c in cs] == [SMOKE_POINTS])
    assert [c["points"] for c in curves] == [SMOKE_POINTS], f"bqplot lines: {curves}"
    outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "Figure(" not in outputs, f"bqplot fell back to its text repr:\n{outputs}"
    t_done = time.perf_counter()

    record_property("lab_open_s", round(t_open - t0, 2))
    record_property("run_all_s", round(t_run - t_open, 2))
    record_property("asserts_s", round(t_done - t_run, 2))
    print(f"lab open {t_open - t0:.1f} s, run all {t_run - t_open:.1f} s, checks {t_done - t_run:.1f} s")


def test_voila_renders_widgets(lab, record_property):
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    page = lab.voila(SMOKE)
    button = page.locator("button.tlw-smoke")
    expect(button).to_be_visible(timeout=90_000)
    label = page.locator(".tlw-smoke-label")
    expect(label).to_have_text("not clicked", timeout=TIMEOUT_MS)
    button.click()
    expect(label).to_have_text("clicked 1", timeout=TIMEOUT_MS)
    figure = page.locator(".tlw-smoke-figure")
    expect(figure.locator("svg path.line").first).to_be_attached(timeout=TIMEOUT_MS)
    # Poll: the path element can be attached a moment before bqplot sets its data.
    curves = lab.poll(lambda: lab.line_curves(figure), lambda cs: [c["points"] for c in cs] == [SMOKE_POINTS])
    assert [c["points"] for c in curves] == [SMOKE_POINTS], f"bqplot lines in Voila: {curves}"
    elapsed = time.perf_counter() - t0
    record_property("voila_s", round(elapsed, 2))
    print(f"voila render + click {elapsed:.1f} s")


def test_run_all_reports_cell_errors(lab):
    """The harness must not pass a notebook whose cells raise (in Lab, run-all stops at the error)."""
    notebook = lab.write_notebook("broken.ipynb", ["x = 41", "raise ValueError('boom')", "x += 1"])
    page = lab.open_notebook(notebook)
    errors = lab.run_all(page, check=False)
    assert errors == ["cell 1: ValueError: boom"]
    with pytest.raises(pytest.fail.Exception, match="ValueError: boom"):
        lab.run_all(page)
    # Cells queued after the failing one may or may not run (the kernel's stop_on_error abort is
    # timing dependent), so only check that the kernel still answers with the notebook's state.
    assert lab.execute(page, "print(x >= 41)").strip() == "True"
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        lab.execute(page, "1 / 0")
