"""Findings: a named diagnosis with its cause and its fix.

A :class:`Finding` is plain data. Rules (in :mod:`tlwidgets.diagnostics`) and
the runner's own safety checks create them; the UI only displays them.
"""

from __future__ import annotations

import dataclasses
import enum
import html
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tlwidgets.core.stages import Stage

__all__ = ["Code", "Finding", "FindingLog", "Severity"]


class Severity(str, enum.Enum):
    """How bad a finding is. ``error`` stops :meth:`Runner.run`."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """0 for error, 1 for warning, 2 for info (sort key, worst first)."""
        return {"error": 0, "warning": 1, "info": 2}[self.value]


class Code(str, enum.Enum):
    """The closed set of finding codes (DESIGN.md section 4, a contract)."""

    PARAM_NOT_IN_OPTIMIZER = "param-not-in-optimizer"
    FROZEN_PARAM_CHANGED = "frozen-param-changed"
    NOTHING_TRAINABLE = "nothing-trainable"
    DISCONNECTED_PARAM = "disconnected-param"
    PARAM_NOT_UPDATING = "param-not-updating"
    OPTIMIZER_NOT_STEPPING = "optimizer-not-stepping"
    GRADS_NOT_ZEROED = "grads-not-zeroed"
    GRAD_CLIPPING_TOO_STRONG = "grad-clipping-too-strong"
    EVAL_MODE_TRAINING = "eval-mode-training"
    FROZEN_BN_STATS_DRIFT = "frozen-bn-stats-drift"
    NON_FINITE_INPUT = "non-finite-input"
    NON_FINITE_LOSS = "non-finite-loss"
    NON_FINITE_GRAD = "non-finite-grad"
    INPUT_NOT_NORMALIZED = "input-not-normalized"
    SOFTMAX_BEFORE_LOSS = "softmax-before-loss"
    SHAPE_BROADCAST = "shape-broadcast"
    LOSS_SUM_REDUCTION = "loss-sum-reduction"
    LR_TOO_HIGH = "lr-too-high"
    LR_TOO_LOW = "lr-too-low"
    SCHEDULER_TOO_FAST = "scheduler-too-fast"
    EXPLODING_GRADIENTS = "exploding-gradients"
    VANISHING_GRADIENTS = "vanishing-gradients"
    DEAD_RELU = "dead-relu"
    ZERO_INIT = "zero-init"
    OVER_REGULARIZATION = "over-regularization"
    LOSS_PLATEAU = "loss-plateau"
    BN_SMALL_BATCH = "bn-small-batch"
    CLASS_IMBALANCE = "class-imbalance"
    UNSHUFFLED_DATA = "unshuffled-data"
    BATCH_MIXING = "batch-mixing"
    CHANNEL_ORDER = "channel-order"
    LABELS_DECOUPLED = "labels-decoupled"
    DATA_LEAKAGE = "data-leakage"
    TRAIN_VAL_SHIFT = "train-val-shift"
    MISSING_ACTIVATION = "missing-activation"
    DROPOUT_TOO_HIGH = "dropout-too-high"
    RANK_DIVERGENCE = "rank-divergence"
    OVERFITTING = "overfitting"
    SHAPE_MISMATCH = "shape-mismatch"
    DEVICE_MISMATCH = "device-mismatch"
    DTYPE_MISMATCH = "dtype-mismatch"
    INPLACE_MODIFICATION = "inplace-modification"
    OUT_OF_MEMORY = "out-of-memory"
    TARGET_OUT_OF_RANGE = "target-out-of-range"
    STAGE_ERROR = "stage-error"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class Finding:
    """A diagnosis: what is wrong, why, and what to change.

    Parameters
    ----------
    code
        One of :class:`Code` (stored as its string value).
    severity
        ``"error"``, ``"warning"`` or ``"info"``.
    message
        One line saying what was observed, with the numbers.
    cause
        One sentence: what most likely went wrong.
    fix
        One sentence: what to do about it.
    step
        Global step (optimizer steps completed) when it was last seen.
    stage
        Stage it was seen at, or ``None`` for trend and setup findings.
    params
        Names of the parameters (or modules) involved.
    evidence
        The numbers behind the finding (plain Python/numpy values).
    first_step
        Global step when it was first seen.
    count
        How many times it has been reported (a finding is updated, not repeated).
    likely_causes
        Codes of the other findings present that can cause this one, most root first (e.g.
        ``("loss-sum-reduction",)`` on a ``non-finite-grad``). Filled by the ranking
        (:func:`tlwidgets.diagnostics.ranking.rank_findings`) each time ``findings`` is read, so
        it reflects the findings present then; it takes no part in equality nor in :attr:`key`.
    actions
        The fixes the session can carry out itself (:class:`tlwidgets.core.actions.Action`), first
        the one to try first. Filled each time the session's ``findings`` is read, from the session's
        state then (an action is offered only while it applies); empty on a resolved finding. Takes no
        part in equality.
    resolved
        True once the condition no longer holds: the setup check no longer finds it, the numbers after
        a fix no longer show it, or the run was rewound to before it (see ``docs/findings.md``,
        "Actions and resolution"). A resolved finding stays listed after the active ones; reported
        again, it is active again. Takes no part in equality.
    resolved_step
        Global step at which it was resolved (``None`` while active).
    resolved_by
        How: ``"audit"`` (the setup check no longer finds it), ``"rewind"`` (the run went back to
        before it), ``"recheck"`` (the numbers after a control no longer show it) or ``"hand"``
        (``session.resolve_finding``); ``None`` while active.
    """

    code: str
    severity: str
    message: str
    cause: str = ""
    fix: str = ""
    step: int | None = None
    stage: Stage | None = None
    params: tuple[str, ...] = ()
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_step: int | None = None
    count: int = 1
    likely_causes: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    actions: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)
    resolved: bool = dataclasses.field(default=False, compare=False)
    resolved_step: int | None = dataclasses.field(default=None, compare=False)
    resolved_by: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.code = Code(self.code).value
        self.severity = Severity(self.severity).value
        if self.stage is not None:
            self.stage = Stage(self.stage)
        self.params = tuple(self.params)
        self.likely_causes = tuple(self.likely_causes)
        self.actions = tuple(self.actions)
        if self.first_step is None:
            self.first_step = self.step

    def __getstate__(self) -> dict[str, Any]:
        # Actions hold the live session (closures over it): a pickled or deep-copied finding is plain
        # data without them (they are computed again when the session's findings are read).
        state = dict(self.__dict__)
        state["actions"] = ()
        return state

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """Identity used to merge repeated reports: code and parameters."""
        return (self.code, self.params)

    def __str__(self) -> str:
        where = f"step {self.step}" if self.step is not None else "setup"
        if self.stage is not None:
            where += f", {self.stage.value}"
        text = f"[{self.severity}] {self.code} ({where}): {self.message}"
        if self.resolved:
            text = f"[resolved at step {self.resolved_step}] " + text
        if self.params:
            shown = ", ".join(self.params[:5])
            more = f" (+{len(self.params) - 5} more)" if len(self.params) > 5 else ""
            text += f"\n  params: {shown}{more}"
        if self.likely_causes:
            text += f"\n  likely caused by: {', '.join(self.likely_causes)}"
        if self.cause:
            text += f"\n  cause: {self.cause}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        for a in self.actions:
            text += f"\n  action: {a.label} ({a.description})"
        return text

    def _repr_html_(self) -> str:
        colour = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}[self.severity]
        if self.resolved:
            colour = "#9e9e9e"  # greyed: the story of the run, not a problem now
        esc = html.escape
        where = f"step {self.step}" if self.step is not None else "setup"
        if self.stage is not None:
            where += f" &middot; {esc(self.stage.value)}"
        params = ""
        if self.params:
            params = "<div><b>params:</b> " + esc(", ".join(self.params[:8]))
            params += f" (+{len(self.params) - 8})" if len(self.params) > 8 else ""
            params += "</div>"
        if self.likely_causes:
            params += (
                '<div class="tlw-likely-causes"><b>likely caused by:</b> '
                + ", ".join(f"<code>{esc(c)}</code>" for c in self.likely_causes)
                + "</div>"
            )
        resolved, css, style = "", "tlw-finding", ""
        if self.resolved:
            at = f" at step {self.resolved_step}" if self.resolved_step is not None else ""
            at += {
                "rewind": " (rewound to before it)",
                "audit": " (setup check)",
                "recheck": " (re-checked)",
            }.get(self.resolved_by or "", "")
            resolved = f' <b class="tlw-resolved-mark">resolved{at}</b>'
            css += " tlw-finding-resolved"
            style = "color:#757575;"
        return (
            f'<div class="{css}" style="border-left:4px solid {colour};padding:4px 8px;margin:4px 0;{style}">'
            f'<div><b style="color:{colour}">{esc(self.severity)}</b> '
            f"<code>{esc(self.code)}</code> <small>({where})</small>{resolved}</div>"
            f"<div>{esc(self.message)}</div>{params}"
            f"<div><b>cause:</b> {esc(self.cause)}</div>"
            f"<div><b>fix:</b> {esc(self.fix)}</div></div>"
        )


class FindingLog:
    """Findings merged by (code, params): one entry per problem, kept current.

    A repeated report updates the entry's step, message and evidence and bumps
    its count instead of appending, so a bug seen for 1,000 steps is one line.
    A resolved entry stays (marked :attr:`Finding.resolved`); reported again, it
    is active again and counts as new.

    Parameters
    ----------
    clock
        The session's global step now. With a clock, :meth:`restore` keeps the
        entries a rewind goes back past, resolved at the step it went back to;
        without one it drops them.
    """

    def __init__(self, clock: Callable[[], int | None] | None = None) -> None:
        self._by_key: dict[tuple[str, tuple[str, ...]], Finding] = {}
        self._order: list[tuple[str, tuple[str, ...]]] = []
        self._clock = clock
        #: Bumped whenever an entry is resolved or reactivated (a panel redraws when it moved).
        self.resolution_seq = 0

    def add(self, finding: Finding) -> tuple[Finding, bool]:
        """Merge ``finding`` in; return the stored entry and whether it is new (or active again)."""
        old = self._by_key.get(finding.key)
        if old is None:
            self._by_key[finding.key] = finding
            self._order.append(finding.key)
            return finding, True
        again = old.resolved
        if again:  # the condition holds again: active, and news (run() stops at an error again)
            old.resolved = False
            old.resolved_step = old.resolved_by = None
            self.resolution_seq += 1
        old.count += 1
        old.step = finding.step
        old.stage = finding.stage
        old.message = finding.message
        old.evidence = finding.evidence
        if Severity(finding.severity).rank < Severity(old.severity).rank:
            old.severity = finding.severity
        return old, again

    def resolve(self, key: tuple[str, tuple[str, ...]], step: int | None, by: str = "hand") -> bool:
        """Mark the entry ``key`` resolved at ``step`` (``by``: see :attr:`Finding.resolved_by`);
        False when there is none or it already was."""
        f = self._by_key.get(key)
        if f is None or f.resolved:
            return False
        f.resolved = True
        f.resolved_step = step
        f.resolved_by = by
        f.actions = ()
        self.resolution_seq += 1
        return True

    def active(self) -> list[Finding]:
        """Entries not resolved, in the order they were first raised."""
        return [f for f in self if not f.resolved]

    def resolved(self) -> list[Finding]:
        """Resolved entries, in the order they were first raised."""
        return [f for f in self if f.resolved]

    def extend(self, findings: Iterable[Finding]) -> list[Finding]:
        """Add several; return those that were new."""
        return [f for f in findings if self.add(f)[1]]

    def discard(self, code: str, params: Sequence[str] | None = None) -> None:
        """Forget findings of ``code`` (only those naming ``params`` if given)."""
        for key in [k for k in self._order if k[0] == code and (params is None or k[1] == tuple(params))]:
            self._order.remove(key)
            del self._by_key[key]

    def get(self, key: tuple[str, tuple[str, ...]]) -> Finding | None:
        """The stored entry for ``key`` (code, params), or ``None``."""
        return self._by_key.get(key)

    def restore(self, entries: Iterable[Finding], keep: Callable[[Finding], bool] | None = None) -> None:
        """Go back to ``entries`` (a :meth:`snapshot`), copied, in their order.

        Entries that ``keep`` accepts and that ``entries`` lacks stay, after
        them (a rewind keeps findings that belong to no point of the run).
        With a clock, the other entries that ``entries`` lacks (those of the
        timeline a rewind abandons) stay too, resolved at the clock's step: the
        run went back to before them, and the story of the run is kept.
        """
        kept = [f for f in self if keep is not None and keep(f)]
        gone = [f for f in self if not (keep is not None and keep(f))] if self._clock is not None else []
        self.clear()
        for f in entries:
            self._by_key[f.key] = dataclasses.replace(f)
            self._order.append(f.key)
        for f in kept:
            if f.key not in self._by_key:
                self._by_key[f.key] = f
                self._order.append(f.key)
        step = self._clock() if gone else None
        for f in gone:
            if f.key not in self._by_key:
                self._by_key[f.key] = f
                self._order.append(f.key)
                if not f.resolved:
                    self.resolve(f.key, step, by="rewind")
        self.resolution_seq += 1

    def clear(self) -> None:
        self._by_key.clear()
        self._order.clear()

    def __iter__(self):
        return (self._by_key[k] for k in self._order)

    def __len__(self) -> int:
        return len(self._order)

    def snapshot(self) -> list[Finding]:
        """A shallow copy of the entries (in insertion order)."""
        return [dataclasses.replace(f) for f in self]
