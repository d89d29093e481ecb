"""Regenerate the browser-test fixture notebooks: ``python tests/e2e/make_notebooks.py``.

The notebooks are committed; this script is their source of truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMOKE_CELLS = [
    '''\
# Harness smoke test: which tlwidgets does the kernel resolve? (find_spec does not import it)
import importlib.util

spec = importlib.util.find_spec("tlwidgets")
TLW_PATH = str(next(iter(spec.submodule_search_locations))) if spec else "tlwidgets not found"''',
    """\
import bqplot as bq
import ipywidgets as widgets
from IPython.display import display

label = widgets.Label("not clicked")
label.add_class("tlw-smoke-label")
path_label = widgets.Label(TLW_PATH)
path_label.add_class("tlw-smoke-path")
button = widgets.Button(description="Click me")
button.add_class("tlw-smoke")
clicks = []


def on_click(_button):
    clicks.append(1)
    label.value = f"clicked {len(clicks)}"


button.on_click(on_click)

x_scale, y_scale = bq.LinearScale(), bq.LinearScale()
line = bq.Lines(x=[0, 1, 2, 3, 4], y=[0, 1, 4, 9, 16], scales={"x": x_scale, "y": y_scale})
figure = bq.Figure(
    marks=[line],
    axes=[bq.Axis(scale=x_scale), bq.Axis(scale=y_scale, orientation="vertical")],
    title="smoke",
    layout=widgets.Layout(width="500px", height="300px"),
)
figure.add_class("tlw-smoke-figure")
display(widgets.VBox([button, label, path_label, figure]))""",
]


def main() -> int:
    sys.path.insert(0, str(HERE))
    from conftest import write_notebook

    write_notebook(HERE / "notebooks" / "smoke.ipynb", SMOKE_CELLS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
