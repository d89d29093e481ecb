"""How diagnostics plug into the core without the core importing them.

The core defines what a diagnoser is (:class:`Diagnoser`); the diagnostics
package registers the default one at import time (the package ``__init__``
imports it). A Runner or watcher built without an explicit ``diagnoser`` uses
:func:`default_diagnoser`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tlwidgets.core.findings import Finding, Severity
from tlwidgets.core.records import EpochRecord, StageRecord
from tlwidgets.core.stages import Stage

__all__ = ["Diagnoser", "NullDiagnoser", "default_diagnoser", "register_default_diagnoser"]


@runtime_checkable
class Diagnoser(Protocol):
    """Turns what a session recorded into findings.

    ``session`` is a :class:`~tlwidgets.core.runner.Runner` or a
    :class:`~tlwidgets.core.watch.Watcher`: both expose ``model``,
    ``optimizer``, ``loss_fn``, ``named_params``, ``param_names``, ``history``,
    ``global_step`` and ``kind`` (``"runner"`` or ``"watch"``).
    """

    def audit(self, session: Any) -> list[Finding]:
        """Setup checks of the model/optimizer objects (run again after each control)."""

    def on_stage(self, session: Any, record: StageRecord) -> list[Finding]:
        """Checks of one stage's record."""

    def on_step(self, session: Any) -> list[Finding]:
        """Trend checks after an optimizer step."""

    def on_epoch(self, session: Any, record: EpochRecord) -> list[Finding]:
        """Checks at an epoch end (validation)."""

    def explain(self, exc: BaseException, stage: Stage | None, context: dict[str, Any], step: int) -> Finding:
        """A plain-words finding for an exception raised by user code."""

    def rank(self, findings: Sequence[Finding]) -> list[Finding]:
        """Most likely root cause first."""

    # Optional (not part of the protocol check, so older diagnosers stay valid):
    # ``on_batch(session, split, inputs, targets) -> bool`` is shown the batches a
    # session reads (``split`` "train" or "val") until it returns False;
    # ``on_end(session) -> list[Finding]`` runs when a watched loop ends normally.


class NullDiagnoser:
    """No rules: only the runner's own safety findings (used when diagnostics are absent)."""

    def audit(self, session: Any) -> list[Finding]:
        return []

    def on_stage(self, session: Any, record: StageRecord) -> list[Finding]:
        return []

    def on_step(self, session: Any) -> list[Finding]:
        return []

    def on_epoch(self, session: Any, record: EpochRecord) -> list[Finding]:
        return []

    def explain(self, exc: BaseException, stage: Stage | None, context: dict[str, Any], step: int) -> Finding:
        from tlwidgets.core.catalog import make_finding

        return make_finding(
            "stage-error",
            f"{type(exc).__name__}: {str(exc)[:300]}",
            step=step,
            stage=stage,
            evidence={"exception": type(exc).__name__, "message": str(exc)},
        )

    def rank(self, findings: Sequence[Finding]) -> list[Finding]:
        return sorted(findings, key=lambda f: Severity(f.severity).rank)


_factory: Callable[[], Diagnoser] | None = None


def register_default_diagnoser(factory: Callable[[], Diagnoser]) -> None:
    """Make ``factory()`` the diagnoser of sessions created without one."""
    global _factory
    _factory = factory


def default_diagnoser() -> Diagnoser:
    """A fresh instance of the registered default (or :class:`NullDiagnoser`)."""
    return _factory() if _factory is not None else NullDiagnoser()
