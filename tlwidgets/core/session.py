"""What a Runner and a watcher share: their findings and the rules that produce them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from tlwidgets.core.catalog import make_finding
from tlwidgets.core.controls import params_missing_from_optimizer
from tlwidgets.core.events import Event
from tlwidgets.core.findings import Finding, FindingLog
from tlwidgets.core.records import StageRecords

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
        self.records: dict[Any, Any] = StageRecords(self._position)
        #: Splits whose batches the diagnoser still wants to see (its optional ``on_batch``): the data
        #: audits of data that cannot be sampled up front read the batches the session sees anyway.
        wants_batches = callable(getattr(self.diagnoser, "on_batch", None))
        self._tapped_splits: set[str] = {"train", "val"} if wants_batches else set()
        self._init_findings()
        # Every control (a fix from a finding's action, or the user's own) starts a re-check of the
        # active findings whose condition the numbers can be seen to end (core/actions.py).
        self.events.on(Event.CONTROL, self._arm_rechecks)

    def _position(self) -> str:
        """Where the session is, for a missing record's message."""
        stage = getattr(self, "stage", None)
        step = getattr(self, "global_step", None)
        if getattr(self, "kind", None) != "runner" or stage is None or step is None:
            return ""
        return f"the runner is at {stage.value.upper()} (it runs next), {step} step(s) done"

    def _init_findings(self) -> None:
        # The clock lets a rewind keep the findings it goes back past, resolved at the step it went to.
        self._log = FindingLog(clock=lambda: getattr(self, "global_step", None))
        #: Findings being re-checked after a control: key -> (steps after this one count, count then).
        self._rechecks: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
        self._recheck_off: Any = None  # unsubscribes the per-step re-check (subscribed only while needed)
        #: Confirmation lines of the actions applied, per finding key (the dashboard shows them).
        self.applied_actions: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        self._audit_keys: set[tuple[str, tuple[str, ...]]] = set()
        self._error_seq = 0  # counts new error findings: run() stops when it grows
        self._last_error: Finding | None = None
        #: Exceptions raised by rules (kept, not raised: a rule bug must not stop training).
        self.diagnostic_errors: list[str] = []

    @property
    def findings(self) -> list[Finding]:
        """Active findings, most likely root cause first (one per code and parameters), then the
        resolved ones (:attr:`Finding.resolved`) in the order they were first raised.

        Each active finding's :attr:`~Finding.actions` is filled from the session's state now.
        """
        return [*self.active_findings, *self.resolved_findings]

    @property
    def active_findings(self) -> list[Finding]:
        """The findings whose condition still holds, most likely root cause first, with their actions."""
        from tlwidgets.core.actions import actions_for

        active = self._log.active()
        try:
            ranked = self.diagnoser.rank(active)
        except Exception:  # a broken ranking must not hide findings
            self.diagnostic_errors.append("rank failed")
            ranked = active
        for f in ranked:
            f.actions = actions_for(self, f)
        return ranked

    @property
    def resolved_findings(self) -> list[Finding]:
        """The resolved findings, in the order they were first raised (they carry no actions)."""
        return self._log.resolved()

    @property
    def resolution_seq(self) -> int:
        """Bumped whenever a finding is resolved or active again (cheap; a panel redraws when it moved)."""
        return self._log.resolution_seq

    def has_finding(self, *codes: str) -> bool:
        """Is a finding with one of ``codes`` in the log, as the rules see it (cheap: no ranking)?

        The rules see the active findings and those a re-check after a control resolved (an LR named
        too high stays the explanation of what followed it), not those the setup check no longer
        finds nor those of a timeline a rewind abandoned (as before findings were kept resolved).
        """
        wanted = set(codes)
        return any(f.code in wanted and _seen_by_rules(f) for f in self._log)

    def findings_with(self, code: str) -> list[Finding]:
        """Findings of ``code`` in the log as the rules see them (see :meth:`has_finding`), in the order
        they were first raised (no ranking)."""
        return [f for f in self._log if f.code == code and _seen_by_rules(f)]

    def resolve_finding(self, finding: Finding, step: int | None = None) -> bool:
        """Mark ``finding`` (an entry of :attr:`findings`) resolved at ``step`` (default: now).

        Returns False when it is not in the log or already resolved.
        """
        done = self._log.resolve(finding.key, self.global_step if step is None else step, by="hand")
        self._rechecks.pop(finding.key, None)
        return done

    # ------------------------------------------------------------------ resolution after a control
    def _arm_rechecks(self, change: Any) -> None:
        """After a control, re-check the active findings that the numbers can show to be over."""
        from tlwidgets.core.actions import RESOLVERS

        if getattr(change, "kind", None) == "checkpoint":
            return
        for f in self._log.active():
            if f.code in RESOLVERS:
                self._rechecks[f.key] = (self.global_step, f.count)
        if self._rechecks and self._recheck_off is None:
            self._recheck_off = self.events.on(Event.STEP, self._recheck)

    def _recheck(self, _summary: Any = None) -> None:
        """One step later: resolve the re-checked findings whose condition is gone for long enough."""
        from tlwidgets.core.actions import RESOLVERS

        for key, (since, count) in list(self._rechecks.items()):
            f = self._log.get(key)
            if f is None or f.resolved:
                self._rechecks.pop(key, None)
                continue
            if f.count != count:  # reported again: the condition was still seen, count from here
                self._rechecks[key] = (self.global_step, f.count)
                continue
            try:
                over = RESOLVERS[f.code](self, f, since)
            except Exception as exc:
                if os.environ.get("TLW_STRICT_RULES"):
                    raise
                self.diagnostic_errors.append(f"resolve {f.code}: {type(exc).__name__}: {exc}")
                del self.diagnostic_errors[:-50]
                over = False
            if over:
                self._log.resolve(key, self.global_step, by="recheck")
                self._rechecks.pop(key, None)
        if not self._rechecks and self._recheck_off is not None:
            self._recheck_off()
            self._recheck_off = None

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
        """Setup checks, again: findings that no longer hold are resolved (at this step), new ones published
        (one that was resolved and holds again is active again)."""
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
        for key in self._audit_keys - keys:
            self._log.resolve(key, getattr(self, "global_step", None), by="audit")
            self._rechecks.pop(key, None)
        self._audit_keys = keys
        self._publish(found)


def _seen_by_rules(f: Finding) -> bool:
    """Active, or resolved by a re-check or by hand (see ``FindingsMixin.has_finding``)."""
    return not f.resolved or f.resolved_by not in ("audit", "rewind")


def _short(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
