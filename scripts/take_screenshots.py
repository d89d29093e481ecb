"""Retake the documentation's screenshots in a real browser (JupyterLab in headless Chromium).

    python scripts/take_screenshots.py            # writes docs/img/dashboard.png
    python scripts/take_screenshots.py --out DIR  # somewhere else, to look at first

It reuses the browser-test harness (``tests/e2e/conftest.py``: the JupyterLab server with
isolated settings, the Chromium flags) and needs what the browser tests need: the ``test`` extra
and Chromium at ``/usr/bin/chromium`` (or ``TLW_CHROMIUM``).

``dashboard.png`` (README and ``docs/dashboard.md``) is the dashboard of the tutorial's
fine-tuning section (GettingStarted section 4): a pretrained backbone frozen for one epoch while
the new head trains, then its top block unfrozen at a 10x lower learning rate for a second
epoch. It shows the controls and stage chips, the update/weight heatmap with the frozen steps
grey and its colour key, the loss with its legend and the freeze/unfreeze markers, the history of
the unfrozen block's weights (a heatmap cell clicked) and the Freeze tab. Each PNG is checked to
stay under ``MAX_KB``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "tests" / "e2e"
MAX_KB = 300
TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1400, "height": 2000}  # tall enough for the whole dashboard below the toolbar

#: The tutorial's section 4, as a notebook of its own (the same data, model and calls).
FINE_TUNING = [
    """\
import torch
from torch import nn
from torch.utils.data import DataLoader

import tlwidgets as tlw
from tlwidgets.zoo import digits

torch.manual_seed(0)
split = digits.split_digits()
train_loader = DataLoader(split.finetune_train, batch_size=32, shuffle=True)
val_loader = DataLoader(split.finetune_val, batch_size=256)
model = digits.DigitsNet(digits.pretrained_backbone(), nn.Linear(digits.DigitsBackbone.out_features, 5))
optimizer = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader)
runner.freeze("backbone", bn_eval=True)
runner.run(epochs=1)
runner.unfreeze("backbone.conv3", "backbone.bn3", lr=3e-4)  # the top block, 10x lower LR
runner.run(epochs=1)""",
    """\
dashboard = tlw.Dashboard(runner)
dashboard""",
]
#: The parameter whose history the screenshot shows (a heatmap cell of its row is clicked).
SELECTED = "backbone.conv3.weight"


def load_harness():
    """``tests/e2e/conftest.py`` as a module (its server class, Chromium flags, page scripts)."""
    spec = importlib.util.spec_from_file_location("tlw_e2e_harness", E2E / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_print(page, path: str, code: str, harness) -> str:
    result = page.evaluate(harness._JS_EXECUTE, [path, code, 60_000])
    if result["error"]:
        raise RuntimeError(f"kernel code failed: {result['error']}\n{code}")
    return result["out"].strip()


def take_dashboard(harness, server, browser, out: Path) -> Path:
    """The fine-tuning dashboard, Freeze tab open, one parameter's history shown."""
    folder = server.root_dir / "screenshots"
    notebook = harness.write_notebook(folder / "fine_tuning.ipynb", FINE_TUNING)
    rel = notebook.relative_to(server.root_dir).as_posix()
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(f"{server.url}/lab/tree/{urllib.parse.quote(rel)}?token={server.token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell !== undefined")
        page.evaluate("async () => { await window.jupyterapp.restored; }")
        page.evaluate(harness._JS_FIND_PANEL)
        page.wait_for_function(harness._JS_KERNEL_READY, arg=rel, polling=100)
        page.evaluate(harness._JS_START_RUN_ALL, rel)
        page.wait_for_function("() => window.__tlwRunAll && window.__tlwRunAll.done", polling=100)
        errors = page.evaluate(harness._JS_CELL_ERRORS, rel)
        if errors:
            raise RuntimeError("the screenshot notebook failed:\n" + "\n".join(errors))
        # Collapse the code cells' inputs: the picture is the dashboard.
        page.evaluate("""() => window.jupyterapp.commands.execute('notebook:hide-all-cell-code')""")
        dash = page.locator(".tlw-dashboard")
        dash.locator(".tlw-heatmap rect.heatmapcell").first.wait_for(state="attached")
        row = json.loads(kernel_print(page, rel, f"print(runner.param_names.index({SELECTED!r}))", harness))
        cells = dash.locator(".tlw-heatmap g.heatmaprow").nth(row).locator("rect.heatmapcell")
        cells.nth(cells.count() - 1).click()
        history = dash.locator(".tlw-param-history")
        history.locator("svg text", has_text=SELECTED).first.wait_for(state="visible")
        # Drawn, not only attached: a curve with its points, in a figure laid out on the page.
        history.evaluate(
            """async (root) => {
              const drawn = () => Array.from(root.querySelectorAll('.curve path.line')).some((p) =>
                (p.getAttribute('d') || '').split(/[ML]/).length > 10
                && p.getBoundingClientRect().width > 50);
              for (let i = 0; i < 600 && !drawn(); i++) await new Promise((r) => setTimeout(r, 50));
              if (!drawn()) throw new Error('the parameter history was not drawn');
            }"""
        )
        dash.locator(".tlw-tabs .lm-TabBar-tab", has_text="Freeze").click()
        dash.locator("[class*='tlw-freeze']").first.wait_for(state="visible")
        page.mouse.move(1, 1)  # no hover tooltip in the picture
        page.evaluate("() => document.fonts.ready")
        # Let bqplot's transitions end (two animation frames after the last redraw).
        page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        # The dashboard whole, below Lab's toolbar (an element screenshot shows what covers it).
        page.evaluate(
            """() => { const s = document.querySelector('.jp-WindowedPanel-outer, .jp-Notebook');
                       if (s) s.scrollTop = 0; }"""
        )
        path = out / "dashboard.png"
        dash.screenshot(path=str(path), animations="disabled")
        return path
    finally:
        context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    harness = load_harness()
    chromium = harness.chromium_path()
    if chromium is None:
        print("no Chromium executable (apt-get install -y chromium, or set TLW_CHROMIUM)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    written = []
    with tempfile.TemporaryDirectory(prefix="tlw-screens-") as base:
        server = harness.JupyterServer(Path(base))
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium,
                    headless=os.environ.get("TLW_E2E_HEADED", "") in ("", "0"),
                    args=harness.CHROMIUM_ARGS,
                )
                try:
                    written.append(take_dashboard(harness, server, browser, args.out))
                finally:
                    browser.close()
        finally:
            server.stop()
    too_big = []
    for path in written:
        kb = path.stat().st_size / 1024
        print(f"{path} ({kb:.0f} KB)")
        if kb > MAX_KB:
            too_big.append(path)
    if too_big:
        print(f"over {MAX_KB} KB: {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
