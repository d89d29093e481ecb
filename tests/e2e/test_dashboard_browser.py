"""The Dashboard in a real browser: JupyterLab and Voila in headless Chromium, driven by Playwright.

One Lab test drives the dashboard of ``notebooks/dashboard.ipynb`` and checks, in the browser
and in the kernel: Step stage moves the current chip (latency measured in the page over 20
clicks, p95 <= 250 ms); Run then Pause stops the step counter (pause latency <= one step +
200 ms); the heatmap draws one cell per parameter and measured step shown, in more than one
colour, and the loss line one point per step taken; the LR slider's text box changes the
optimizer's LR; a freeze toggle changes ``requires_grad`` and greys exactly the frozen rows.
A second test renders the same notebook with Voila and steps a stage there.

Files: the screenshot of the dashboard goes to ``tests/e2e/artifacts/dashboard.png`` and the
latencies to ``tests/e2e/artifacts/latency.json`` (the folder is git-ignored). The README image
``docs/img/dashboard.png`` is replaced only on purpose, from a passing run:
``TLW_UPDATE_SCREENSHOT=1 python -m pytest tests/e2e/test_dashboard_browser.py``.

The notebook is generated from ``CELLS`` below: ``python tests/e2e/test_dashboard_browser.py``
rewrites it (a test checks the committed file matches).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "notebooks" / "dashboard.ipynb"
REPO = HERE.parents[1]
SCREENSHOT = REPO / "docs" / "img" / "dashboard.png"
UPDATE_SCREENSHOT = os.environ.get("TLW_UPDATE_SCREENSHOT", "") == "1"
TIMEOUT_MS = 60_000

#: The notebook's MLP: three Linear layers, a weight and a bias each (param i is DOM row i).
N_PARAMS = 6
FROZEN_ROWS = [2, 3]  # 2.weight and 2.bias, frozen through the toggle of module "2"
#: The heatmap shows the newest 50 measured steps; a frozen row is this grey.
HEATMAP_STEPS = 50
GREY = "#d0d0d0"
#: A cell without data (a step not taken yet) is white (tlwidgets.ui.heatmap.EMPTY_COLOR).
EMPTY = "#ffffff"
#: The loss line holds every step up to this many (then it is decimated).
LOSS_MAX_POINTS = 1500

#: Budgets (DESIGN.md section 7).
STEP_CLICK_P95_MS = 250.0
PAUSE_EXTRA_MS = 200.0
STAGES = ["fetch", "zero_grad", "to_device", "forward", "loss", "backward", "step"]

CELLS = [
    """\
# A small Runner for the dashboard's browser test: a tiny MLP on generated data.
import torch
from torch import nn

import tlwidgets as tlw

torch.set_num_threads(1)
torch.manual_seed(0)
centers = torch.randn(4, 20) * 2
labels = torch.randint(0, 4, (2048,))
inputs = centers[labels] + torch.randn(2048, 20)
train = [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, 1792, 32)]
val = [(inputs[i : i + 128], labels[i : i + 128]) for i in range(1792, 2048, 128)]
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train, val_data=val)""",
    """\
dashboard = tlw.Dashboard(runner)
dashboard""",
]


def write_notebook(path: Path = NOTEBOOK) -> Path:
    """Write ``CELLS`` as a notebook (stable cell ids, python3 kernelspec)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


# In-page measurements: the time from a click to the DOM change, without Playwright's round trips.
_JS_CLICK_UNTIL = """
async ([clickSelector, waitSelector, text, timeoutMs]) => {
  const done = () => {
    const el = document.querySelector(waitSelector);
    if (!el) return false;
    return text === null ? true : el.textContent.trim() === text;
  };
  const button = document.querySelector(clickSelector);
  if (!button) throw new Error('nothing matches ' + clickSelector);
  return await new Promise((resolve, reject) => {
    let t0 = 0;
    const observer = new MutationObserver(() => {
      if (done()) { observer.disconnect(); resolve(performance.now() - t0); }
    });
    observer.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
    const timer = setTimeout(() => { observer.disconnect(); reject(new Error('timed out waiting for ' + waitSelector)); }, timeoutMs);
    t0 = performance.now();
    button.click();
  });
}
"""

_JS_STATUS_STEP = """
() => {
  const el = document.querySelector('.tlw-status');
  const m = el && el.textContent.match(/\\bstep (\\d+)\\b/);
  return m ? parseInt(m[1]) : -1;
}
"""

_JS_HISTORY_DRAWN = """
() => {
  const area = document.querySelector('.tlw-param-history .plotarea_background');
  const line = document.querySelector('.tlw-param-history path.line');
  return !!area && area.getBoundingClientRect().width > 100 && !!line && (line.getAttribute('d') || '').length > 20;
}
"""


def status_step(page) -> int:
    return page.evaluate(_JS_STATUS_STEP)


def at_step(n: int) -> re.Pattern:
    """The status line's "step N" for exactly N: "step 1" must not match "step 10"."""
    return re.compile(rf"\bstep {n}\b")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def kernel_value(lab, page, expr: str) -> str:
    return lab.execute(page, f"print({expr})").strip()


def test_notebook_matches_cells():
    import nbformat

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert [c.source for c in nb.cells] == CELLS, (
        "run python tests/e2e/test_dashboard_browser.py to regenerate"
    )


def test_dashboard_in_jupyterlab(lab, record_property):
    from playwright.sync_api import expect

    t_start = time.perf_counter()
    page = lab.open_notebook(NOTEBOOK)
    lab.run_all(page)
    dash = page.locator(".tlw-dashboard")
    expect(dash).to_be_visible(timeout=TIMEOUT_MS)
    for css in ("tlw-step-stage", "tlw-step", "tlw-run", "tlw-pause"):
        expect(page.locator(f"button.{css}")).to_be_visible()
    expect(page.locator(".tlw-stage")).to_have_count(7)
    current = page.locator(".tlw-stage-current")
    expect(current).to_have_text("1 fetch", timeout=TIMEOUT_MS)
    expect(page.locator(".tlw-status")).to_contain_text(at_step(0))

    # -- Step stage moves the current chip; latency measured in the page, 20 clicks.
    latencies = []
    for i in range(21):
        nxt = (i + 1) % 7
        ms = page.evaluate(
            _JS_CLICK_UNTIL,
            ["button.tlw-step-stage", ".tlw-stage-current", f"{nxt + 1} {STAGES[nxt]}", 10_000],
        )
        latencies.append(ms)
    expect(current).to_have_text("1 fetch")
    assert kernel_value(lab, page, "runner.global_step") == "3"
    expect(page.locator(".tlw-status")).to_contain_text(at_step(3))
    assert page.locator(".tlw-stage.tlw-stage-ok").count() == 7
    step_p95 = p95(latencies[1:])  # the first click also loads the record machinery: reported, not judged
    print(
        f"Step stage click -> current chip: p95 {step_p95:.0f} ms, median {statistics.median(latencies):.0f} ms"
    )

    # -- Run, then Pause: the step counter stops.
    page.locator(".tlw-run-steps input").fill("100000")
    page.locator(".tlw-run-steps input").press("Enter")
    start_step = status_step(page)
    page.locator("button.tlw-run").click()
    page.wait_for_function(
        f"() => ({_JS_STATUS_STEP})() >= {start_step + 100}", timeout=TIMEOUT_MS, polling=50
    )
    expect(page.locator("button.tlw-pause")).to_be_enabled()
    rate_text = page.locator(".tlw-status").inner_text()
    rate = float(re.search(r"([\d.]+) steps/s", rate_text).group(1))
    pause_ms = page.evaluate(
        _JS_CLICK_UNTIL, ["button.tlw-pause", "button.tlw-run:not([disabled])", None, 10_000]
    )
    stopped_at = status_step(page)
    time.sleep(1.0)  # the counter must not move any more
    assert status_step(page) == stopped_at, "the step counter kept increasing after Pause"
    kernel_pause_ms = 1000 * float(kernel_value(lab, page, "dashboard.pause_latency_s"))
    kernel_step = int(kernel_value(lab, page, "runner.global_step"))
    assert kernel_step == stopped_at
    assert kernel_value(lab, page, "runner.running") == "False"
    assert kernel_value(lab, page, "dashboard.last_result.stopped_by") == "pause"
    step_ms = 1000.0 / rate if rate > 0 else float("inf")
    print(
        f"Run at {rate:.0f} steps/s ({step_ms:.1f} ms/step); Pause click -> run stopped: {pause_ms:.0f} ms "
        f"(in the kernel: {kernel_pause_ms:.0f} ms)"
    )

    # -- The plots hold the run's data (not just an SVG): one heatmap cell per parameter and
    # measured step shown, not all one colour and none grey (nothing is frozen yet), and one loss
    # point per step taken.
    heatmap, loss = page.locator(".tlw-heatmap"), page.locator(".tlw-loss")
    assert int(kernel_value(lab, page, "len(runner.param_names)")) == N_PARAMS
    measured = int(kernel_value(lab, page, "runner.history.measured_count"))
    assert measured >= HEATMAP_STEPS, f"only {measured} measured steps after {stopped_at} steps"
    lab.expect_heatmap(heatmap, rows=N_PARAMS, columns=HEATMAP_STEPS, grey=GREY)
    raw_colour = kernel_value(lab, page, "dashboard.loss.raw.colors[0]")
    assert stopped_at < LOSS_MAX_POINTS, "the run went so far that the loss line is decimated"
    lab.expect_line_points(loss, raw_colour, stopped_at)
    outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "Figure(" not in outputs

    # -- Freeze toggle: requires_grad changes in the kernel, exactly the frozen rows turn grey
    # (all their cells, past steps included) and get a ❄ label.
    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="Freeze").click()
    toggle = page.locator("button.tlw-freeze-2")
    expect(toggle).to_have_text(re.compile("trainable"))
    toggle.click()
    expect(toggle).to_have_text(re.compile("frozen"), timeout=TIMEOUT_MS)
    assert (
        kernel_value(lab, page, "model[2].weight.requires_grad, model[2].bias.requires_grad") == "False False"
    )
    frozen = "[i for i, n in enumerate(runner.param_names) if not model.get_parameter(n).requires_grad]"
    assert kernel_value(lab, page, frozen) == str(FROZEN_ROWS)
    expect(page.locator(".tlw-heatmap svg text", has_text="❄ 2.weight")).to_have_count(1, timeout=TIMEOUT_MS)
    lab.expect_heatmap(heatmap, rows=N_PARAMS, columns=HEATMAP_STEPS, grey=GREY, grey_rows=FROZEN_ROWS)

    # -- LR slider: type a value in its text box; the optimizer's LR changes in the kernel.
    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="LR").click()
    readout = page.locator(".tlw-lr-group-0 .widget-readout")
    expect(readout).to_be_visible()
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("1.00e-3")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 20
    lr = None
    while time.monotonic() < deadline:
        lr = float(kernel_value(lab, page, "optimizer.param_groups[0]['lr']"))
        if abs(lr - 1e-3) < 1e-9:
            break
        time.sleep(0.1)
    assert lr == pytest.approx(1e-3), f"the LR slider did not reach the optimizer (lr={lr})"
    expect(page.locator(".tlw-lr-panel")).to_contain_text("1.000e-03")

    # -- A few more steps so the screenshot shows the freeze and LR markers on the loss.
    page.locator("button.tlw-step").click()
    expect(page.locator(".tlw-status")).to_contain_text(at_step(stopped_at + 1), timeout=TIMEOUT_MS)
    lab.expect_line_points(loss, raw_colour, stopped_at + 1)
    lab.expect_heatmap(heatmap, rows=N_PARAMS, columns=HEATMAP_STEPS, grey=GREY, grey_rows=FROZEN_ROWS)
    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="Findings").click()
    # Select a parameter by clicking a cell in row 4 (4.weight): its history appears.
    page.locator(".tlw-heatmap svg rect.heatmapcell").nth(4 * HEATMAP_STEPS + 25).click()
    expect(page.locator(".tlw-param-history svg path.line").first).to_be_attached(timeout=TIMEOUT_MS)
    expect(page.locator(".tlw-param-history")).to_contain_text("4.weight")
    page.wait_for_function(_JS_HISTORY_DRAWN, timeout=TIMEOUT_MS)  # laid out, not just attached
    assert kernel_value(lab, page, "dashboard.selected_param") == "4.weight"
    assert kernel_value(lab, page, "dashboard.errors.count") == "0"
    # For the screenshot: the loss on a log scale and the freeze tree (with the frozen module).
    page.locator(".tlw-loss input[type=checkbox]").check()
    lab.expect_line_points(loss, raw_colour, stopped_at + 1)  # every loss is > 0: none dropped
    page.locator(".tlw-tabs .lm-TabBar-tab", has_text="Freeze").click()
    expect(page.locator("button.tlw-freeze-2")).to_be_visible()
    page.wait_for_function(_JS_HISTORY_DRAWN, timeout=TIMEOUT_MS)

    # A tall viewport so the whole dashboard is on screen (no Lab toolbar over it).
    page.set_viewport_size({"width": 1400, "height": 1800})
    page.wait_for_function(_JS_HISTORY_DRAWN, timeout=TIMEOUT_MS)
    dash.scroll_into_view_if_needed()
    # Into the git-ignored artifacts folder: a plain test run leaves the tracked README image alone.
    shot = lab.artifact("dashboard.png")
    dash.screenshot(path=str(shot), animations="disabled")
    size_kb = shot.stat().st_size / 1024

    results = {
        "step_click_to_chip_ms": {
            "p95": round(step_p95, 1),
            "median": round(statistics.median(latencies), 1),
            "max": round(max(latencies), 1),
            "samples": [round(v, 1) for v in latencies],
            "budget_p95": STEP_CLICK_P95_MS,
        },
        "pause_ms": {
            "measured": round(pause_ms, 1),
            "kernel_side": round(kernel_pause_ms, 1),
            "step_ms": round(step_ms, 2),
            "steps_per_s": rate,
            "budget": round(step_ms + PAUSE_EXTRA_MS, 1),
        },
        "screenshot_kb": round(size_kb, 1),
        "test_s": round(time.perf_counter() - t_start, 1),
    }
    lab.artifact("latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    for key in ("p95", "median"):
        record_property(f"step_click_{key}_ms", results["step_click_to_chip_ms"][key])
    record_property("pause_ms", results["pause_ms"]["measured"])

    assert step_p95 <= STEP_CLICK_P95_MS, f"Step click -> chip p95 {step_p95:.0f} ms > {STEP_CLICK_P95_MS} ms"
    assert pause_ms <= step_ms + PAUSE_EXTRA_MS, (
        f"Pause took {pause_ms:.0f} ms > one step + {PAUSE_EXTRA_MS} ms"
    )
    assert size_kb < 300, f"screenshot is {size_kb:.0f} KB"
    if UPDATE_SCREENSHOT:  # on purpose only, and only from a run that passed every check above
        shutil.copyfile(shot, SCREENSHOT)
        print(f"updated {SCREENSHOT.relative_to(REPO)} from {shot}")


def test_dashboard_in_voila(lab):
    from playwright.sync_api import expect

    page = lab.voila(NOTEBOOK)
    expect(page.locator(".tlw-dashboard")).to_be_visible(timeout=90_000)
    expect(page.locator(".tlw-stage")).to_have_count(7)
    current = page.locator(".tlw-stage-current")
    expect(current).to_have_text("1 fetch", timeout=TIMEOUT_MS)
    for css in ("tlw-step-stage", "tlw-step", "tlw-run", "tlw-pause"):
        expect(page.locator(f"button.{css}")).to_be_visible()
    page.locator("button.tlw-step-stage").click()
    expect(current).to_have_text("2 zero_grad", timeout=TIMEOUT_MS)
    page.locator("button.tlw-step").click()
    expect(page.locator(".tlw-status")).to_contain_text(at_step(1), timeout=TIMEOUT_MS)
    # One measured step: bqplot squeezes a one-column grid away, so the heatmap pads a second
    # column for the step not taken yet, white (empty), not the grey of a frozen row (#16).
    lab.expect_heatmap(page.locator(".tlw-heatmap"), rows=N_PARAMS, columns=2, grey=EMPTY, grey_columns=[1])
    # No kernel access from the test here to read the raw loss colour: after one step exactly two
    # lines hold data, the raw and the smoothed loss, one point each (the others are empty).
    curves = lab.poll(
        lambda: lab.line_curves(page.locator(".tlw-loss")),
        lambda cs: sorted(c["points"] for c in cs if c["points"]) == [1, 1],
    )
    assert sorted(c["points"] for c in curves if c["points"]) == [1, 1], (
        f"loss lines after one step: {curves}"
    )


if __name__ == "__main__":
    print(write_notebook())
