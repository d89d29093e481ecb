"""Findings you can act on: the fixes a session can carry out itself, and when a finding is over.

A :class:`Action` is offered on a :class:`~tlwidgets.core.findings.Finding` (its ``actions``) when
the session can carry out the fix the finding suggests: add parameters to the optimizer, unfreeze,
set a learning rate the numbers support, rewind to a checkpoint from before the damage, put layers
back in train mode. ``apply()`` goes through the session's own controls (``unfreeze``, ``freeze``,
``set_lr``, ``set_train_mode``, ``rewind``), so it is recorded in ``history.controls`` and undone by
``rewind``.

Actions are computed for a finding, each time the session's ``findings`` is read, by the builders
registered here under the finding's code (:func:`register_action`, :func:`actions_for`): core
never imports the rules, and a builder reads only the finding's parameters and evidence and the
session (its optimizer, history, checkpoints). A builder offers an action only while it applies.

:data:`RESOLVERS` say, per code, when a finding re-checked after a control is over (see
``docs/findings.md``, "Actions and resolution"): setup findings are re-checked by the setup audit
after every control and need no resolver here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tlwidgets.core.controls import _base_lr, is_norm_layer, params_missing_from_optimizer
from tlwidgets.core.findings import Finding

__all__ = [
    "RESOLVERS",
    "TARGET_DECAY_SHARE",
    "TARGET_RATIO",
    "TYPICAL_DECAY",
    "Action",
    "actions_for",
    "is_decoupled_decay",
    "momentum_gain",
    "register_action",
    "rewind_keeping",
    "suggest_lr",
]

#: Update/weight ratio aimed at when an LR is chosen from the numbers: the ratio of the first steps
#: at the new LR (before momentum builds up). SGD with momentum 0.9 at its usual LR and Adam at
#: 1e-3 both start at about 1e-2 on a small MLP; the ratio then settles toward the ~1e-3 band as
#: training goes on (bigger models sit lower: the ratio per unit LR is measured, not assumed).
TARGET_RATIO = 1e-2
#: An LR named too high is lowered at least this many times (a fix that barely moves it is no fix),
#: and one named too low raised at least this many times.
MIN_FACTOR = 2.0
#: ... and moved at most this many times by one action.
MAX_FACTOR = 1e4
#: Measured steps used to read the ratio per unit LR: the first ones at the LR in force.
FIRST_ROWS = 3

#: Measured steps after a control with the condition gone before a trend finding is resolved.
RESOLVE_STEPS = 20
#: ... for conditions that are a state (a mode, a frozen parameter moving): a few steps suffice.
RESOLVE_STATE_STEPS = 3
#: lr-too-high is over when the update/weight ratio is below this (the rule's own threshold) ...
RESOLVE_HIGH_RATIO = 0.05
#: ... and the loss did not rise by more than this fraction over the steps since the fix.
RESOLVE_LOSS_RISE = 0.15
#: lr-too-low is over when the update/weight ratio is above this (10x the rule's threshold).
RESOLVE_LOW_RATIO = 3e-4


@dataclasses.dataclass(eq=False)
class Action:
    """A fix the session can carry out itself, offered on a finding (``finding.actions``).

    Attributes
    ----------
    label
        Button text, e.g. ``"Add to optimizer"`` or ``"Rewind to step 0 and set lr=0.044"``.
    description
        One line saying exactly what :meth:`apply` will do, with the names and numbers.
    code
        The code of the finding it fixes.
    finding_key
        The finding's ``key`` (code, params).
    done
        The confirmation line once applied (``None`` before).
    """

    label: str
    description: str
    code: str
    finding_key: tuple[str, tuple[str, ...]]
    _run: Callable[[], str] = dataclasses.field(repr=False)
    _applies: Callable[[], bool] = dataclasses.field(repr=False, default=lambda: True)
    _session: Any = dataclasses.field(repr=False, default=None)
    done: str | None = None

    @property
    def applies(self) -> bool:
        """Does the fix still apply (the state it was offered for has not changed since)?"""
        return self.done is None and bool(self._applies())

    def apply(self) -> str:
        """Carry out the fix through the session's controls; return the confirmation line.

        Raises
        ------
        RuntimeError
            When it was applied already or no longer applies (the state changed since it was
            offered: read ``findings`` again for the actions that apply now).
        """
        if self.done is not None:
            raise RuntimeError(f"{self.label!r} was applied already: {self.done}")
        if not self._applies():
            raise RuntimeError(
                f"{self.label!r} no longer applies (the session changed since it was offered); "
                "read findings again for the actions that apply now"
            )
        self.done = self._run()
        if self._session is not None:
            self._session.applied_actions.setdefault(self.finding_key, []).append(self.done)
        return self.done

    def __repr__(self) -> str:
        return f"Action({self.label!r}: {self.description})"


ActionBuilder = Callable[[Any, Finding], Sequence[Action]]
_BUILDERS: dict[str, list[ActionBuilder]] = {}


def register_action(*codes: str) -> Callable[[ActionBuilder], ActionBuilder]:
    """Register ``builder(session, finding) -> [Action, ...]`` for findings of ``codes``.

    Builders of a code are asked in the order they were registered; their actions are listed in
    that order (the first is the one to try first).
    """

    def deco(builder: ActionBuilder) -> ActionBuilder:
        for code in codes:
            _BUILDERS.setdefault(code, []).append(builder)
        return builder

    return deco


def actions_for(session: Any, finding: Finding) -> tuple[Action, ...]:
    """The actions that apply to ``finding`` now (none for a resolved finding).

    A builder that raises offers nothing (its error goes to ``session.diagnostic_errors``;
    ``TLW_STRICT_RULES=1`` raises it instead).
    """
    if finding.resolved:
        return ()
    out: list[Action] = []
    for builder in _BUILDERS.get(finding.code, ()):
        try:
            made = list(builder(session, finding) or ())
        except Exception as exc:
            if os.environ.get("TLW_STRICT_RULES"):
                raise
            errors = getattr(session, "diagnostic_errors", None)
            if isinstance(errors, list):
                errors.append(f"actions {finding.code}: {type(exc).__name__}: {exc}")
                del errors[:-50]
            continue
        for a in made:
            a.finding_key = finding.key
            a._session = session
        out.extend(made)
    return tuple(out)


def _offer(
    finding: Finding, label: str, description: str, run: Callable[[], str], applies: Callable[[], bool]
) -> list[Action]:
    """The one action a builder offers for ``finding``."""
    return [Action(label, description, finding.code, finding.key, run, applies)]


def _short(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ============================================================================ optimizer membership
def _nearest_group(session: Any, name: str, where: dict[str, int | None]) -> tuple[int, str | None]:
    """The group of the parameter nearest ``name`` in model order that the optimizer holds (an earlier
    one on a tie: a new head sits after its backbone), and that parameter; group 0 if none."""
    names = session.param_names
    i = names.index(name)
    for d in range(1, len(names)):
        for j in (i - d, i + d):
            if 0 <= j < len(names) and where.get(names[j]) is not None:
                return int(where[names[j]]), names[j]
    return 0, None


@register_action("param-not-in-optimizer")
def _add_to_optimizer(session: Any, finding: Finding) -> list[Action]:
    def missing() -> list[str]:
        wanted = set(finding.params)
        return [
            n for n in params_missing_from_optimizer(session.named_params, session.optimizer) if n in wanted
        ]

    names = missing()
    if not names or not session.optimizer.param_groups:
        return []
    where = session.param_group_of()
    plan: dict[int, tuple[list[str], str | None]] = {}
    for n in names:
        g, near = _nearest_group(session, n, where)
        plan.setdefault(g, ([], near))[0].append(n)
    lrs = {g: _base_lr(session.optimizer, session.scheduler, g) for g in plan}
    parts = [
        f"{_short(ns)} with lr {lrs[g]:.3g} (the base LR of group {g}"
        + (f", which holds the nearest parameter {near})" if near else ")")
        for g, (ns, near) in plan.items()
    ]
    description = (
        f"Add {'; '.join(parts)} to the optimizer as "
        f"{'a new param group' if len(plan) == 1 else f'{len(plan)} new param groups'} "
        "(the optimizer's default hyperparameters otherwise; the scheduler is extended to it)."
    )

    def run() -> str:
        before = len(session.optimizer.param_groups)
        for g, (ns, _) in plan.items():
            session.unfreeze(*ns, lr=lrs[g])
        made = len(session.optimizer.param_groups) - before
        return (
            f"Added {len(names)} parameter(s) ({_short(names)}) to the optimizer: "
            f"{made} new group(s), lr {', '.join(f'{lrs[g]:.3g}' for g in plan)}."
        )

    return _offer(finding, "Add to optimizer", description, run, lambda: missing() == names)


# ============================================================================ nothing trainable
def _head(session: Any) -> str | None:
    """The last module (in definition order) with parameters of its own that is not a normalization
    layer: the classifier/regressor head. ``None`` when that is the whole model."""
    last = None
    for name, m in session.model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) and not is_norm_layer(m):
            last = name
    return last or None


#: Names of a model's top-level part that say "a pretrained feature extractor" (a fine-tune).
_BACKBONE_NAMES = frozenset(
    {
        "backbone",
        "encoder",
        "features",
        "feature_extractor",
        "base",
        "base_model",
        "body",
        "pretrained",
        "trunk",
    }
)


def _fine_tune(session: Any, head: str) -> bool:
    """Does the model look like a fine-tune whose body is meant to stay frozen?

    Yes when a part outside the head that has parameters is in eval mode while the model is in
    train mode (the user's ``backbone.eval()``: frozen on purpose), or when a top-level part is
    named like a pretrained feature extractor (``backbone``, ``encoder``, ``features``, ...).
    """
    model = session.model
    if any(n.split(".")[0].lower() in _BACKBONE_NAMES for n, _ in model.named_children()):
        return True
    if not model.training:
        return False
    prefix = head + "."
    for name, m in model.named_modules():
        outside = name and name != head and not name.startswith(prefix)
        if outside and not m.training and any(True for _ in m.parameters()):
            return True
    return False


@register_action("nothing-trainable")
def _unfreeze(session: Any, finding: Finding) -> list[Action]:
    frozen = session.frozen()
    if not frozen:
        return []
    total = len(session.param_names)

    def run_all() -> str:
        names = session.unfreeze("")
        return f"Unfroze all {len(names)} parameters (requires_grad=True); the optimizer holds them all."

    every = Action(
        "Unfreeze all",
        f"Set requires_grad=True on all {total} parameters ({len(frozen)} frozen now) and add those the "
        "optimizer lacks as a new group with the first group's base LR.",
        finding.code,
        finding.key,
        run_all,
        lambda: bool(session.frozen()),
    )
    head = _head(session)
    if head is None:
        return [every]
    prefix = head + "."
    in_head = [n for n in session.param_names if n.startswith(prefix)]
    if not any(n in frozen for n in in_head):
        return [every]

    def run_head() -> str:
        names = session.unfreeze(head)
        return f"Unfroze {head} ({_short(names)}); the rest of the model stays frozen."

    only_head = Action(
        "Unfreeze the head",
        f"Set requires_grad=True on {head} ({_short(in_head)}), the last layer with parameters, and add it "
        "to the optimizer if it is missing; the rest of the model stays frozen.",
        finding.code,
        finding.key,
        run_head,
        lambda: any(n in session.frozen() for n in in_head),
    )
    # A fine-tune's body is frozen on purpose (training it, in eval mode, can diverge): the head first.
    # Otherwise the model was meant to train whole, and a head on random features learns little.
    return [only_head, every] if _fine_tune(session, head) else [every, only_head]


# ============================================================================ learning rate
def _regime_start(session: Any, group: int) -> int:
    """Global step from which the group's LR is the one in force: its last ``set_lr``, the ``unfreeze``
    that created it, or a rewind (-1 when none: the LR of the start)."""
    for c in reversed(session.history.controls):
        d = c.detail or {}
        if c.kind == "rewind":
            return int(c.step)
        if c.kind == "set_lr" and int(d.get("group", -1)) == group:
            return int(c.step)
        if c.kind == "unfreeze" and d.get("new_group") == group:
            return int(c.step)
    return -1


def _columns(session: Any, params: Sequence[str], group: int) -> list[int]:
    """History columns of ``params`` (else: of the group's parameters)."""
    index = {n: i for i, n in enumerate(session.history.param_names)}
    cols = [index[n] for n in params if n in index]
    if not cols:
        where = session.param_group_of()
        cols = [index[n] for n, g in where.items() if g == group and n in index]
    return cols


def _ratio_per_lr(session: Any, group: int, params: Sequence[str]) -> float | None:
    """Update/weight ratio per unit LR of the group's parameters, on the first measured steps at the LR
    in force (the least damaged by it, the least changed by momentum building up): the smallest of
    their per-step medians over ``params``, each divided by the LR that step used. ``None`` when no
    such step was measured. Kept per (group, start of the LR, params): it does not change after."""
    since = _regime_start(session, group)
    cache: dict[Any, float | None] = session.__dict__.setdefault("_ratio_per_lr_cache", {})
    key = (group, since, tuple(params), len(session.history.controls))
    if key in cache and cache[key] is not None:
        return cache[key]
    h = session.history
    steps = h.window("step", len(h), measured=True)
    first = np.flatnonzero(steps > since)[:FIRST_ROWS]
    if first.size == 0:
        return None
    tail = len(steps) - int(first[0])  # measured rows from the first one wanted to the newest
    cols = _columns(session, params, group)
    if not cols:
        return None
    rows = first - int(first[0])
    upd = h.window("update_norm", tail)[rows][:, cols]
    wn = h.window("weight_norm", tail)[rows][:, cols]
    lr = h.window("lr", tail, measured=True)[rows]
    if group >= lr.shape[1]:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        r = upd / wn
    r[~(np.isfinite(r) & (wn > 0) & (upd > 0))] = np.nan
    per_lr = []
    for i in range(len(rows)):
        if np.isfinite(r[i]).any() and lr[i, group] > 0:
            per_lr.append(float(np.nanmedian(r[i])) / float(lr[i, group]))
    value = min(per_lr) if per_lr else None
    cache[key] = value
    del_keys = list(cache)[:-16]  # bounded: a long session with many LR changes
    for k in del_keys:
        del cache[k]
    return value


def suggest_lr(
    session: Any,
    group: int,
    params: Sequence[str] = (),
    *,
    evidence: dict[str, Any] | None = None,
    target: float = TARGET_RATIO,
) -> float | None:
    """An LR for ``group`` whose update/weight ratio lands on ``target``.

    The ratio per unit LR is read from the first measured steps at the LR in force (the update of
    SGD, momentum and Adam alike is proportional to the LR); when none was measured, from the
    finding's ``evidence`` (``update_ratio`` at ``lr``). ``None`` when neither is known.
    """
    per_lr = _ratio_per_lr(session, group, params)
    if per_lr is None and evidence:
        r, lr = evidence.get("update_ratio"), evidence.get("lr")
        if r is not None and lr and math.isfinite(float(r)) and float(r) > 0 and float(lr) > 0:
            per_lr = float(r) / float(lr)
    if per_lr is None or not math.isfinite(per_lr) or per_lr <= 0:
        return None
    groups = session.optimizer.param_groups
    if 0 <= group < len(groups):
        target *= momentum_gain(groups[group])
    return float(f"{target / per_lr:.2g}")  # two significant digits: a number a user would type


def momentum_gain(group: dict[str, Any]) -> float:
    """How much larger a first step must be for an SGD group of this momentum to make the progress
    :data:`TARGET_RATIO` stands for (1 at momentum 0.9, the calibration; Adam-family groups: 1).

    The ratio is read on the first steps at an LR, before momentum builds up. Momentum ``b`` then
    multiplies the step by up to ``1 / (1 - b)`` while the gradients agree (about 10 at 0.9), and by
    ``1 / sqrt(1 - b**2)`` once they are noise; the gain is the geometric mean of the two, relative to
    0.9: plain SGD needs first steps ~3x larger than SGD with momentum 0.9 to train as fast (measured
    on digits: lr 0.047 without momentum reaches 0.86 validation accuracy in 3 epochs where 0.15
    reaches 0.94, and momentum 0.9 at 0.05 0.96).
    """
    if "momentum" not in group or "dampening" not in group:  # not SGD: Adam, RMSprop, ... step by ~lr
        return 1.0
    b = float(group.get("momentum") or 0.0)
    if not 0.0 <= b < 1.0 or float(group.get("dampening") or 0.0) != 0.0:
        return 1.0

    def amplification(m: float) -> float:
        return math.sqrt(1.0 / (1.0 - m) / math.sqrt(1.0 - m * m))

    # At most 3x: a larger first step would sit at the lr-too-high rule's ratio (0.05) on its own.
    return min(amplification(0.9) / amplification(b), 3.0)


def rewind_keeping(session: Any, checkpoint: Any, reason: str, *, fixing: str) -> str:
    """Rewind ``session`` to ``checkpoint``, keeping the run it abandons reachable.

    At a step boundary (``session.at_step_boundary``) the state is first kept as a checkpoint of
    the user's list, labelled ``"before the fix of <fixing>"``, so the fix can be undone; mid-step
    none can be taken and the rewind alone happens.

    Parameters
    ----------
    session
        A Runner (anything with ``checkpoint()`` and ``rewind(handle, reason=)``).
    checkpoint
        The handle to go back to.
    reason
        Why (the label of the abandoned branch in the loss plot), e.g. the action's label.
    fixing
        What is being fixed (a finding's code, or ``"overfitting"`` for early stopping).

    Returns
    -------
    str
        The tail of the confirmation sentence that says the abandoned run was kept (``""`` when not).
    """
    undo = ""
    if getattr(session, "at_step_boundary", False):
        here = session.checkpoint(f"before the fix of {fixing}")
        undo = f" (the abandoned run is kept: runner.rewind() to checkpoint {here.id} goes back to it)"
    session.rewind(checkpoint, reason=reason)
    return undo


def _checkpoint_before(session: Any, step: int) -> Any:
    """The newest of the session's checkpoints (the user's and the automatic ones) taken at or before
    ``step`` (``None`` when none, or the session cannot rewind)."""
    cks = [*getattr(session, "checkpoints", ()), *getattr(session, "auto_checkpoints", ())]
    if not cks or getattr(session, "_one_shot", False) or not callable(getattr(session, "rewind", None)):
        return None
    before = [c for c in cks if c.step <= step]
    return max(before, key=lambda c: (c.step, c.id)) if before else None


def _lr_actions(session: Any, finding: Finding, *, high: bool) -> list[Action]:
    ev = finding.evidence or {}
    group = int(ev.get("group", 0))
    groups = session.optimizer.param_groups
    if not 0 <= group < len(groups):
        return []
    now = float(groups[group]["lr"])
    if not now > 0:
        return []
    if _regime_start(session, group) >= (finding.step if finding.step is not None else -1):
        return []  # the LR was set (or the run rewound) since the finding was last seen: wait for new numbers
    new = suggest_lr(session, group, finding.params, evidence=ev)
    if new is None:
        return []
    # The fix moves the LR the right way, by at least MIN_FACTOR, at most MAX_FACTOR.
    if high:
        new = float(f"{min(max(new, now / MAX_FACTOR), now / MIN_FACTOR):.2g}")
        if not new < now:
            return []
    else:
        new = float(f"{max(min(new, now * MAX_FACTOR), now * MIN_FACTOR):.2g}")
        if not new > now:
            return []
    where = f"group {group}" if len(groups) > 1 else "the optimizer"
    setter = f"set_lr({new:.2g}{f', group={group}' if len(groups) > 1 else ''})"
    ck = None
    if high:
        onset = min(max(_regime_start(session, group), 0), finding.first_step or 0)
        ck = _checkpoint_before(session, onset)

    def still() -> bool:
        return float(session.optimizer.param_groups[group]["lr"]) == now

    if ck is not None:

        def run_rewind() -> str:
            undo = rewind_keeping(
                session, ck, f"Rewind to step {ck.step} and set lr={new:.2g}", fixing=finding.code
            )
            session.set_lr(new, group=group)
            return (
                f"Rewound to step {ck.step} ({ck.label}) and set the LR of {where} to {new:.2g} "
                f"(was {now:.3g}){undo}."
            )

        return _offer(
            finding,
            f"Rewind to step {ck.step} and set lr={new:.2g}",
            f"Rewind to checkpoint {ck.id} (step {ck.step}, before the LR of {now:.3g} did damage), then "
            f"{setter}: the LR whose update/weight ratio is ~{TARGET_RATIO:.0e} by the numbers measured.",
            run_rewind,
            still,
        )

    def run_set() -> str:
        session.set_lr(new, group=group)
        return f"Set the LR of {where} to {new:.2g} (was {now:.3g})."

    why = f"the LR whose update/weight ratio is ~{TARGET_RATIO:.0e} by the numbers measured"
    extra = (
        ""
        if not high
        else " No checkpoint from before the damage to rewind to: the weights stay as they are."
    )
    return _offer(
        finding,
        f"Set lr={new:.2g}",
        f"{setter} on {where} (now {now:.3g}): {why}.{extra}",
        run_set,
        still,
    )


@register_action("lr-too-high")
def _lr_too_high(session: Any, finding: Finding) -> list[Action]:
    return _lr_actions(session, finding, high=True)


@register_action("exploding-gradients")
def _explosion_lr(session: Any, finding: Finding) -> list[Action]:
    """Gradients that grew by orders of magnitude during training: steps too large for the curvature
    reached, the LR's fault (rewind to before the growth and lower it). Not for an explosion from
    initialization (the weights' scale is the cause; a lower LR only hides it)."""
    if "growth" not in (finding.evidence or {}):
        return []
    return _lr_actions(session, finding, high=True)


@register_action("lr-too-low")
def _lr_too_low(session: Any, finding: Finding) -> list[Action]:
    return _lr_actions(session, finding, high=False)


def _first_step_ratio_per_lr(session: Any, group: int, cols: list[int]) -> float | None:
    """Update/weight ratio per unit LR that a first step of ``group`` would make, from the newest
    gradient and weight norms of its parameters (the median over ``cols``), for a group that has not
    moved (LR 0): SGD's first step is ``lr * grad``; the Adam family (and every optimizer that scales
    each element by its own gradient history) moves each element by about ``lr``."""
    h = session.history
    if not h.measured_count or not cols:
        return None
    wn = h.window("weight_norm", 1)[0, cols]
    g = session.optimizer.param_groups[group]
    if "momentum" in g and "dampening" in g:  # SGD
        top = h.window("grad_norm", 1)[0, cols]
    else:
        sizes = {n: p.numel() for n, p in session.named_params}
        top = np.sqrt([float(sizes.get(h.param_names[c], 0)) for c in cols])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = top / wn
    r = r[np.isfinite(r) & (r > 0)]
    return float(np.median(r)) if r.size else None


@register_action("param-not-updating")
def _give_group_lr(session: Any, finding: Finding) -> list[Action]:
    """A group whose LR is 0 holds the parameters that do not move: give it the LR the numbers support."""
    where = session.param_group_of()
    groups = {where.get(n) for n in finding.params} - {None}
    if len(groups) != 1 or not callable(getattr(session, "set_lr", None)):
        return []
    group = int(groups.pop())
    opt_groups = session.optimizer.param_groups
    if float(opt_groups[group]["lr"]) != 0.0:
        return []  # an LR > 0 with no update: the gradients are cleared before step() (a loop bug)
    index = {n: i for i, n in enumerate(session.history.param_names)}
    cols = [index[n] for n in finding.params if n in index]
    per_lr = _first_step_ratio_per_lr(session, group, cols)
    if per_lr is None:
        return []
    # Adam's first step is its largest (each element moves by lr; later by less as the gradients' noise
    # enters the denominator), so a group starting from nothing gets twice the usual first-step ratio.
    adaptive = 1.0 if "momentum" in opt_groups[group] and "dampening" in opt_groups[group] else 2.0
    aim = adaptive * TARGET_RATIO * momentum_gain(opt_groups[group])
    new = float(f"{aim / per_lr:.2g}")
    others = [float(g["lr"]) for i, g in enumerate(opt_groups) if i != group and float(g["lr"]) > 0]
    if others:  # no more than 100x the other groups' (a head trains faster than its backbone, not wildly)
        new = float(f"{min(new, 100 * max(others)):.2g}")
    setter = f"set_lr({new:.2g}, group={group})"

    def run() -> str:
        session.set_lr(new, group=group)
        return f"Set the LR of group {group} ({_short(finding.params)}) to {new:.2g} (was 0)."

    return _offer(
        finding,
        f"Set lr={new:.2g} for group {group}",
        f"{setter}: the group's LR is 0, so its parameters never move; {new:.2g} makes their first "
        f"update ~{aim:.0e} of their weights by the gradient and weight norms measured.",
        run,
        lambda: float(session.optimizer.param_groups[group]["lr"]) == 0.0,
    )


# ============================================================================ schedule
@register_action("scheduler-too-fast")
def _per_epoch(session: Any, finding: Finding) -> list[Action]:
    if (
        getattr(session, "scheduler", None) is None
        or getattr(session, "scheduler_interval", None) != "step"
        or not callable(getattr(session, "set_scheduler_interval", None))
    ):
        return []
    ev = finding.evidence or {}
    # The schedule wasted the steps since the LR collapsed: rewind to before it when a checkpoint allows.
    ck = _checkpoint_before(session, int(ev.get("collapse_step", finding.first_step or 0)))

    def still() -> bool:
        return session.scheduler_interval == "step"

    def run() -> str:
        undo = ""
        if ck is not None:
            undo = rewind_keeping(
                session, ck, f"Rewind to step {ck.step} and step the scheduler per epoch", fixing=finding.code
            )
        session.set_scheduler_interval("epoch")
        lrs = ", ".join(f"{float(g['lr']):.3g}" for g in session.optimizer.param_groups)
        back = f"Rewound to step {ck.step}; the" if ck is not None else "The"
        return f"{back} scheduler now steps once per epoch, at epoch {session.epoch} of it: lr {lrs}{undo}."

    name = type(session.scheduler).__name__
    what = (
        f"step {name} once per epoch instead of after every batch, placed at the epochs done so far "
        "(the LR set from the schedule there)"
    )
    if ck is not None:
        return _offer(
            finding,
            f"Rewind to step {ck.step} and step the scheduler per epoch",
            f"Rewind to checkpoint {ck.id} (step {ck.step}, before the LR collapsed), then {what}.",
            run,
            still,
        )
    return _offer(
        finding,
        "Step the scheduler per epoch",
        f"{what[0].upper()}{what[1:]}.",
        run,
        still,
    )


def _resolve_schedule(session: Any, finding: Finding, since: int) -> bool:
    # The LR of the group is back above the collapse (a hundredth of its peak) for a few steps.
    ev = finding.evidence or {}
    group, peak = int(ev.get("group", 0)), float(ev.get("peak_lr", 0) or 0)
    lrs = _losses_since(session, since)
    groups = session.optimizer.param_groups
    return (
        lrs.size >= RESOLVE_STATE_STEPS and group < len(groups) and float(groups[group]["lr"]) > 0.01 * peak
    )


# ============================================================================ regularization
#: Weight decay aimed at: its pull a small share of the data gradient (coupled decay) ...
TARGET_DECAY_SHARE = 0.05
#: ... and never above the usual values (SGD's coupled decay, AdamW's decoupled one).
TYPICAL_DECAY = {"coupled": 5e-4, "decoupled": 1e-2}


def is_decoupled_decay(group: dict[str, Any], optimizer: Any) -> bool:
    """Is the weight decay of ``group`` (a param group of ``optimizer``) AdamW-style: applied to the
    weights and scaled by the LR, rather than added to the gradient (SGD's, Adam's coupled decay)?"""
    name = type(optimizer).__name__
    # A substring for AdamW: fused and third-party variants (FusedAdamW, AdamWScheduleFree) decouple too.
    return bool(group.get("decoupled_weight_decay")) or "AdamW" in name or name in ("SGDW", "LAMB")


@register_action("over-regularization")
def _lower_weight_decay(session: Any, finding: Finding) -> list[Action]:
    ev = finding.evidence or {}
    group = int(ev.get("group", 0))
    groups = session.optimizer.param_groups
    if not 0 <= group < len(groups) or not callable(getattr(session, "set_weight_decay", None)):
        return []
    wd = float(groups[group].get("weight_decay", 0) or 0)
    if wd <= 0 or float(ev.get("weight_decay", -1)) != wd:
        return []  # a penalty in the loss (not ours to change), or the decay was changed since
    kind = "decoupled" if is_decoupled_decay(groups[group], session.optimizer) else "coupled"
    share = float(ev.get("share", math.nan))
    new = wd * TARGET_DECAY_SHARE / share if math.isfinite(share) and share > 0 else TYPICAL_DECAY[kind]
    new = float(f"{min(new, TYPICAL_DECAY[kind], wd / 10):.2g}")
    where = f"group {group}" if len(groups) > 1 else "the optimizer"
    # Weights pulled toward zero by the decay: rewind to before it did so when a checkpoint allows.
    start = -1
    for c in reversed(session.history.controls):
        if c.kind == "rewind" or (c.kind == "set_weight_decay" and (c.detail or {}).get("group") == group):
            start = int(c.step)
            break
    ck = _checkpoint_before(session, min(max(start, 0), finding.first_step or 0))

    def still() -> bool:
        return float(session.optimizer.param_groups[group].get("weight_decay", 0) or 0) == wd

    def run() -> str:
        undo = ""
        if ck is not None:
            undo = rewind_keeping(
                session, ck, f"Rewind to step {ck.step} and set weight_decay={new:.2g}", fixing=finding.code
            )
        session.set_weight_decay(new, group=group)
        back = f"Rewound to step {ck.step} and set" if ck is not None else "Set"
        return f"{back} the weight_decay of {where} to {new:.2g} (was {wd:g}){undo}."

    what = f"set_weight_decay({new:.2g}{f', group={group}' if len(groups) > 1 else ''})"
    why = (
        f"the decay's pull ~{TARGET_DECAY_SHARE:.0%} of the data gradient, at most the usual "
        f"{TYPICAL_DECAY[kind]:g}"
    )
    if ck is not None:
        return _offer(
            finding,
            f"Rewind to step {ck.step} and set weight_decay={new:.2g}",
            f"Rewind to checkpoint {ck.id} (step {ck.step}, before the decay shrank the weights), then "
            f"{what}: {why}.",
            run,
            still,
        )
    return _offer(
        finding,
        f"Set weight_decay={new:.2g}",
        f"{what} on {where} (now {wd:g}): {why}.",
        run,
        still,
    )


#: The drop probability the dropout action sets: inside the usual 0.1-0.5, low enough not to slow
#: training (a model that then overfits says so through the fit panel and the overfitting finding).
DROPOUT_P = 0.2


@register_action("dropout-too-high")
def _lower_dropout(session: Any, finding: Finding) -> list[Action]:
    ev = finding.evidence or {}
    name = ev.get("module")
    mods = dict(session.model.named_modules())
    module = mods.get(name) if isinstance(name, str) else None
    if module is None or not callable(getattr(session, "set_dropout", None)):
        return []  # dropout called as a function in forward(): no module whose p a control can set
    p = float(getattr(module, "p", 0.0))
    if p <= DROPOUT_P or p != float(ev.get("p", -1)):
        return []  # changed since

    def run() -> str:
        session.set_dropout(DROPOUT_P, name)
        return f"Set the dropout of '{name}' to p={DROPOUT_P:g} (was {p:g})."

    return _offer(
        finding,
        f"Set dropout p={DROPOUT_P:g}",
        f"set_dropout({DROPOUT_P:g}, {name!r}): '{name}' drops {p:.0%} of its inputs at every step; "
        f"{DROPOUT_P:.0%} sits in the usual 0.1-0.5 range.",
        run,
        lambda: float(getattr(module, "p", 0.0)) == p,
    )


def _resolve_regularization(session: Any, finding: Finding, since: int) -> bool:
    # The rule looks every 20 steps: twice the usual evidence, with the loss finite and not rising.
    _, n = _since(session, since)
    return n >= 2 * RESOLVE_STEPS and _loss_settled(session, since)


# ============================================================================ freezing and modes
@register_action("frozen-param-changed")
def _freeze_properly(session: Any, finding: Finding) -> list[Action]:
    params = dict(session.named_params)
    names = [n for n in finding.params if n in params]

    def loose() -> list[str]:
        return [n for n in names if params[n].requires_grad or params[n].grad is not None]

    todo = loose()
    if not todo:
        return []

    def run() -> str:
        session.freeze(*names, reset_state=True)
        return (
            f"Froze {_short(names)}: requires_grad=False, gradients and optimizer state (momentum) cleared, "
            "so no optimizer moves them."
        )

    return _offer(
        finding,
        "Freeze properly",
        f"freeze({_short(names)}, reset_state=True): requires_grad=False, their gradients set to None "
        "and their momentum dropped, so neither momentum nor weight decay moves them.",
        run,
        lambda: bool(loose()),
    )


@register_action("eval-mode-training")
def _train_mode(session: Any, finding: Finding) -> list[Action]:
    if not callable(getattr(session, "set_train_mode", None)):
        return []
    mods = dict(session.model.named_modules())
    # The model itself in eval mode (a model.eval() left over): model.train() is the fix. Otherwise the
    # layers named, the model's other parts (frozen on purpose, say) left as they are.
    names = [] if not session.model.training else [n for n in finding.params if n in mods and n != ""]
    whole = not names

    def in_eval() -> bool:
        return not session.model.training or any(not mods[n].training for n in names)

    if not in_eval():
        return []

    def run() -> str:
        switched = session.set_train_mode(*names)
        return f"Put {_short(switched)} in train mode."

    what = "the model (model.train())" if whole else f"{_short(names)} and the model itself"
    return _offer(
        finding,
        "Switch to train mode",
        f"Put {what} in train mode for the training steps; frozen parts held in eval mode stay so.",
        run,
        in_eval,
    )


@register_action("frozen-bn-stats-drift")
def _hold_bn(session: Any, finding: Finding) -> list[Action]:
    if not callable(getattr(session, "set_bn_eval", None)):
        return []
    mods = dict(session.model.named_modules())
    names = [n for n in finding.params if n in mods]

    def drifting() -> list[str]:
        return [n for n in names if mods[n].training and n not in session.bn_eval]

    todo = drifting()
    if not todo:
        return []

    def run() -> str:
        held = session.set_bn_eval(True, *todo)
        return (
            f"Holding {_short(held)} in eval mode: their running statistics stay put while training goes on."
        )

    return _offer(
        finding,
        "Hold frozen batch norm in eval mode",
        f"set_bn_eval(True, {_short(todo)}): these frozen batch-norm layers stay in eval mode (the "
        "runner puts them back before every forward), so their running mean and variance stop drifting.",
        run,
        lambda: drifting() == todo,
    )


# ============================================================================ resolution
def _since(session: Any, since: int, key: str = "update_norm") -> tuple[np.ndarray, int]:
    """Measured rows of ``key`` whose step is after ``since`` (oldest first), and their count."""
    h = session.history
    steps = h.window("step", len(h), measured=True)
    n = int(np.count_nonzero(steps > since))
    return (h.window(key, n) if n else np.zeros((0, len(h.param_names)))), n


def _ratio_since(session: Any, finding: Finding, since: int) -> tuple[float, int]:
    group = int((finding.evidence or {}).get("group", 0))
    cols = _columns(session, finding.params, group)
    upd, n = _since(session, since, "update_norm")
    if not n or not cols:
        return math.nan, n
    wn, _ = _since(session, since, "weight_norm")
    with np.errstate(divide="ignore", invalid="ignore"):
        r = upd[:, cols] / wn[:, cols]
    r[~np.isfinite(r)] = np.nan
    per_step = np.array([np.nanmedian(row) if np.isfinite(row).any() else np.nan for row in r])
    per_step = per_step[np.isfinite(per_step)]
    return (float(np.median(per_step)) if per_step.size else math.nan), n


def _losses_since(session: Any, since: int) -> np.ndarray:
    h = session.history
    steps = h.window("step", len(h), measured=False)
    n = int(np.count_nonzero(steps > since))
    return h.window("loss", n, measured=False) if n else np.zeros(0)


def _loss_settled(session: Any, since: int) -> bool:
    """Every loss since ``since`` is finite and the second half is not above the first by more than
    ``RESOLVE_LOSS_RISE``."""
    losses = _losses_since(session, since)
    if losses.size < 2 or not np.isfinite(losses).all():
        return False
    half = losses.size // 2
    first, last = float(np.median(losses[:half])), float(np.median(losses[half:]))
    return (
        last <= first * (1 + RESOLVE_LOSS_RISE)
        if first > 0
        else last <= first + abs(first) * RESOLVE_LOSS_RISE
    )


def _resolve_lr_high(session: Any, finding: Finding, since: int) -> bool:
    r, n = _ratio_since(session, finding, since)
    return (
        n >= RESOLVE_STEPS and math.isfinite(r) and r < RESOLVE_HIGH_RATIO and _loss_settled(session, since)
    )


def _resolve_lr_low(session: Any, finding: Finding, since: int) -> bool:
    r, n = _ratio_since(session, finding, since)
    losses = _losses_since(session, since)
    return (
        n >= RESOLVE_STEPS and math.isfinite(r) and r > RESOLVE_LOW_RATIO and bool(np.isfinite(losses).all())
    )


def _resolve_frozen_moving(session: Any, finding: Finding, since: int) -> bool:
    upd, n = _since(session, since, "update_norm")
    index = {name: i for i, name in enumerate(session.history.param_names)}
    cols = [index[p] for p in finding.params if p in index]
    if n < RESOLVE_STATE_STEPS or not cols:
        return False
    moved = upd[:, cols]
    return not bool((moved[np.isfinite(moved)] > 0).any())


def _resolve_moving(session: Any, finding: Finding, since: int) -> bool:
    upd, n = _since(session, since, "update_norm")
    index = {name: i for i, name in enumerate(session.history.param_names)}
    cols = [index[p] for p in finding.params if p in index]
    if n < RESOLVE_STATE_STEPS or not cols:
        return False
    moved = upd[-RESOLVE_STATE_STEPS:, cols]
    return bool(np.isfinite(moved).all() and (moved > 0).all())


def _resolve_eval_mode(session: Any, finding: Finding, since: int) -> bool:
    _, n = _since(session, since)
    mods = dict(session.model.named_modules())
    modes = [mods[p].training for p in finding.params if p in mods and p != ""]
    return n >= RESOLVE_STATE_STEPS and session.model.training and all(modes)


def _resolve_bn_held(session: Any, finding: Finding, since: int) -> bool:
    _, n = _since(session, since)
    mods = dict(session.model.named_modules())
    return n >= RESOLVE_STATE_STEPS and all(not mods[p].training for p in finding.params if p in mods)


def _resolve_stage_ok(session: Any, finding: Finding, since: int) -> bool:
    # Whole steps completed since (every stage ran) and the error was not raised again.
    return _losses_since(session, since).size >= RESOLVE_STATE_STEPS


def _resolve_finite(session: Any, finding: Finding, since: int) -> bool:
    losses = _losses_since(session, since)
    return losses.size >= RESOLVE_STEPS and bool(np.isfinite(losses).all())


#: code -> ``resolver(session, finding, since) -> bool``: is the condition gone in the steps after
#: global step ``since`` (a control)? Asked after every step while a control's re-check is open; a
#: report of the finding in between restarts the count (``FindingsMixin._recheck``).
RESOLVERS: dict[str, Callable[[Any, Finding, int], bool]] = {
    "lr-too-high": _resolve_lr_high,
    "lr-too-low": _resolve_lr_low,
    "frozen-param-changed": _resolve_frozen_moving,
    "param-not-updating": _resolve_moving,
    "eval-mode-training": _resolve_eval_mode,
    "frozen-bn-stats-drift": _resolve_bn_held,
    "over-regularization": _resolve_regularization,
    "scheduler-too-fast": _resolve_schedule,
    "non-finite-loss": _resolve_finite,
    "non-finite-grad": _resolve_finite,
    **dict.fromkeys(
        (
            "stage-error",
            "shape-mismatch",
            "device-mismatch",
            "dtype-mismatch",
            "inplace-modification",
            "out-of-memory",
            "target-out-of-range",
        ),
        _resolve_stage_ok,
    ),
}
