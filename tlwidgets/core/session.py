"""What a Runner and a watcher share: their findings and the rules that produce them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from tlwidgets.core.catalog import make_finding
from tlwidgets.core.controls import params_missing_from_optimizer
from tlwidgets.core.events import Event
from tlwidgets.core.findings import Finding, FindingLog

__all__ = ["FindingsMixin"]

log = logging.getLogger(__name__)


class FindingsMixin:
    """Findings of a session (Runner or Watcher), fed by its diagnoser.

    The host sets ``events``, ``diagnoser``, ``named_params``, ``optimizer`` and
    ``global_step`` and calls :meth:`_init_findings` in its constructor.
    """

    def _init_session(self, model: Any, optimizer: Any, diagnoser: Any, **tracking: Any) -> None:
        """Tracking, history, events and rules: the parts a Runner and a watcher set up alike."""
        from tlwidgets.core.events import EventBus
        from tlwidgets.core.plugins import default_diagnoser
        from tlwidgets.core.recording import Recorder
        from tlwidgets.core.tracker import Tracker

        self.tracker = Tracker(model, optimizer, **tracking)
        self.named_params = self.tracker.named_params
        self.param_names = self.tracker.param_names
        self.history = self.tracker.history
        self.events = EventBus()
        self.diagnoser = diagnoser if diagnoser is not None else default_diagnoser()
        #: Builds every stage record's facts (the one recording path; core/recording.py).
        self.recorder = Recorder(self)
        #: Latest record of each stage (a Runner: of the current or last completed step).
        self.records: dict[Any, Any] = {}
        #: Splits whose batches the diagnoser still wants to see (its optional ``on_batch``): the data
        #: audits of data that cannot be sampled up front read the batches the session sees anyway.
        wants_batches = callable(getattr(self.diagnoser, "on_batch", None))
        self._tapped_splits: set[str] = {"train", "val"} if wants_batches else set()
        self._init_findings()

    def _init_findings(self) -> None:
        self._log = FindingLog()
        self._audit_keys: set[tuple[str, tuple[str, ...]]] = set()
        self._error_seq = 0  # counts new error findings: run() stops when it grows
        self._last_error: Finding | None = None
        #: Exceptions raised by rules (kept, not raised: a rule bug must not stop training).
        self.diagnostic_errors: list[str] = []

    @property
    def findings(self) -> list[Finding]:
        """Current findings, most likely root cause first (one per code and parameters)."""
        try:
            return self.diagnoser.rank(list(self._log))
        except Exception:  # a broken ranking must not hide findings
            self.diagnostic_errors.append("rank failed")
            return list(self._log)

    def has_finding(self, *codes: str) -> bool:
        """Is a finding with one of ``codes`` in the log (cheap: no ranking)?"""
        wanted = set(codes)
        return any(f.code in wanted for f in self._log)

    def findings_with(self, code: str) -> list[Finding]:
        """Findings of ``code`` in the log, in the order they were first raised (no ranking)."""
        return [f for f in self._log if f.code == code]

    def retire_finding(self, code: str, params: Sequence[str]) -> None:
        """Drop the finding filed under ``(code, params)``: a rule reports the problem under a wider
        parameter set now (see ``RuleContext.stable_params``)."""
        self._log.discard(code, tuple(params))

    def _publish(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            stored, new = self._log.add(f)
            if new:
                if stored.severity == "error":
                    self._error_seq += 1
                    self._last_error = stored
                self.events.emit(Event.FINDING, stored)

    def _latest_error_finding(self) -> Finding | None:
        return self._last_error

    def _diagnose(self, hook: str, *args: Any) -> list[Finding]:
        try:
            return list(getattr(self.diagnoser, hook)(self, *args) or [])
        except Exception as exc:
            log.exception("diagnoser.%s raised", hook)
            self.diagnostic_errors.append(f"{hook}: {type(exc).__name__}: {exc}")
            del self.diagnostic_errors[:-50]
            return []

    def _show_batch(self, split: str, inputs: Any, targets: Any) -> None:
        """Show a batch (``split``: "train" or "val") to the diagnoser while it wants batches of ``split``."""
        if split not in self._tapped_splits:
            return
        try:
            more = self.diagnoser.on_batch(self, split, inputs, targets)
        except Exception as exc:  # the diagnoser's failure, never the user's batch
            log.exception("diagnoser.on_batch raised")
            self.diagnostic_errors.append(f"on_batch: {type(exc).__name__}: {exc}")
            del self.diagnostic_errors[:-50]
            more = False
        if not more:
            self._tapped_splits.discard(split)

    def _refresh_audit(self) -> None:
        """Setup checks, again: findings that no longer hold are dropped, new ones published."""
        found: list[Finding] = []
        missing = params_missing_from_optimizer(self.named_params, self.optimizer)
        if missing:
            found.append(
                make_finding(
                    "param-not-in-optimizer",
                    f"{len(missing)} trainable parameter(s) are in no optimizer group: {_short(missing)}",
                    step=self.global_step,
                    params=tuple(missing),
                    evidence={"missing": missing, "groups": len(self.optimizer.param_groups)},
                )
            )
        found.extend(self._diagnose("audit"))
        keys = {f.key for f in found}
        for code, params in self._audit_keys - keys:
            self._log.discard(code, params)
        self._audit_keys = keys
        self._publish(found)


def _short(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
