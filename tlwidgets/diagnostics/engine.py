"""The default diagnoser: runs the rule set and ranks what it finds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tlwidgets.core.findings import Finding, Severity
from tlwidgets.core.records import EpochRecord, StageRecord
from tlwidgets.core.stages import Stage

__all__ = ["RuleDiagnoser"]


class RuleDiagnoser:
    """Setup, per-stage, trend and own-loop rules (see :mod:`tlwidgets.diagnostics.rules`)."""

    def audit(self, session: Any) -> list[Finding]:
        return []

    def on_stage(self, session: Any, record: StageRecord) -> list[Finding]:
        return []

    def on_step(self, session: Any) -> list[Finding]:
        return []

    def on_epoch(self, session: Any, record: EpochRecord) -> list[Finding]:
        return []

    def explain(self, exc: BaseException, stage: Stage | None, context: dict[str, Any], step: int) -> Finding:
        from tlwidgets.diagnostics.explain import explain_exception

        return explain_exception(exc, stage, context, step=step)

    def rank(self, findings: Sequence[Finding]) -> list[Finding]:
        return sorted(findings, key=lambda f: Severity(f.severity).rank)
