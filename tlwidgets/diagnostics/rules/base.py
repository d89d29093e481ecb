"""What a rule is, what it gets, and the small numeric helpers rules share.

A :class:`Rule` is a pure function of what the session recorded (and, for the
setup audit, of the model/optimizer objects) that returns findings. It
declares:

* ``kind``: ``"setup"`` (run by ``audit`` at construction and after every
  control), ``"stage"`` (run on the records of ``stages``), ``"trend"`` (run
  after optimizer steps, every ``every`` steps), ``"epoch"`` (at epoch ends)
  or ``"loop"`` (on the watcher's loop-structure events);
* ``needs``: record data keys that must be present and not ``None`` (the rule
  is skipped, silently, when one is missing: e.g. activation statistics exist
  only on scheduled steps);
* ``sessions``: ``"runner"``, ``"watch"`` or both.

Rules keep what they must remember between calls (counters, running label
counts) in ``ctx.state``, a dict private to one rule and one session, held by
the diagnoser. They never run torch passes over the weights every step: trend
rules read the small per-step history arrays (a window of the newest rows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.catalog import make_finding
from tlwidgets.core.facts import StageFacts, facts_for
from tlwidgets.core.findings import Code, Finding
from tlwidgets.core.records import StageRecord
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.derived import Derived, DerivedView

__all__ = [
    "KINDS",
    "Rule",
    "RuleContext",
    "SessionState",
    "is_embedding_param",
    "matrix_columns",
    "nanmedian",
    "rows_identical",
    "rule",
    "short_list",
    "tail",
]

#: Allowed values of :attr:`Rule.kind`.
KINDS = ("setup", "stage", "trend", "epoch", "loop")

_SESSIONS = ("runner", "watch")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One diagnostic rule.

    Parameters
    ----------
    name
        Unique name (also the key of the rule's private state).
    codes
        Finding codes the rule can produce.
    kind
        When it runs: one of :data:`KINDS`.
    fn
        ``fn(ctx) -> iterable of Finding`` (``None`` counts as no findings).
    stages
        For ``kind="stage"``: the stages whose records it reads.
    needs
        Record data keys that must be present and not ``None``; otherwise the rule is skipped.
    every
        Run at most once every ``every`` steps (counted from its last run, on
        the steps that are measured; and on each of the first ``early``), so a
        rule costs ``1/every`` of its price per step. Trend
        rules: heavier window statistics. Stage rules: facts that persist over
        steps (a layer left in eval mode, a loss reduction); a stage rule always
        runs on an exact record (a stage stepped alone). Rules for process bugs
        that must be named within two steps keep ``every=1``.
    early
        Stage rules: steps at the start during which the rule runs on every
        record. Trend rules: the first evaluations (measured steps) on which it
        runs every time.
    sessions
        Which sessions the rule applies to (``"runner"``, ``"watch"``).
    """

    name: str
    codes: tuple[str, ...]
    kind: str
    fn: Callable[[RuleContext], Iterable[Finding] | None]
    stages: tuple[Stage, ...] = ()
    needs: tuple[str, ...] = ()
    every: int = 1
    early: int = 0
    sessions: tuple[str, ...] = _SESSIONS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for code in self.codes:
            Code(code)  # raises on an unknown code
        if self.kind == "stage" and not self.stages:
            raise ValueError(f"stage rule {self.name!r} must name the stages it reads")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        for stage in self.stages:  # a typo in needs would silently skip the rule for ever
            known = {f.name for f in dataclasses.fields(facts_for(stage))}
            unknown = sorted(set(self.needs) - known)
            if unknown:
                raise ValueError(f"rule {self.name!r} needs {unknown}: {stage.value} records lack them")
        bad = set(self.sessions) - set(_SESSIONS)
        if bad:
            raise ValueError(f"sessions must be among {_SESSIONS}, got {sorted(bad)}")

    def applies(self, record: StageRecord | None) -> bool:
        """True when ``record`` holds every key the rule needs (not ``None``)."""
        if not self.needs:
            return True
        data = getattr(record, "data", None)
        return data is not None and all(data.get(k) is not None for k in self.needs)


def rule(
    name: str,
    codes: Sequence[str],
    kind: str,
    *,
    stages: Sequence[Stage] = (),
    needs: Sequence[str] = (),
    every: int = 1,
    early: int = 0,
    sessions: Sequence[str] = _SESSIONS,
) -> Callable[[Callable[[RuleContext], Any]], Rule]:
    """Decorator turning ``fn(ctx)`` into a :class:`Rule` with these declarations."""

    def wrap(fn: Callable[[RuleContext], Any]) -> Rule:
        return Rule(
            name=name,
            codes=tuple(codes),
            kind=kind,
            fn=fn,
            stages=tuple(Stage(s) for s in stages),
            needs=tuple(needs),
            every=every,
            early=early,
            sessions=tuple(sessions),
        )

    return wrap


class SessionState:
    """What the diagnoser remembers about one session.

    Attributes
    ----------
    rules
        Private dict of each rule, by rule name.
    derived
        Facts several rules read (:class:`~tlwidgets.diagnostics.derived.Derived`:
        running label counts, the first losses); what one rule concludes reaches
        another only as a published finding.
    reported
        The parameter tuple last reported under each (code, group), so a
        recurring finding keeps a stable key (see :meth:`RuleContext.stable_params`).
    cache
        Derived facts about the model/optimizer objects (module types, param
        groups); cleared by every audit because controls may change them.
    last_step
        Newest global step seen: a smaller one means the session was rewound.
    last_run
        Step at which each scheduled rule last ran (key: rule name, and the
        stage for stage rules): a rule is due again ``every`` steps later.
    trend_calls
        Trend evaluations so far (the trend rules' ``early`` counts these).
    """

    def __init__(self) -> None:
        self.rules: dict[str, dict[str, Any]] = {}
        self.derived = Derived()
        self.reported: dict[tuple[str, str], tuple[str, ...]] = {}
        self.cache: dict[str, Any] = {}
        self.last_step = 0
        self.last_run: dict[Any, int] = {}
        self.trend_calls = 0

    def due(self, key: Any, step: int, every: int) -> bool:
        """Is a rule with period ``every`` due at ``step`` (``every`` steps since it last ran)?

        Counted from the last run, never as ``step % every``: the steps on which
        anything is evaluated depend on the measurement schedule (every 20th
        step in a sparse phase, a step after a change, ...), and a modulo test
        against them can fail for ever. A rule that never ran counts from step 0
        (so in a dense phase it runs on the multiples of ``every``).
        """
        if 0 <= step - self.last_run.get(key, 0) < every:
            return False
        self.last_run[key] = step
        return True

    def of(self, name: str) -> dict[str, Any]:
        """The private state dict of rule ``name`` (created empty)."""
        got = self.rules.get(name)
        if got is None:
            got = self.rules[name] = {}
        return got

    def reset_time(self) -> None:
        """Forget everything that depends on the order of steps (after a rewind)."""
        self.rules.clear()
        self.derived = Derived()
        self.last_run.clear()
        self.trend_calls = 0


class RuleContext:
    """What a rule function receives.

    Attributes
    ----------
    session
        The Runner or Watcher (``model``, ``optimizer``, ``loss_fn``,
        ``named_params``, ``param_names``, ``history``, ``records``,
        ``global_step``, ``kind``, ``scheduler``; a watcher also has ``loop``).
    record
        The stage or epoch record being diagnosed (``None`` for setup and trend rules).
    state
        The calling rule's private dict for this session.
    session_state
        The :class:`SessionState` of the session.
    """

    __slots__ = ("record", "session", "session_state", "state")

    def __init__(self, session: Any, session_state: SessionState, record: Any = None) -> None:
        self.session = session
        self.session_state = session_state
        self.record = record
        self.state: dict[str, Any] = {}

    # -- facts -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """The step a finding should carry: the record's step, else the session's global step."""
        rec = self.record
        if rec is not None and isinstance(getattr(rec, "step", None), int):
            return rec.step
        return int(self.session.global_step)

    @property
    def data(self) -> StageFacts:
        """The record's typed facts (:mod:`tlwidgets.core.facts`; empty without a stage record)."""
        rec = self.record
        return rec.data if isinstance(rec, StageRecord) else StageFacts()

    @property
    def derived(self) -> DerivedView:
        """Facts several rules read, the same for every rule of an evaluation.

        See :mod:`tlwidgets.diagnostics.derived`.
        """
        return DerivedView(self.session, self.session_state.derived)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per audit period (controls clear the cache)."""
        cache = self.session_state.cache
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def modules(self) -> dict[str, nn.Module]:
        """``{module name: module}`` of the model (root is ``""``)."""
        return self.cached("modules", lambda: dict(self.session.model.named_modules()))

    def param_module(self) -> dict[str, tuple[str, nn.Module]]:
        """``{param name: (owning module name, module)}``."""

        def build() -> dict[str, tuple[str, nn.Module]]:
            mods = self.modules()
            out = {}
            for name in self.session.param_names:
                owner = name.rpartition(".")[0]
                out[name] = (owner, mods.get(owner, self.session.model))
            return out

        return self.cached("param_module", build)

    def group_index(self) -> np.ndarray:
        """Optimizer group of each tracked parameter (-1 when in no group), in history column order."""

        groups = self.session.optimizer.param_groups
        got = self.session_state.cache.get("group_index")
        if got is None or got[0] != len(groups):  # add_param_group() in an own loop invalidates it too
            where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            index = np.array([where.get(id(p), -1) for _, p in self.session.named_params], dtype=np.int64)
            got = self.session_state.cache["group_index"] = (len(groups), index)
        return got[1]

    def weight_matrices(self) -> np.ndarray:
        """History columns of the weight matrices/kernels (dim >= 2, not embeddings)."""
        return self.cached("weight_matrices", lambda: matrix_columns(self.session))

    def trainable(self) -> np.ndarray:
        """Mask (history column order) of parameters with ``requires_grad`` now, memoized per step."""
        cache = self.session_state.cache
        step = self.session.global_step
        got = cache.get("trainable")
        if got is None or got[0] != step:
            named = self.session.named_params
            got = cache["trainable"] = (
                step,
                np.fromiter((p.requires_grad for _, p in named), dtype=bool, count=len(named)),
            )
        return got[1]

    # -- findings ----------------------------------------------------------------
    def finding(
        self,
        code: str,
        message: str,
        *,
        params: Iterable[str] = (),
        stage: Stage | bool | None = True,
        step: int | None = None,
        evidence: dict[str, Any] | None = None,
        severity: str | None = None,
        cause: str | None = None,
        fix: str | None = None,
    ) -> Finding:
        """:func:`make_finding` with the step and stage of the current record filled in.

        ``stage=True`` (the default) takes the record's stage (``None`` without one).
        """
        if stage is True:
            rec = self.record
            stage = rec.stage if isinstance(rec, StageRecord) else None
        return make_finding(
            code,
            message,
            step=self.step if step is None else step,
            stage=stage or None,
            params=tuple(params),
            evidence=evidence,
            severity=severity,
            cause=cause,
            fix=fix,
        )

    def stable_params(self, code: str, names: Iterable[str], group: str = "") -> tuple[str, ...]:
        """The parameter tuple to report for ``code`` so the finding's key stays put.

        A recurring problem is reported under the union of all names seen so
        far (in model order), so a step that shows a subset updates the same
        finding instead of adding another. When the union grows, the entry
        filed under the old, smaller tuple is dropped from the session's log.
        """
        order = self.cached("param_order", lambda: {n: i for i, n in enumerate(self.session.param_names)})
        key = (code, group)
        old = self.session_state.reported.get(key, ())
        union = set(old) | set(names)
        new = tuple(sorted(union, key=lambda n: (order.get(n, len(order)), n)))
        if old and new != old:
            self.session.retire_finding(code, old)
        self.session_state.reported[key] = new
        return new


# -- helpers ----------------------------------------------------------------------
def is_embedding_param(module: nn.Module) -> bool:
    """Embedding tables get sparse, row-wise updates: norms of the whole table say little."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def matrix_columns(session: Any) -> np.ndarray:
    """History columns of the weight matrices and kernels (dim >= 2), embeddings excluded."""
    mods = dict(session.model.named_modules())
    cols = []
    for i, (name, p) in enumerate(session.named_params):
        owner = mods.get(name.rpartition(".")[0])
        if p.dim() >= 2 and not (owner is not None and is_embedding_param(owner)):
            cols.append(i)
    return np.array(cols, dtype=np.int64)


def tail(history: Any, key: str, n: int, *, measured: bool | None = None) -> np.ndarray:
    """The newest ``n`` rows of a history series, oldest first (:meth:`History.window`).

    ``key`` is ``loss``, ``step``, ``epoch``, ``lr``, ``grad_norm``,
    ``weight_norm`` or ``update_norm``. Per-parameter series count measured
    rows only (unmeasured rows of the schedule hold NaN there); the loss and LR,
    recorded every step, count every row unless ``measured=True``. Trend rules
    size their windows with ``history.measured_count`` and cover the same steps
    with a loss window of ``history.span(n)`` rows.
    """
    return history.window(key, n, measured=measured)


#: Above this many values a 1-D median partitions in numpy (about 6 us plus 5 ns per value) instead
#: of sorting in Python (about 90 ns per value): they cost the same near 60 values.
_PY_MEDIAN_MAX = 64


def nanmedian(values: Any, axis: int | None = None) -> Any:
    """Median ignoring NaN (NaN where nothing was measured), without warnings.

    Rules take medians of small windows (tens of values) many times per
    evaluation, where ``np.nanmedian`` / ``np.median`` overheads (masked
    arrays, partition) dominate: a 1-D median sorts in plain Python, and
    ``axis`` (of a 2-D array) sorts once with NaN last and picks the middle
    of the finite values of each row.
    """
    values = np.asarray(values, dtype=np.float64)
    if axis is None:
        if values.size > _PY_MEDIAN_MAX:
            # Long windows (a sparse phase's loss window spans every step): numpy's partition.
            finite_arr = values[~np.isnan(values)].ravel()
            n = finite_arr.size
            if not n:
                return math.nan
            mid = np.partition(finite_arr, [(n - 1) // 2, n // 2])
            return 0.5 * (float(mid[(n - 1) // 2]) + float(mid[n // 2]))
        flat = values.ravel().tolist()
        finite = sorted(v for v in flat if v == v)  # v == v is False only for NaN
        n = len(finite)
        if not n:
            return math.nan
        return 0.5 * (finite[(n - 1) // 2] + finite[n // 2])
    if values.ndim != 2:
        raise ValueError("nanmedian(axis=...) takes a 2-D array")
    rows = values if axis in (1, -1) else values.T
    if rows.shape[1] == 0:
        return np.full(rows.shape[0], np.nan)
    ordered = np.sort(rows, axis=1)
    count = rows.shape[1] - np.isnan(rows).sum(axis=1)
    idx = np.arange(rows.shape[0])
    lo = np.maximum((count - 1) // 2, 0)
    hi = np.minimum(count // 2, rows.shape[1] - 1)
    med = 0.5 * (ordered[idx, lo] + ordered[idx, hi])
    med[count == 0] = np.nan
    return med


def short_list(names: Sequence[str], n: int = 4) -> str:
    """``a, b, c (+2 more)``."""
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def rows_identical(tensors: Sequence[torch.Tensor], rel: float = 1e-6) -> list[bool]:
    """For each tensor: do all rows ``t[i]`` hold the same values (up to ``rel`` of its scale)?

    One reduction per tensor on its own device and one transfer per device for all of them.
    """
    if not tensors:
        return []
    with torch.no_grad():
        stats = []
        for t in tensors:
            m = t.detach().reshape(t.shape[0], -1)
            stats.append(torch.stack([(m.amax(0) - m.amin(0)).abs().max().float(), m.abs().max().float()]))
        from tlwidgets.core.stats import to_host

        flat = to_host([v for pair in stats for v in pair.unbind()])
    spread, scale = flat[0::2], flat[1::2]
    ok = np.isfinite(spread) & np.isfinite(scale)
    return [bool(o and sp <= rel * sc + 1e-30) for o, sp, sc in zip(ok, spread, scale)]
