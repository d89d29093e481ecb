"""Packaging invariants: the README's test command is what CI runs, torch is pinned, the
project metadata declares the extras the README and CI rely on."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(marker: str) -> str:
    lines = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith("pip install torch==2.13.0 && ") and marker in line
    ]
    assert len(lines) == 1, f"README must hold exactly one command containing {marker!r}: {lines}"
    return lines[0]


def _ci_test_line() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_LINE='([^']*)'$", text, flags=re.MULTILINE)
    assert match, ".ci/run must define TEST_LINE='...' on one line"
    assert 'eval "${TEST_LINE}"' in text, ".ci/run must run TEST_LINE"
    return match.group(1)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_readme_test_line_is_the_ci_line():
    readme = _readme_command("python -m pytest")
    assert readme == _ci_test_line()
    assert readme == (
        'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[test]" && python -m pytest'
    )
    shlex.split(readme)  # well-formed shell words


def test_readme_tutorial_line():
    assert _readme_command("jupyter lab") == (
        'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[notebook]" '
        "&& jupyter lab notebooks/GettingStarted.ipynb"
    )


def test_ci_script_is_strict_and_executable():
    path = ROOT / ".ci" / "run"
    text = path.read_text()
    assert text.startswith("#!")
    assert "set -euo pipefail" in text
    assert "python -m pip install torch==2.13.0" in text
    assert "apt-get install -y" in text and "chromium" in text
    assert path.stat().st_mode & 0o111, ".ci/run must be executable"
    # A pytest exit status of 5 (no tests collected) must fail CI, never be swallowed.
    assert re.search(r'^eval "\$\{TEST_LINE\}" \|\| status=\$\?$', text, flags=re.MULTILINE)
    assert text.rstrip().endswith('exit "${status}"')


def test_constraints_pin_torch():
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    assert "torch==2.13.0" in lines


def test_pyproject_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "tlwidgets"
    assert project["version"] == "0.1.0"
    assert project["requires-python"] == ">=3.9"
    deps = project["dependencies"]
    for req in ("torch>=2.1,<3", "numpy>=1.23", "ipywidgets>=8,<9", "bqplot>=0.13"):
        assert req in deps
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["tlwidgets*"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_pyproject_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert {"notebook", "test", "export"} <= set(extras)
    assert {"jupyterlab", "scikit-learn"} <= _names(extras["notebook"])
    assert {"pandas", "tensorboard"} <= _names(extras["export"])
    test = _names(extras["test"])
    assert {
        "pytest",
        "hypothesis",
        "nbval",
        "playwright",
        "jupyterlab",
        "voila",
        "ipykernel",
        "pandas",
        "scikit-learn",
        "tensorboard",
    } <= test
    assert _names(extras["notebook"]) <= test, "the test extra must include the notebook extra"
    assert _names(extras["export"]) <= test, "the test extra must include the export extra"
    # CI tests the framework callbacks: the test extra carries both (and both Lightning names).
    assert {"lightning", "transformers"} <= set(extras)
    assert _names(extras["lightning"]) | _names(extras["transformers"]) <= test
    assert "pytorch-lightning" in test


def test_pytest_config(pyproject):
    ini = pyproject["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests", "notebooks"]
    assert "--nbval-lax" in ini["addopts"]
    markers = " ".join(ini["markers"])
    assert "e2e:" in markers and "slow:" in markers
    assert "filterwarnings" not in ini


def test_binder_files():
    req = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    assert req[next(i for i, line in enumerate(req) if not line.startswith("#"))] == (
        "--extra-index-url https://download.pytorch.org/whl/cpu"
    )
    assert "torch>=2.1,<3" in req
    post = ROOT / "binder" / "postBuild"
    assert "pip install --no-deps -e ." in post.read_text()
    assert post.stat().st_mode & 0o111, "binder/postBuild must be executable"
