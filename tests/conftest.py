"""Suite-wide pytest hooks. Keep this file small: fixtures belong next to the tests that use them.

With the CI environment variable set, a skipped browser test fails the run: CI must never pass while
silently skipping the browser tests. ``tests/test_ci_guard.py`` runs a copy of this file on a small
project to check that.

Rules run strict in the tests (``TLW_STRICT_RULES=1``, set before tlwidgets is imported): a rule
that raises fails the test instead of being kept quietly in ``session.diagnostic_errors``. A test
that checks the quiet path turns it off with ``monkeypatch.setattr(engine, "_STRICT", False)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TLW_STRICT_RULES", "1")

# The browser tests' folder, next to this file. A copy of this file guards the ``e2e`` folder next
# to the copy (tests/test_ci_guard.py relies on that).
E2E_DIR = Path(__file__).resolve().parent / "e2e"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skip report gives (its longrepr is ``(path, lineno, reason)`` for skips)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


class _E2ESkipGuard:
    """Collects the skipped browser tests and, with CI set, turns a passing run into a failed one.

    A skip counts when it is

    - a test report (setup, call or teardown) of a test with the ``e2e`` marker, or of any test in
      a module under ``tests/e2e/`` (that covers a whole-module ``pytestmark = pytest.mark.skip``
      even where the module does not carry the marker itself: ``tests/e2e/conftest.py`` adds it only
      to items it gets to see);
    - a collection report of a node under ``tests/e2e/``: a module-level ``pytest.importorskip(...)``
      or ``pytest.skip(..., allow_module_level=True)`` skips the module while it is imported, so no
      test item (and no marker, ``pytestmark`` included) ever exists. The module's path is the only
      thing known about it then, so the path decides: every file under ``tests/e2e/`` is a browser
      test.

    Expected failures (``xfail``, reported as skipped with ``wasxfail``) do not count. Reports are
    read in the ``*report`` hooks, which also see the reports that pytest-xdist workers send back.
    State lives on this object, one per pytest configuration (a pytester run gets its own).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.rootpath = config.rootpath
        self.skipped: list[str] = []

    def _under_e2e(self, nodeid: str) -> bool:
        # Node ids are paths relative to rootdir, then "::"-separated names.
        path = (self.rootpath / nodeid.split("::", 1)[0]).resolve()
        return path == E2E_DIR or E2E_DIR in path.parents

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        if "e2e" in report.keywords or self._under_e2e(report.nodeid):
            self.skipped.append(f"{report.nodeid} ({_skip_reason(report)})")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped and report.nodeid and self._under_e2e(report.nodeid):
            self.skipped.append(f"{report.nodeid} (skipped at collection: {_skip_reason(report)})")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        ok = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        if _in_ci() and self.skipped and exitstatus in ok:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        if not (_in_ci() and self.skipped):
            return
        terminalreporter.section("browser tests skipped in CI", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"{len(self.skipped)} e2e test(s) or module(s) were skipped while CI is set; this fails the run:",
            red=True,
        )
        for entry in self.skipped:
            terminalreporter.line(f"  {entry}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_E2ESkipGuard(config), "tlwidgets-e2e-skip-guard")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Run the browser tests last.

    Playwright's sync API keeps an asyncio event loop running in the main thread for as long as
    its (session-wide) browser lives; any test collected after them would then see a running loop
    (``asyncio.run`` refuses to start, the dashboard runs as a task instead of synchronously).
    """
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
