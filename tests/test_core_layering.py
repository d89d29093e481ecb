"""Layering: using the runner loads no UI library; the core's source imports none (nor diagnostics/ui)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "tlwidgets" / "core"
UI_LIBS = ("ipywidgets", "bqplot", "IPython")
FORBIDDEN_IN_CORE = (*UI_LIBS, "tlwidgets.diagnostics", "tlwidgets.ui", "traitlets", "ipykernel")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import tlwidgets as tlw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, val_data=data[:1])
    for _ in range(7):
        runner.step_stage()
    result = runner.run(epochs=1)
    assert runner.global_step == 3 and result.stopped_by == "epochs", result
    ck = runner.checkpoint()
    runner.freeze("0"); runner.unfreeze("0", lr=0.01); runner.set_lr(0.05)
    runner.run(steps=2); runner.rewind(ck)
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss()) as w:
        for x, y in data:
            opt.zero_grad(); nn.CrossEntropyLoss()(model(x), y).backward(); opt.step()
    assert w.global_step == 3
    runner.findings; w.findings; runner.history.loss
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"ipywidgets", "bqplot", "IPython"})
    assert not loaded, loaded
    print("OK")
    """
)


def test_using_the_runner_loads_no_ui_library():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def _imports(path: Path, package: str = "tlwidgets.core") -> list[tuple[int, str]]:
    """Every module named by an import anywhere in the file (functions included; relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{a.name}") for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IN_CORE)


CORE_FILES = sorted(CORE.glob("*.py"))


def test_core_sources_exist():
    assert {"runner.py", "watch.py", "stats.py", "history.py"} <= {p.name for p in CORE_FILES}


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_no_ui_diagnostics_or_ui_package(path):
    bad = [(line, mod) for line, mod in _imports(path) if _forbidden(mod)]
    assert not bad, f"{path.name} imports {bad}"
    # Belt and braces: no string mention of the UI libraries as an import target either.
    text = path.read_text(encoding="utf-8")
    for lib in UI_LIBS:
        assert f"import {lib}" not in text and f"from {lib}" not in text, (path.name, lib)


def test_import_checker_catches_a_nested_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    import ipywidgets.widgets\n    from tlwidgets.ui import x\n"
        "from ..diagnostics import engine\nimportlib.import_module('bqplot')\n"
    )
    assert sorted(m for _, m in _imports(sample) if _forbidden(m)) == [
        "bqplot",
        "ipywidgets.widgets",
        "tlwidgets.diagnostics",
        "tlwidgets.diagnostics.engine",
        "tlwidgets.ui",
        "tlwidgets.ui.x",
    ]
