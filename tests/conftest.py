"""Suite-wide pytest hooks. Keep this file small: fixtures belong next to the tests that use them.

With the CI environment variable set, a skipped browser test (marker ``e2e``) fails the run: CI
must never pass while silently skipping the browser tests.
"""

from __future__ import annotations

import os

import pytest

_skipped_e2e: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "e2e" in report.keywords and not hasattr(report, "wasxfail"):
        _skipped_e2e.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_ci() and _skipped_e2e and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _in_ci() and _skipped_e2e:
        terminalreporter.section("browser tests skipped in CI", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"{len(_skipped_e2e)} e2e test(s) were skipped while CI is set; this fails the run:", red=True
        )
        for nodeid in _skipped_e2e:
            terminalreporter.line(f"  {nodeid}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Run the browser tests last.

    Playwright's sync API keeps an asyncio event loop running in the main thread for as long as
    its (session-wide) browser lives; any test collected after them would then see a running loop
    (``asyncio.run`` refuses to start, the dashboard runs as a task instead of synchronously).
    """
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
