"""The CI no-skip guard in ``tests/conftest.py``: with CI set, a skipped browser test fails the run.

Each test builds a small project with pytester whose ``conftest.py`` is a verbatim copy of the real
``tests/conftest.py`` (so these tests check the file the suite runs with) and whose ``e2e/`` folder
stands for ``tests/e2e/``, then runs pytest on it in-process with and without CI. The cases are the
ways a browser test can go missing: a skip inside a test, a whole-module ``pytestmark`` skip, and
the module-level skips (``importorskip``, ``skip(allow_module_level=True)``) that happen while the
module is imported, before any test or marker exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

# The sub-run reads only the temporary project's configuration; --strict-markers as in
# pyproject.toml, so the marker must be declared there too.
INI = """\
[pytest]
addopts = -ra --strict-markers -p no:cacheprovider
markers =
    e2e: real-browser tests
"""

HEALTHY = """\
import pytest

@pytest.mark.e2e
def test_browser_ok():
    pass
"""

# name -> (file under e2e/, its source): each makes exactly one module's browser tests go missing.
SKIPPING = {
    "importorskip": (
        "test_importorskip.py",
        """\
import pytest

playwright_like = pytest.importorskip("tlw_no_such_module_for_the_ci_guard")

pytestmark = pytest.mark.e2e

def test_never_collected():
    pass
""",
    ),
    "module_skip": (
        "test_module_skip.py",
        """\
import pytest

pytest.skip("no browser here", allow_module_level=True)

def test_never_collected():
    pass
""",
    ),
    "test_skip": (
        "test_test_skip.py",
        """\
import pytest

@pytest.mark.e2e
def test_skipped_inside():
    pytest.skip("no browser here")
""",
    ),
    # Without an e2e marker: under e2e/ is enough (tests/e2e/conftest.py adds the marker itself).
    "pytestmark_skip": (
        "test_pytestmark_skip.py",
        """\
import pytest

pytestmark = pytest.mark.skip(reason="no browser here")

def test_skipped_by_module_mark():
    pass
""",
    ),
}


@pytest.fixture(autouse=True)
def _no_plugin_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sub-runs need no installed plugin (nbval, hypothesis, ...); loading them costs seconds."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def _project(pytester: pytest.Pytester, extra: dict[str, str]) -> None:
    """The real conftest at the root, a healthy browser test in e2e/, plus ``extra`` (path -> source)."""
    pytester.makefile(".ini", pytest=INI)
    (pytester.path / "conftest.py").write_text(CONFTEST.read_text())
    files = {"e2e/test_healthy.py": HEALTHY, **extra}
    for rel, source in files.items():
        path = pytester.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


@pytest.mark.parametrize("case", sorted(SKIPPING))
def test_skipped_browser_module_fails_the_run_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    filename, source = SKIPPING[case]
    _project(pytester, {f"e2e/{filename}": source})

    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*browser tests skipped in CI*", f"*e2e/{filename}*"])

    monkeypatch.delenv("CI")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert "browser tests skipped in CI" not in result.stdout.str()


@pytest.mark.parametrize("ci", ["true", "1", None])
def test_healthy_browser_tests_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> None:
    """No skip, no failure: the guard alone never fails a run."""
    _project(pytester, {})
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=1)


def test_skips_outside_e2e_and_xfails_do_not_count(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only browser tests are guarded: a module-level skip elsewhere (an optional dependency) and an
    expected failure of a browser test leave a CI run green."""
    _project(
        pytester,
        {
            "test_optional.py": 'import pytest\npytest.importorskip("tlw_no_such_module_for_the_ci_guard")\n',
            "e2e/test_xfail.py": (
                "import pytest\n\n@pytest.mark.e2e\n@pytest.mark.xfail(reason='known')\n"
                "def test_known_bug():\n    assert False\n"
            ),
        },
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=1, xfailed=1, skipped=1)
