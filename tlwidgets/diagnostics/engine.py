"""The default diagnoser: runs the rule set on the session's hooks and ranks what it finds."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from tlwidgets.core.findings import Finding
from tlwidgets.core.records import EpochRecord, StageRecord
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.audits import DECOUPLED_STEPS as _DECOUPLED_STEPS
from tlwidgets.diagnostics.audits import DataAudit
from tlwidgets.diagnostics.ranking import rank_findings
from tlwidgets.diagnostics.rules import Rule, RuleContext, SessionState, default_rules

__all__ = ["RuleDiagnoser"]

log = logging.getLogger(__name__)

#: ``TLW_STRICT_RULES=1`` makes a rule's exception propagate (for developing rules and in tests),
#: instead of being recorded in ``session.diagnostic_errors``.
_STRICT = os.environ.get("TLW_STRICT_RULES", "") not in ("", "0")

#: Codes that explain a loss stuck at the label prior better than labels-decoupled does.
_EXPLAINS_NO_LEARNING = (
    "param-not-in-optimizer",
    "nothing-trainable",
    "disconnected-param",
    "param-not-updating",
    "optimizer-not-stepping",
    "grads-not-zeroed",
    "grad-clipping-too-strong",
    "non-finite-input",
    "non-finite-loss",
    "non-finite-grad",
    "input-not-normalized",
    "softmax-before-loss",
    "shape-broadcast",
    "loss-sum-reduction",
    "lr-too-high",
    "lr-too-low",
    "scheduler-too-fast",
    # A heavy majority class: a model (and the labels probe) can hardly beat predicting it.
    "class-imbalance",
    "exploding-gradients",
    "vanishing-gradients",
    "dead-relu",
    "zero-init",
    "over-regularization",
    "batch-mixing",
    "channel-order",
    "dropout-too-high",
    "missing-activation",
)


class RuleDiagnoser:
    """Setup, per-stage, trend and own-loop rules (see :mod:`tlwidgets.diagnostics.rules`).

    Implements the core's ``Diagnoser`` protocol. Each session (Runner or
    Watcher) gets its own :class:`~tlwidgets.diagnostics.rules.base.SessionState`;
    one diagnoser may serve several sessions.

    Parameters
    ----------
    rules
        The rules to run (default: :func:`~tlwidgets.diagnostics.rules.default_rules`).
    disable
        Names of rules or finding codes to leave out; ``"data-audits"`` leaves out every automatic
        data audit (:mod:`tlwidgets.diagnostics.audits`).

    Notes
    -----
    A rule that raises never stops training: the exception is logged and
    recorded in ``session.diagnostic_errors`` and the other rules still run.
    """

    def __init__(self, rules: Iterable[Rule] | None = None, *, disable: Iterable[str] = ()) -> None:
        off = set(disable)
        chosen = list(rules) if rules is not None else default_rules()
        self.rules: list[Rule] = [r for r in chosen if r.name not in off and not (set(r.codes) & off)]
        self._setup = [r for r in self.rules if r.kind == "setup"]
        self._trend = [r for r in self.rules if r.kind == "trend"]
        self._epoch = [r for r in self.rules if r.kind == "epoch"]
        self._loop = [r for r in self.rules if r.kind == "loop"]
        self._by_stage: dict[Stage, list[Rule]] = {s: [] for s in Stage}
        for r in self.rules:
            if r.kind == "stage":
                for s in r.stages:
                    self._by_stage[s].append(r)
        self._states: weakref.WeakKeyDictionary[Any, SessionState] = weakref.WeakKeyDictionary()
        self._fallback: dict[int, SessionState] = {}
        self._memo: dict[tuple[Any, str], tuple[Rule, ...]] = {}
        self._last_session: Any = None
        self._last_state: SessionState | None = None
        self._off = off
        #: Data audits of each Runner (kept across rewinds: the data does not change with the weights).
        self._audits: weakref.WeakKeyDictionary[Any, DataAudit] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ state
    def state(self, session: Any) -> SessionState:
        """The :class:`SessionState` this diagnoser keeps for ``session``."""
        if session is self._last_session:  # the common case: one diagnoser per session
            return self._last_state
        try:
            st = self._states.get(session)
            if st is None:
                st = self._states[session] = SessionState()
        except TypeError:  # not weak-referenceable
            st = self._fallback.setdefault(id(session), SessionState())
        self._last_session, self._last_state = session, st
        return st

    def _applicable(self, rules: Sequence[Rule], kind: str, key: Any) -> tuple[Rule, ...]:
        """``rules`` that apply to sessions of ``kind`` (memoized per hook: these run every stage)."""
        got = self._memo.get((key, kind))
        if got is None:
            got = self._memo[(key, kind)] = tuple(r for r in rules if kind in r.sessions)
        return got

    def _run(self, rules: Sequence[Rule], session: Any, record: Any = None) -> list[Finding]:
        if not rules:
            return []
        st = self.state(session)
        ctx = RuleContext(session, st, record)
        data = getattr(record, "data", None) if record is not None else None
        out: list[Finding] = []
        for r in rules:
            needs = r.needs
            if needs:  # skip a rule whose data was not measured on this record (a loop, not any(): hot)
                if data is None:
                    continue
                get = data.get
                missing = False
                for k in needs:
                    if get(k) is None:
                        missing = True
                        break
                if missing:
                    continue
            ctx.state = st.of(r.name)
            try:
                got = r.fn(ctx)
            except Exception as exc:  # a rule bug must not stop training nor hide other rules
                if _STRICT:
                    raise
                log.debug("rule %s raised", r.name, exc_info=True)
                errors = getattr(session, "diagnostic_errors", None)
                if isinstance(errors, list):
                    errors.append(f"rule {r.name}: {type(exc).__name__}: {exc}")
                    del errors[:-50]
                continue
            if got:
                out.extend(got)
        return out

    # ------------------------------------------------------------------ data audits
    def _data_audit(self, session: Any) -> DataAudit | None:
        """The session's :class:`DataAudit` (Runners only: a watcher does not see the data sets)."""
        kind = getattr(session, "kind", None)
        if kind not in ("runner", "watch") or "data-audits" in self._off:
            return None
        if kind == "runner" and not hasattr(session, "train_data"):
            return None
        try:
            got = self._audits.get(session)
            if got is None:
                got = self._audits[session] = DataAudit()
        except TypeError:  # not weak-referenceable
            return None
        return got

    def _audit_runner(self, session: Any) -> Any:
        """``run(name, fn)`` for the audits: ``fn()``, or ``None`` with the failure recorded, not raised."""
        off = self._off

        def run(name: str, fn: Any) -> Any:
            if name in off:
                return None
            try:
                got = fn()
            except Exception as exc:
                if _STRICT:
                    raise
                log.debug("data audit %s raised", name, exc_info=True)
                errors = getattr(session, "diagnostic_errors", None)
                if isinstance(errors, list):
                    errors.append(f"data audit {name}: {type(exc).__name__}: {exc}")
                    del errors[:-50]
                return None
            if isinstance(got, Finding) and got.code in off:
                return None
            return got

        return run

    # ------------------------------------------------------------------ Diagnoser protocol
    def audit(self, session: Any) -> list[Finding]:
        """Setup rules and (once per Runner, then from the cache) the construction-time data audits; also
        notices a rewind (the step went back) and forgets step-ordered state."""
        st = self.state(session)
        st.cache.clear()
        step = int(getattr(session, "global_step", 0))
        if step < st.last_step:
            st.reset_time()
        st.last_step = step
        found = self._run(self._applicable(self._setup, session.kind, "setup"), session)
        data = self._data_audit(session)
        if data is not None:
            if not data.constructed:
                data.construction = data.at_construction(session, self._audit_runner(session)) or []
            found.extend(data.construction)
        return found

    def on_stage(self, session: Any, record: StageRecord) -> list[Finding]:
        """Stage rules of ``record.stage`` due at its step; loop events go to the own-loop rules."""
        if record.stage is Stage.BACKWARD and record.data.loop_event:
            return self._run(self._applicable(self._loop, session.kind, "loop"), session, record)
        self.state(session).derived.observe(record)
        rules = self._applicable(self._by_stage.get(record.stage, ()), session.kind, record.stage)
        if not record.exact:
            step = record.step
            st = self.state(session)
            rules = [
                r
                for r in rules
                if r.every == 1 or step < r.early or st.due((r.name, record.stage), step, r.every)
            ]
        return self._run(rules, session, record)

    def on_step(self, session: Any) -> list[Finding]:
        """Trend rules due now: each runs ``rule.every`` steps after its last run, and on the first
        ``rule.early`` evaluations.

        The sessions call this after measured steps only (the trend rules read
        their statistics), which in a sparse phase are ``measure_every`` steps
        apart: a rule whose ``every`` is shorter then runs on each of them, for
        the whole run (DESIGN section 6, "Whole runs").
        """
        st = self.state(session)
        step = int(session.global_step)
        if step < st.last_step:
            st.reset_time()
        st.last_step = step
        st.trend_calls += 1
        calls = st.trend_calls
        due = [
            r
            for r in self._applicable(self._trend, session.kind, "trend")
            if calls <= r.early or st.due(r.name, step, r.every)
        ]
        found = self._run(due, session)
        data = self._data_audit(session)
        if data is not None and data.constructed:
            run = self._audit_runner(session)
            found.extend(data.fetched_audits(session, run, epoch_end=False))
            if not data.first_step_done:  # once per session: nothing on later steps
                # The probes run the model: a watcher's hooks sit them out.
                suspended = getattr(session, "suspended", None)
                with suspended() if callable(suspended) else contextlib.nullcontext():
                    found.extend(data.at_first_step(session, run))
            at_val = data.val_passes > data.decoupled_at_val  # a watched loop's "epoch end"
            data.decoupled_at_val = data.val_passes
            first_late = step >= _DECOUPLED_STEPS and not data.decoupled_done and data.decoupled_checks == 0
            if at_val or first_late:
                found.extend(data.decoupled(session, None, self._explained(session, found), run))
        return found

    def on_batch(self, session: Any, split: str, inputs: Any, targets: Any) -> bool:
        """A batch the Runner read (``split``: ``"train"`` or ``"val"``), kept for the audits of data that
        could not be sampled up front (a custom ``Dataset``, a stream); whether more batches are wanted."""
        data = self._data_audit(session)
        if data is None or not data.constructed or not data.wants(split):
            return False
        run = self._audit_runner(session)
        return bool(run("fetched-sample", lambda: data.on_batch(split, inputs, targets)))

    def on_end(self, session: Any) -> list[Finding]:
        """A watched loop ended normally: the data audits run on what their samples hold (a loop of one
        epoch never shows the end of its validation pass otherwise)."""
        data = self._data_audit(session)
        if data is None or not data.constructed:
            return []
        run = self._audit_runner(session)
        data.pass_ended("train")
        data.pass_ended("val")
        found = data.fetched_audits(session, run, epoch_end=True)
        if data.decoupled_checks == 0:
            found.extend(data.decoupled(session, None, self._explained(session, found), run))
        return found

    @staticmethod
    def _explained(session: Any, found: Sequence[Finding] = ()) -> bool:
        """A finding (published, or ``found`` in the same hook) explains a loss stuck at the prior."""
        if any(f.code in _EXPLAINS_NO_LEARNING for f in found):
            return True
        has = getattr(session, "has_finding", None)
        return bool(has(*_EXPLAINS_NO_LEARNING)) if callable(has) else False

    def on_epoch(self, session: Any, record: EpochRecord) -> list[Finding]:
        """Epoch-end rules (validation trends, full-epoch label counts) and, at the first epoch ends,
        labels-decoupled."""
        found = self._run(self._applicable(self._epoch, session.kind, "epoch"), session, record)
        data = self._data_audit(session)
        if data is not None and data.constructed and getattr(record, "ok", True):
            run = self._audit_runner(session)
            data.pass_ended("train")
            if getattr(record, "val_loss", None) is not None:
                data.pass_ended("val")
            found.extend(data.fetched_audits(session, run, epoch_end=True))
            val = getattr(record, "val_loss", None)
            found.extend(data.decoupled(session, val, self._explained(session, found), run))
        return found

    def explain(self, exc: BaseException, stage: Stage | None, context: dict[str, Any], step: int) -> Finding:
        """A plain-words finding for an exception in user code (:mod:`tlwidgets.diagnostics.explain`)."""
        from tlwidgets.diagnostics.explain import explain_exception

        return explain_exception(exc, stage, context, step=step)

    def rank(self, findings: Sequence[Finding]) -> list[Finding]:
        """Most likely root cause first (see :mod:`~tlwidgets.diagnostics.ranking`)."""
        return rank_findings(findings)
