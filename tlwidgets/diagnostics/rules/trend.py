"""Trend rules: what a window of steps (or epochs) shows.

They read the newest rows of the per-step history (a window of at most a few
dozen rows, never the whole ring), compare robust statistics (medians of
window halves, not single steps, because minibatch losses are noisy) and run
every few steps (``Rule.every``), so their cost per step stays in the
microseconds.

Windows of per-parameter statistics count *measured* rows (the tracker
measures every step in a dense phase and every ``measure_every``-th step
otherwise), and the minimum evidence a rule waits for is a number of measured
rows: a trend that starts at step 3,000 of a sparse phase is judged on as many
measurements as one at step 30. Loss windows that go with them cover the same
steps (``History.span``), every step's loss included. Label statistics
accumulate in a small per-session state from the FETCH records.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
from torch import nn

from tlwidgets.core.actions import is_decoupled_decay
from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.derived import PURE_P_VALUE, PURE_SHARE  # noqa: F401 (PURE_P_VALUE: public threshold)
from tlwidgets.diagnostics.rules.base import (
    RuleContext,
    nanmedian,
    rule,
    short_list,
    tail,
)

__all__ = [
    "TREND_RULES",
    "RatioBand",
    "binary_labels",
    "dead_relu",
    "exploding_at_overflow",
    "exploding_gradients",
    "labels",
    "loss_plateau",
    "lr_at_nan",
    "lr_rate",
    "over_regularization",
    "overfitting",
    "scheduler_too_fast",
    "update_ratio_band",
    "vanishing_gradients",
]

# -- thresholds (docs/findings.md explains why each holds on healthy runs) -----------------------
#: Steps of history the LR rules look at, and the least they need.
LR_WINDOW = 20
LR_MIN_STEPS = 10
#: A one-step jump of the loss by this factor after big updates names the LR (lr-at-nan).
LOSS_SPIKE = 10.0
#: Median update/weight ratio above which an LR is "far above ~1e-3" (with a misbehaving loss) ...
LR_HIGH_RATIO = 0.05
#: ... and above which it is too high whatever the loss does (weights change by half their norm per step).
LR_EXTREME_RATIO = 0.5
#: The loss "rises" when the newer half-window median exceeds the older one by this fraction, ...
LOSS_RISE = 0.15
#: ... "diverges" when it exceeds the run's starting loss by this factor, ...
LOSS_DIVERGE = 1.5
#: ... "oscillates" when the median step-to-step change is this fraction of the loss level
#: (while still above LR_STILL_HIGH of the starting loss).
LOSS_VOLATILITY = 0.4
LR_STILL_HIGH = 0.3
#: ... (a median ratio above twice LR_HIGH_RATIO with such jumps is too high even when the loss has
#: come down a long way: the batch-to-batch jumps are the steps overshooting).
#: A blow-up: on LR_BLOWUP_STEPS measured steps of the window the weights changed by more than
#: LR_EXTREME_RATIO of their norm, and the loss jumped above LOSS_BLOWUP times the run's first loss.
#: The dead units and tiny steps that follow are its aftermath, not a second cause.
LR_BLOWUP_STEPS = 2
LOSS_BLOWUP = 3.0
#: Persistently too high: on LR_PERSIST_HITS of the last LR_PERSIST_EVALS evaluations the median
#: ratio was above LR_PERSIST_RATIO (20x the healthy ~1e-3) and the loss jumped (rise or volatility
#: as above). A single window can look calm by chance; a run whose steps overshoot keeps doing it.
LR_PERSIST_RATIO = 0.02
#: The LR grew by this factor over the window: a warm-up under way.
LR_WARMING = 1.5
#: During a warm-up, a loss rise is a bump while the loss stays below this share of its start.
LR_WARMUP_BUMP = 0.5
LR_PERSIST_EVALS = 5
LR_PERSIST_HITS = 4
#: Median update/weight ratio below which an LR is "far below ~1e-3" (loss barely moving).
LR_LOW_RATIO = 3e-5
#: ... and the fastest-moving weight matrix below this.
LR_LOW_FASTEST = 3e-4
#: ... or (with several groups) this fraction of the other groups' median ratio.
LR_GROUP_LAG = 1e-2
LR_LOW_MIN_STEPS = 20
#: A group is also too slow with steps up to 10x LR_LOW_RATIO (the fastest matrix below
#: LR_LOW_STUCK_FASTEST) when the loss has not moved at all: after LR_STUCK_MIN_STEPS measured steps
#: it is within LOSS_STUCK of its start or, for a class loss, no better than a uniform guess. (SGD
#: with momentum 0.9 at lr 1e-4 on digits: ratio ~2e-4, loss 2.36 -> 2.35 over 46 steps, accuracy at
#: chance.) A healthy run at such ratios moves its loss by more than 1% in 40 steps, or started far
#: below a guess (a pretrained model).
LR_LOW_STUCK_RATIO = 3e-4
LR_LOW_STUCK_FASTEST = 1e-3
LOSS_STUCK = 0.99
#: ... a class loss still at least this fraction of the uniform guess's (ln C) counts as not moved.
LOSS_GUESS = 0.97
LR_STUCK_MIN_STEPS = 40
#: A group whose LR is below this fraction of its peak so far was lowered on purpose (a schedule
#: decaying, a plateau reduction): tiny steps then are the schedule's, judged by scheduler-too-fast.
LR_DECAYED = 0.1
#: An LR named too high stays the cause of what follows (dead units, tiny steps after a blow-up)
#: until it is lowered below this fraction of the LR it was named at.
LR_HIGH_MEMORY = 1 / 3
#: Barely moving: newest loss above this fraction of the starting loss.
LOSS_BARELY_MOVED = 0.95
#: Converged: newest loss below this fraction of the starting loss (as loss-plateau reads it). Tiny
#: steps then come from gradients that faded (under Adam they near its eps), not from the LR: raising
#: it has nothing left to gain. Unless the LR itself was cut during the run below LR_CUT of the
#: highest it had (a set_lr typo late in a run that had learned): then the LR makes the steps tiny.
LOSS_CONVERGED = 0.05
LR_CUT = 0.1
#: ... but a loss below this fraction of its start is converged even after such a cut: little is
#: left for a higher LR to gain (an LR cut 50x on a run at 1e-5 of its starting loss was called too low).
LOSS_DONE = 1e-2
#: scheduler-too-fast: LR at or below this fraction of its peak counts as collapsed, ...
SCHED_COLLAPSE = 1e-2
#: ... for at least this share of the steps so far (schedules that end at zero spend the last
#: ~5% of the run, polynomial ones up to ~20%, below 1e-2 of the peak) ...
SCHED_LOW_SHARE = 0.25
#: ... or after this many separate dips there (a period counted in batches) ...
SCHED_DIPS = 2
#: ... and the first collapse happens within this many epochs (Runner) or steps (own loop).
SCHED_EPOCHS = 2
SCHED_STEPS = 1000
#: exploding: total grad norm this many times its starting level ...
EXPLODE_GROWTH = 100.0
#: ... or grad/weight norm ratio of the typical weight matrix above this on the first steps,
#: while those gradients move the typical weight matrix by more than this fraction of its norm
#: per step (Adam-like optimizers, or an LR scaled to the loss, absorb a large loss scale).
EXPLODE_INIT_RATIO = 1e3
EXPLODE_INIT_UPDATE = 0.1
#: vanishing: the first depth's grad/weight ratio (median over its weight matrices) below this
#: fraction of the last hidden depths' (the output layer left out), ...
VANISH_RATIO = 1e-4
#: ... and the second depth's below this fraction (the shrinking runs through the stack: one block
#: alone far below the rest is that block's own matter, not gradients fading with depth).
VANISH_NEXT_RATIO = 1e-2
VANISH_MIN_MATRICES = 4
#: Depths (blocks, see :func:`_depth_key`) a profile needs before it is judged.
VANISH_MIN_DEPTHS = 4
VANISH_WINDOW = 10
#: dead-relu: fraction of a ReLU layer's units never positive, on this many measurements in a row.
DEAD_FRAC = 0.9
DEAD_MEASUREMENTS = 3
#: ... or two measurements at least this many steps apart (activations are measured every
#: ``activation_every`` steps after the first 3: two far-apart looks are as telling as three close ones).
DEAD_SPAN = 20
#: over-regularization: decay term's share, weight shrink and the loss stuck near its start.
REG_SHARE = 0.5
REG_SHARE_STRONG = 2.0
REG_SHRINK = 0.95
REG_STUCK = 0.2
#: ... without weight decay: weight matrices below this share of their starting norm, loss stalled.
REG_PENALTY_SHRINK = 0.5
#: ... and a class loss that started above this multiple of ln(C) (the penalty inflates it).
REG_PENALTY_START = 1.5
#: loss-plateau: improvement below this fraction between two windows of PLATEAU_WINDOW steps.
PLATEAU_IMPROVEMENT = 0.01
PLATEAU_WINDOW = 50
#: overfitting: validation loss rising this many epochs in a row, by at least this fraction of its best.
OVERFIT_RISES = 2
OVERFIT_MARGIN = 0.05
#: ... a warning unless validation accuracy (when measured) is still within this of its best.
OVERFIT_ACCURACY_SLACK = 0.005
#: class-imbalance: majority/minority count ratio and the samples it needs.
IMBALANCE_RATIO = 10.0
IMBALANCE_MIN_SAMPLES = 150
IMBALANCE_PER_CLASS = 20
#: unshuffled-data thresholds live with the label tally they test (:mod:`tlwidgets.diagnostics.derived`).


@dataclasses.dataclass(frozen=True)
class RatioBand:
    """The update/weight ratios :func:`lr_rate` judges an optimizer group's median ratio against.

    Attributes
    ----------
    low
        Below it, with the loss barely moving, the LR is named too low (``lr-too-low``).
    high
        Above it, with the loss rising, diverging or oscillating, the LR is named too high
        (``lr-too-high``).
    extreme
        Above it the LR is named too high whatever the loss does.
    """

    low: float
    high: float
    extreme: float


def update_ratio_band(optimizer: Any = None) -> RatioBand:
    """The band of update/weight ratios the LR rules treat as healthy, for ``optimizer``'s family.

    The rules judge every optimizer family (SGD, SGD with momentum, Adam, AdamW ...) against
    the same thresholds: a healthy AdamW run at 1e-3 sits around 1e-2 on small models, SGD with
    momentum at its usual LR likewise, and both are inside ``[low, high]``. Readers that show
    the band (the dashboard's heatmap) take it from here, with the optimizer, so they follow
    whatever the rules use (a per-family band would be returned from here too).

    Parameters
    ----------
    optimizer
        The optimizer whose band is asked for (unused while the band is the same for all).

    Returns
    -------
    RatioBand
        ``LR_LOW_RATIO``, ``LR_HIGH_RATIO`` and ``LR_EXTREME_RATIO``.
    """
    return RatioBand(low=LR_LOW_RATIO, high=LR_HIGH_RATIO, extreme=LR_EXTREME_RATIO)


# ================================================================================ helpers
def _loss0(ctx: RuleContext) -> float:
    """Median of the run's first 5 training losses (kept once known)."""
    return ctx.derived.loss0


def _halves(losses: np.ndarray) -> tuple[float, float]:
    half = len(losses) // 2
    return nanmedian(losses[:half]), nanmedian(losses[half:])


def _ratios(upd: np.ndarray, wn: np.ndarray) -> np.ndarray:
    """update/weight per row and column; NaN where the weight is 0 or nothing was updated."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = upd / wn
    r[(wn <= 0) | (upd <= 0) | ~np.isfinite(r)] = np.nan
    return r


def _group_columns(ctx: RuleContext, gi: int, usable: np.ndarray | None = None) -> np.ndarray:
    """Trainable weight matrices of optimizer group ``gi`` (or its other trainable params if it has none).

    ``usable`` (a mask over all parameters) leaves out columns the caller cannot judge.
    """
    groups = ctx.group_index()
    keep = ctx.trainable() if usable is None else ctx.trainable() & usable
    mats = ctx.weight_matrices()
    cols = mats[(groups[mats] == gi) & keep[mats]] if mats.size else mats
    if cols.size == 0:
        cols = np.flatnonzero((groups == gi) & keep)
    return cols


def _not_grown_from_zero(ctx: RuleContext, h: Any) -> np.ndarray:
    """Mask of parameters whose first recorded norm (taken before the first update) was not 0.

    A zero-initialized tensor (a zero last layer, a LoRA B matrix) changes by about 1/t of its
    norm at step t while it grows from nothing: its update/weight ratio says nothing about the LR.
    """
    st = ctx.state
    first = st.get("first_norm")
    if first is None or len(first) != len(ctx.session.param_names):
        first = st["first_norm"] = tail(h, "weight_norm", len(h))[0]  # the first measured row
    return ~(first <= 0)


def _group_label(ctx: RuleContext, gi: int) -> str:
    n = len(ctx.session.optimizer.param_groups)
    return "" if n == 1 else f"group {gi}: "


# ================================================================================ learning rate
@rule("lr-rate", ["lr-too-high", "lr-too-low"], "trend", every=10)
def lr_rate(ctx: RuleContext) -> list[Finding]:
    """Update/weight ratio of each optimizer group against the ~1e-3 band, together with the loss trend."""
    s = ctx.session
    h = s.history
    n = h.measured_count
    if n < LR_MIN_STEPS:
        return []
    w = min(LR_WINDOW, n)
    ratio = _ratios(tail(h, "update_norm", w), tail(h, "weight_norm", w))
    losses = tail(h, "loss", h.span(w))  # every step's loss over the steps of the window
    lrs = tail(h, "lr", 1)[-1]
    lrs_then = tail(h, "lr", h.span(w))[0]  # each group's LR at the start of the window
    finite = losses[np.isfinite(losses)]
    if finite.size < LR_MIN_STEPS // 2:
        return []
    first, last = _halves(finite)
    loss0 = _loss0(ctx)
    rise = (last - first) / abs(first) if first else 0.0
    diverged = math.isfinite(loss0) and loss0 > 0 and last > LOSS_DIVERGE * loss0
    volatility = nanmedian(np.abs(np.diff(finite))) / abs(last) if last else 0.0
    still_high = not (math.isfinite(loss0) and loss0 > 0) or last > LR_STILL_HIGH * loss0
    stalled = _stalled(finite, first, last)
    first_loss = _first_loss(ctx)
    jumped = math.isfinite(first_loss) and first_loss > 0 and finite.max() > LOSS_BLOWUP * first_loss
    peaks = _lr_peaks(ctx, lrs)
    run_peaks = _lr_run_peaks(ctx, lrs)
    derived = ctx.derived
    named_high = derived.lr_named_high
    found: list[Finding] = []
    by_group: dict[int, tuple[np.ndarray, float]] = {}
    usable = _not_grown_from_zero(ctx, h)
    # Groups that hold a trainable tensor of 2 or more dims (the others hold only vectors: biases,
    # norm gains).
    multi = ctx.cached("multi_dim", lambda: np.array([p.dim() >= 2 for _, p in s.named_params], dtype=bool))
    held = ctx.group_index()[multi & ctx.trainable()]
    with_matrices = {int(g) for g in np.unique(held) if g >= 0}
    for gi in range(len(s.optimizer.param_groups)):
        cols = _group_columns(ctx, gi, usable)
        if cols.size == 0 or gi >= len(lrs) or not lrs[gi] > 0:
            continue
        per_step = nanmedian(ratio[:, cols], axis=1)
        r = nanmedian(per_step)
        if math.isfinite(r):
            by_group[gi] = (cols, r, int(np.sum(per_step > LR_EXTREME_RATIO)))
    for gi, (cols, r, extreme_steps) in by_group.items():
        names = [s.param_names[i] for i in cols.tolist()]
        label = _group_label(ctx, gi)
        evidence = {
            "group": gi,
            "lr": float(lrs[gi]),
            "update_ratio": r,
            "loss_rise": rise,
            "loss_volatility": volatility,
            "loss_first": first,
            "loss_last": last,
            "loss_start": loss0,
            "window": w,
            "extreme_steps": extreme_steps,
        }
        # Loss jumps have better explanations when batches are sorted by class (each step pulls toward
        # another class) or the gradients were huge from initialization on (the init, not the LR).
        explained = derived.unshuffled or derived.explode_init or derived.order_unknown
        if derived.stale_grads:
            continue  # gradients summed over steps make every step grow: grads-not-zeroed says why
        oscillating = volatility > LOSS_VOLATILITY and rise > -0.5 and (still_high or r > 2 * LR_HIGH_RATIO)
        # A warm-up (OneCycle, linear warm-up) raising the LR over the window: the loss may rise for a
        # while and settle again. Not a sign of too high an LR while the loss stays well below where the
        # run started; a rise that goes on past that, or a divergence, still is.
        warming = gi < len(lrs_then) and lrs[gi] > LR_WARMING * lrs_then[gi] > 0
        bump = warming and not diverged and math.isfinite(loss0) and 0 < last < LR_WARMUP_BUMP * loss0
        evidence["warming_up"] = bool(warming)
        rising = rise > LOSS_RISE or diverged or oscillating
        high = r > LR_HIGH_RATIO and not explained and not bump and rising
        blowup = extreme_steps >= LR_BLOWUP_STEPS and jumped and not explained
        jumpy = (rise > LOSS_RISE or volatility > LOSS_VOLATILITY) and not bump
        recent_hits = ctx.state.setdefault("persist", {}).setdefault(gi, [])
        recent_hits.append(bool(r > LR_PERSIST_RATIO and jumpy and not explained))
        del recent_hits[:-LR_PERSIST_EVALS]
        persistent = sum(recent_hits) >= LR_PERSIST_HITS
        if persistent:
            evidence["persistent_evaluations"] = sum(recent_hits)
        if r > LR_EXTREME_RATIO or high or blowup or persistent:
            if blowup and not high and r <= LR_EXTREME_RATIO:
                how = (
                    f"on {extreme_steps} of them the weights changed by more than "
                    f"{LR_EXTREME_RATIO:.0%} of their norm while the loss jumped to {finite.max():.3g} "
                    f"({finite.max() / first_loss:.3g}x its first value)"
                )
            elif diverged:
                how = f"the loss is {last / loss0:.3g}x its starting value"
            elif rise > LOSS_RISE:
                how = f"the loss rose {rise:.0%} over the last {w} steps"
            elif volatility > LOSS_VOLATILITY and still_high:
                how = f"the loss jumps by {volatility:.0%} of its level from step to step"
            else:
                how = "whatever the loss does"
            params = ctx.stable_params("lr-too-high", names, f"g{gi}")
            found.append(
                ctx.finding(
                    "lr-too-high",
                    f"{label}each step changes the weights by {r:.1%} of their norm (median of the last {w} "
                    "measured steps, "
                    f"healthy is ~0.1%) at lr {lrs[gi]:.3g}, and {how}",
                    params=params,
                    stage=None,
                    evidence=evidence,
                    fix=f"Lower the learning rate of {'the optimizer' if not label else label[:-2]} 3 to 10 "
                    "times "
                    f"(runner.set_lr({lrs[gi] / 10:.3g}{', group=' + str(gi) if label else ''}) or "
                    "optimizer.param_groups[i]['lr']), or run an LR range test and pick a value below where "
                    "the "
                    "loss starts to climb.",
                )
            )
            continue
        # Too low an LR slows every layer; if some layers move at a healthy pace the cause is elsewhere
        # (vanishing gradients, dead units), so the fastest layer must be slow too.
        # A collapsed schedule or clipping that cuts every step explains tiny updates: those findings
        # name the cause, and "raise the LR" would be the wrong fix.
        # So does a schedule that lowered the LR well below its peak (the end of a cosine): whether
        # that came too early is scheduler-too-fast's question. And after an LR named too high, tiny
        # steps are the aftermath of the blow-up (dead units), not a second, opposite cause.
        decayed = gi < len(peaks) and lrs[gi] < LR_DECAYED * peaks[gi]
        after_high = gi in named_high and lrs[gi] >= LR_HIGH_MEMORY * named_high[gi]
        held_back = derived.clipping or gi in derived.collapsed_groups or decayed or after_high
        # A group of biases and norm gains alone (Hugging Face's no-decay group) is not judged while
        # another group holds the weight matrices: those carry what the model learns and are judged
        # on their own, and vectors' steps say little about the LR (a norm gain's gradient fades
        # first as the loss nears its floor; a too-low LR there alone does not hold training back).
        vectors_only = gi not in with_matrices and bool(with_matrices - {gi})
        fastest = _fastest(ratio[:, cols]) if r < LR_LOW_STUCK_RATIO else math.inf
        low = r < LR_LOW_RATIO and fastest < LR_LOW_FASTEST
        stuck_band = r < LR_LOW_STUCK_RATIO and fastest < LR_LOW_STUCK_FASTEST and n >= LR_STUCK_MIN_STEPS
        if (
            not held_back
            and not vectors_only
            and (low or stuck_band)
            and n >= LR_LOW_MIN_STEPS
            and math.isfinite(loss0)
            and loss0 > 0
        ):
            recent = nanmedian(tail(h, "loss", 10))
            if not low:  # steps in the stuck band only: a loss that has not moved at all, at a guess
                chance = _chance_loss(s)
                guessing = recent > LOSS_GUESS * chance if chance is not None else recent > LOSS_STUCK * loss0
                if not guessing:
                    continue
            # A run that converged (the loss fell to a small fraction of its start) is not held back by
            # its LR, unless that LR was cut by an order of magnitude during the run.
            cut = gi < len(run_peaks) and lrs[gi] < LR_CUT * run_peaks[gi]
            converged = _converged(loss0, recent) and (not cut or recent < LOSS_DONE * loss0)
            # Barely moved since the start, or (an LR lowered late in a run) no improvement over the
            # window that stands out of the batch-to-batch noise while the weights hardly change.
            barely = recent > LOSS_BARELY_MOVED * loss0 or (
                stalled and r < LR_LOW_RATIO / 3 and not converged
            )
            # With several groups the loss can move thanks to the others: a group far behind them lags.
            others = [v for g, (_, v, _) in by_group.items() if g != gi]
            lagging = bool(others) and r < LR_GROUP_LAG * float(np.median(others)) and not converged
            if barely or lagging:
                params = ctx.stable_params("lr-too-low", names, f"g{gi}")
                if barely and recent > LOSS_BARELY_MOVED * loss0:
                    how = f"the loss barely moved ({loss0:.4g} -> {recent:.4g})"
                elif barely:  # fell earlier, stalled at this LR: say that, not "barely moved"
                    how = f"the loss stopped improving at {recent:.4g} (from {loss0:.4g} at the start)"
                else:
                    how = f"the other groups move {float(np.median(others)) / r:.3g}x faster"
                found.append(
                    ctx.finding(
                        "lr-too-low",
                        f"{label}each step changes the weights by only {r:.1e} of their norm (median of the "
                        f"last {w} measured steps, healthy is ~1e-3) at lr {lrs[gi]:.3g}, and {how}",
                        params=params,
                        stage=None,
                        evidence={**evidence, "loss_recent": recent, "lagging": lagging},
                        fix=f"Raise the learning rate 10 to 100 times (runner.set_lr({lrs[gi] * 30:.3g}"
                        f"{', group=' + str(gi) if label else ''}) or optimizer.param_groups[i]['lr']), "
                        "or run an LR range test to find the useful range.",
                    )
                )
    return found


def _first_loss(ctx: RuleContext) -> float:
    """The run's first training loss (the untrained model's), kept once known."""
    return ctx.derived.first_loss


def _stalled(losses: np.ndarray, first: float, last: float) -> bool:
    """No improvement from the first half of a loss window to the second beyond its noise.

    The noise is that of a difference of two half-window medians of i.i.d. batch
    losses: the median's standard error is about 1.25 sigma / sqrt(k), and sigma
    about 1.48 times the median absolute deviation. Improvements smaller than
    2.5 such errors (or 0.5%) are not told apart from a flat loss.
    """
    if losses.size < 4 or not (math.isfinite(first) and math.isfinite(last)):
        return False
    mad = nanmedian(np.abs(losses - nanmedian(losses)))
    k = losses.size / 2
    se = math.sqrt(2.0) * 1.25 * 1.4826 * mad / math.sqrt(k)
    return first - last < max(0.005 * abs(first), 2.5 * se)


def _lr_peaks(ctx: RuleContext, lrs: np.ndarray) -> list[float]:
    """Each group's highest LR seen by this rule so far; a set_lr or rewind starts it over."""
    st = ctx.state
    if _lr_set_since_last_look(ctx):
        st.pop("peaks", None)
    peaks: list[float] = st.setdefault("peaks", [])
    for gi, lr in enumerate(np.asarray(lrs, dtype=np.float64).tolist()):
        if gi >= len(peaks):
            peaks.append(lr if math.isfinite(lr) else 0.0)
        elif math.isfinite(lr) and lr > peaks[gi]:
            peaks[gi] = lr
    return peaks


def _converged(loss0: float, recent: float) -> bool:
    """The loss fell from a positive start to a small fraction of it (``LOSS_CONVERGED``)."""
    return math.isfinite(loss0) and loss0 > 0 and 0 <= recent < LOSS_CONVERGED * loss0


def _lr_run_peaks(ctx: RuleContext, lrs: np.ndarray) -> list[float]:
    """Each group's highest LR seen by this rule over the whole run (a set_lr does not reset it)."""
    peaks: list[float] = ctx.state.setdefault("run_peaks", [])
    for gi, lr in enumerate(np.asarray(lrs, dtype=np.float64).tolist()):
        lr = lr if math.isfinite(lr) else 0.0
        if gi >= len(peaks):
            peaks.append(lr)
        elif lr > peaks[gi]:
            peaks[gi] = lr
    return peaks


def _lr_set_since_last_look(ctx: RuleContext) -> bool:
    """Was an LR set by hand (``set_lr``) or the run rewound since this rule last asked?

    A user's LR is a new starting point, not a move of the schedule: rules that track an LR's
    peak start over.
    """
    st = ctx.state
    controls = ctx.session.history.controls
    seen = st.get("controls", 0)
    st["controls"] = len(controls)
    return any(c.kind in ("set_lr", "rewind") for c in controls[seen:])


def _fastest(ratio: np.ndarray) -> float:
    """Median over steps of the largest ratio among the columns (NaN ignored)."""
    return nanmedian(np.where(np.isnan(ratio), -np.inf, ratio).max(axis=1))


@rule("lr-at-nan", ["lr-too-high", "exploding-gradients"], "stage", stages=[Stage.LOSS, Stage.BACKWARD])
def lr_at_nan(ctx: RuleContext) -> list[Finding]:
    """The loss or the gradients turned NaN/Inf, or the loss jumped ``LOSS_SPIKE``-fold in one step,
    right after steps that moved the weights a lot."""
    d = ctx.data
    s = ctx.session
    h = s.history
    if ctx.record.stage is Stage.LOSS:
        if d.finite is False:
            what = f"the loss became {d.loss}"
        else:
            # A finite blow-up: the loss jumped LOSS_SPIKE-fold in one step (it may recover or the
            # units die afterwards, which hides the cause from the windowed LR rule).
            # Against the median of the last few losses, so one easy batch before a hard one is no spike.
            loss = d.loss
            if loss is None or not len(h):
                return []
            before = nanmedian(h.recent_losses(5))  # (every step: not a window copy)
            if not (before > 0 and loss > LOSS_SPIKE * before):
                return []
            what = f"the loss jumped to {loss:.3g} from about {before:.3g} in one step"
    else:
        if not d.non_finite_grad or d.loop_event:
            return []
        what = "the gradients became NaN/Inf"
    if ctx.derived.explode_init:
        return []
    n = h.measured_count
    if n < 1:  # even one huge step before the NaN is telling
        return []
    if n <= 2 and len(h) <= 2:
        # NaN or a spike right after the first step(s) of the run, whose gradients at initialization (the
        # first step, before any update: a huge LR cannot cause them) were already orders of magnitude
        # above the weights: the initialization blew up (a deep stack does before the trend rule's two
        # steps). A well-initialized model has gradients well below its weights whatever the LR.
        seen = _init_explosion(ctx, first=True)
        if seen is not None:
            return [_init_explosion_finding(ctx, *seen, steps=n)]
    w = min(5, n)
    ratio = _ratios(tail(h, "update_norm", w), tail(h, "weight_norm", w))
    lrs = tail(h, "lr", 1)[-1]
    # The LR of the measured rows: when it moved since (a scheduler, a jump on an unmeasured step of a
    # sparse phase), the steps just taken moved the weights in proportion to the LR they used (true of
    # SGD, momentum and Adam alike), so the measured ratios are scaled to the newest LR.
    lr_rows = tail(h, "lr", w, measured=True)
    found = []
    usable = _not_grown_from_zero(ctx, h)
    for gi in range(len(s.optimizer.param_groups)):
        cols = _group_columns(ctx, gi, usable)
        if cols.size == 0:
            continue
        scaled = ratio[:, cols]
        if gi < lr_rows.shape[1] and gi < len(lrs) and lrs[gi] > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(lr_rows[:, gi] > 0, lrs[gi] / lr_rows[:, gi], 1.0)
            scaled = scaled * np.where(np.isfinite(scale), scale, 1.0)[:, None]
        r = nanmedian(nanmedian(scaled, axis=1))
        if not (math.isfinite(r) and r > LR_HIGH_RATIO * 2):
            continue
        names = [s.param_names[i] for i in cols]
        params = ctx.stable_params("lr-too-high", names, f"g{gi}")
        found.append(
            ctx.finding(
                "lr-too-high",
                f"{_group_label(ctx, gi)}{what} after steps that changed the weights by {r:.1%} of their "
                "norm "
                f"(healthy is ~0.1%) at lr {lrs[gi]:.3g}",
                params=params,
                stage=None,
                evidence={"group": gi, "lr": float(lrs[gi]), "update_ratio": r, "loss": d.get("loss")},
            )
        )
    return found


@rule("scheduler-too-fast", ["scheduler-too-fast"], "trend")
def scheduler_too_fast(ctx: RuleContext) -> list[Finding]:
    """A group's LR collapses to near zero (or dips there repeatedly) within the first epochs."""
    s = ctx.session
    h = s.history
    if not len(h):
        return []
    if s.kind == "runner" and getattr(s, "scheduler", None) is None:
        return []
    st = ctx.state
    # The LR each group will use next: what the history's newest row holds, read without a copy.
    row = [float(g["lr"]) for g in s.optimizer.param_groups]
    step = int(s.global_step)
    epoch = int(getattr(s, "epoch", 0) or 0)
    # A set_lr is the user's choice, not the schedule's: restart the peak of that group.
    if _lr_set_since_last_look(ctx):
        st.pop("groups", None)
    groups: list[dict[str, Any]] = st.setdefault("groups", [])
    found = []
    for gi, lr in enumerate(row):
        if not math.isfinite(lr):
            continue
        while len(groups) <= gi:
            groups.append({"peak": 0.0, "low_since": None, "dips": 0, "in_dip": False, "first": None})
        g = groups[gi]
        if lr > g["peak"]:
            g["peak"] = float(lr)
        peak = g["peak"]
        if peak <= 0:
            continue
        # A hair of tolerance: MultiStepLR-style products (0.1 * 0.1) land just above 1e-2.
        collapsed = lr <= SCHED_COLLAPSE * peak * 1.001
        # Steps spent collapsed, counted in steps (the rule runs on measured steps only, which in a
        # sparse phase are measure_every steps apart): the newest step this LR will be used at.
        if not collapsed:
            g["low_since"] = None
        elif g["low_since"] is None:
            g["low_since"] = step
        low = step - g["low_since"] + 1 if collapsed else 0
        if collapsed:
            if not g["in_dip"]:
                g["dips"] += 1
                g["in_dip"] = True
                if g["first"] is None:
                    g["first"] = (step, epoch)
        elif lr > 0.1 * peak:
            g["in_dip"] = False
        if g["first"] is None:
            continue
        first_step, first_epoch = g["first"]
        early = first_epoch < SCHED_EPOCHS if s.kind == "runner" else first_step <= SCHED_STEPS
        long_low = low >= max(10, int(SCHED_LOW_SHARE * step))
        if early and (long_low or g["dips"] >= SCHED_DIPS):
            how = (
                f"has stayed below {SCHED_COLLAPSE:g}x its peak for {low} steps"
                if long_low
                else f"has dropped below {SCHED_COLLAPSE:g}x its peak {g['dips']} times"
            )
            interval = getattr(s, "scheduler_interval", None)
            found.append(
                ctx.finding(
                    "scheduler-too-fast",
                    f"{_group_label(ctx, gi)}the learning rate fell from {peak:.3g} to {lr:.3g} by step "
                    f"{step} "
                    f"(epoch {epoch}) and {how}"
                    + (" (the scheduler is stepped after every batch)" if interval == "step" else ""),
                    params=(f"lr[{gi}]",),
                    stage=None,
                    evidence={
                        "group": gi,
                        "peak_lr": peak,
                        "lr": float(lr),
                        "collapse_step": first_step,
                        "collapse_epoch": first_epoch,
                        "dips": g["dips"],
                        "low_steps": low,
                        "scheduler_interval": interval,
                    },
                )
            )
    return found


# ================================================================================ gradients
def _total_grad(gn: np.ndarray) -> np.ndarray:
    has = np.isfinite(gn)
    with np.errstate(invalid="ignore"):
        total = np.sqrt(np.where(has, gn, 0.0) ** 2 @ np.ones(gn.shape[1]))
    total[~has.any(axis=1)] = np.nan
    return total


def _init_explosion(ctx: RuleContext, *, first: bool = False) -> tuple[float, float] | None:
    """The newest (``first``: the oldest) measured step's gradients are ``EXPLODE_INIT_RATIO`` times the
    weights (median over weight matrices) and its update moved them by more than ``EXPLODE_INIT_UPDATE``:
    ``(ratio, update)``."""
    h = ctx.session.history
    mats = ctx.weight_matrices()
    n = h.measured_count
    if not mats.size or not n:
        return None
    row = 0 if first else -1
    gn = tail(h, "grad_norm", n)[row, mats]
    wn = tail(h, "weight_norm", n)[row, mats]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = nanmedian(np.where(wn > 0, gn / wn, np.nan))
    # Huge gradients hurt through the steps they make: a loss on a huge scale by design (style
    # transfer weighs its terms by 1e5 and 1e10) under Adam moves the weights by ~lr a step.
    moved = nanmedian(_ratios(tail(h, "update_norm", n), tail(h, "weight_norm", n))[row, mats])
    huge = math.isfinite(rel) and rel > EXPLODE_INIT_RATIO
    damaging = math.isfinite(moved) and moved > EXPLODE_INIT_UPDATE
    return (rel, moved) if huge and damaging else None


def _init_explosion_finding(ctx: RuleContext, rel: float, moved: float, *, steps: int) -> Finding:
    return ctx.finding(
        "exploding-gradients",
        f"from the first steps the gradients are {rel:.3g}x the size of the weights they update "
        "(median over weight matrices; healthy is below ~1)",
        params=("<model>",),
        stage=None,
        evidence={"grad_to_weight": rel, "update_ratio": moved, "steps": steps},
        cause="The gradients are orders of magnitude larger than the weights from initialization on: "
        "activations blow up through a deep stack with too-large initial weights (or the inputs or "
        "targets are on a huge scale).",
    )


@rule("exploding-gradients", ["exploding-gradients"], "trend", every=10, early=5)
def exploding_gradients(ctx: RuleContext) -> list[Finding]:
    """Total gradient norm grows by orders of magnitude, or is huge relative to the weights from the start."""
    s = ctx.session
    h = s.history
    n = h.measured_count
    if n == 0:
        return []
    st = ctx.state
    if "start" not in st and n >= 3:
        start = nanmedian(_total_grad(tail(h, "grad_norm", 3)))
        if math.isfinite(start) and start > 0:
            st["start"] = start
    found = []
    if n <= 5:
        seen = _init_explosion(ctx)
        st["init_hits"] = st.get("init_hits", 0) + 1 if seen is not None else 0
        if seen is not None and st["init_hits"] >= 2:
            found.append(_init_explosion_finding(ctx, *seen, steps=st["init_hits"]))
    start = st.get("start")
    if start is None or n < 6:
        return found
    recent = nanmedian(_total_grad(tail(h, "grad_norm", 3)))
    if math.isfinite(recent) and recent > EXPLODE_GROWTH * start and recent > 1e-3:
        found.append(
            ctx.finding(
                "exploding-gradients",
                f"the total gradient norm grew from {start:.3g} to {recent:.3g} ({recent / start:.3g}x) "
                f"by step {s.global_step}",
                params=("<model>",),
                stage=None,
                evidence={"start": start, "recent": recent, "growth": recent / start},
            )
        )
    return found


@rule(
    "exploding-at-overflow",
    ["exploding-gradients"],
    "stage",
    stages=[Stage.BACKWARD],
    needs=["non_finite_grad", "grad_norm"],
)
def exploding_at_overflow(ctx: RuleContext) -> list[Finding]:
    """Gradients overflowed to Inf while the loss was finite: the backward pass itself blew up.

    (NaN alone, without Inf, more often comes from an op with an undefined
    derivative such as sqrt at 0; that stays a plain ``non-finite-grad``.)
    """
    bad = ctx.data.non_finite_grad
    if not bad:
        return []
    loss = ctx.session.records.get(Stage.LOSS)
    value = loss.data.loss if loss is not None and loss.step == ctx.step else None
    if value is None or not math.isfinite(value):
        return []
    grad = np.asarray(ctx.data.grad_norm, dtype=np.float64)
    inf = [n for n, g in zip(ctx.session.param_names, grad) if np.isposinf(g)]
    if not inf:
        return []
    finite = grad[np.isfinite(grad)]
    return [
        ctx.finding(
            "exploding-gradients",
            f"the gradients of {len(inf)} parameter(s) overflowed to Inf while the loss was finite "
            f"({value:.3g})"
            + (f"; the largest finite gradient norm is {finite.max():.3g}" if finite.size else ""),
            params=("<model>",),
            stage=Stage.BACKWARD,
            evidence={
                "inf_params": inf,
                "loss": value,
                "max_finite": float(finite.max()) if finite.size else None,
            },
        )
    ]


def _depth_key(name: str) -> str:
    """The depth (block) a parameter belongs to, from its name.

    The path up to the first numeric component names a block of a stack (``encoder.layer.3``,
    ``layer2.1``, ``features.4``, ``h.0``); an RNN's ``weight_ih_l2`` is layer 2 of its module;
    any other parameter belongs to its own module (``pooler.dense``, ``classifier``, ``fc3``).
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    module, leaf = ".".join(parts[:-1]), parts[-1]
    m = _RNN_LAYER.search(leaf)
    return f"{module}.l{m.group(1)}" if m else module


_RNN_LAYER = re.compile(r"_l(\d+)(?:_reverse)?$")


def _depths(ctx: RuleContext) -> list[np.ndarray]:
    """Weight-matrix columns grouped by depth (:func:`_depth_key`), in parameter order."""

    def build() -> list[np.ndarray]:
        names = ctx.session.param_names
        groups: dict[str, list[int]] = {}
        for c in ctx.weight_matrices().tolist():
            groups.setdefault(_depth_key(names[c]), []).append(c)
        return [np.array(v, dtype=np.int64) for v in groups.values()]

    return ctx.cached("vanish_depths", build)


@rule("vanishing-gradients", ["vanishing-gradients"], "trend", every=10)
def vanishing_gradients(ctx: RuleContext) -> list[Finding]:
    """The first blocks' grad/weight ratio is orders of magnitude below the last hidden ones' (several steps).

    Vanishing gradients shrink with depth through the stack, so the profile is one value per depth
    (block), the median over its weight matrices, not one per matrix: single matrices can sit far
    below their block by design (a transformer's query and key projections get ~1e-4 of the head's
    gradient at initialization, while the softmax over scores is nearly uniform; the value and
    feed-forward matrices of the same block do not). And the second depth must be far below the
    last ones too: gradients fading through the network reach it barely stronger than the first.

    Not judged once the loss has converged (a small fraction of its start): the first layers did
    learn, and near a loss of zero the gradients fade through every saturated unit (a confident
    softmax, a tanh pooler) while nothing is left to learn.
    """
    s = ctx.session
    h = s.history
    n = h.measured_count
    if n < 5 or _converged(_loss0(ctx), nanmedian(tail(h, "loss", 10))):
        return []
    trainable = ctx.trainable()
    depths = [cols[trainable[cols]] for cols in _depths(ctx)]
    depths = [cols for cols in depths if cols.size]
    if len(depths) < VANISH_MIN_DEPTHS or sum(c.size for c in depths) < VANISH_MIN_MATRICES:
        return []
    w = min(VANISH_WINDOW, n)
    gn_all, wn_all = tail(h, "grad_norm", w), tail(h, "weight_norm", w)
    # Each matrix's median grad/weight ratio over the window, once for all columns: a column's median
    # does not depend on the others, and one pass costs what one depth's did (this rule runs on every
    # measured step of a sparse phase).
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_all = np.where((wn_all > 0) & np.isfinite(gn_all), gn_all / wn_all, np.nan)
    per_col = nanmedian(rel_all, axis=0)

    def level(cols: np.ndarray) -> float:
        """Median over the depth's matrices of each one's median grad/weight ratio over the window."""
        per = per_col[cols]
        got = sorted(per[np.isfinite(per) & (per > 0)].tolist())
        k = len(got)
        if not k:
            return math.nan
        # np.median's value, without its overhead: the middle one, or the mean of the middle two.
        return float(got[k // 2]) if k % 2 else (got[k // 2 - 1] + got[k // 2]) / 2

    # The ends first (cheap); the whole profile only for the finding's evidence. The far end is the
    # last two depths before the output layer: the output layer's ratio says little about how much
    # gradient the stack passes down, it often starts far smaller than the rest (BERT's head, std
    # 0.02; zero-initialized last layers) and so sits far above the rest for as long as it is small.
    ends = [level(cols) for cols in (depths[0], depths[1], depths[-3], depths[-2])]
    early, second = ends[0], ends[1]
    late_at = 2 + int(np.nanargmax(ends[2:])) if any(math.isfinite(v) for v in ends[2:]) else 2
    late = ends[late_at]
    if not (math.isfinite(early) and math.isfinite(second) and late > 0):
        return []
    if not (early < VANISH_RATIO * late and second < VANISH_NEXT_RATIO * late):
        return []
    names = s.param_names
    keys = [_depth_key(names[cols[0]]) for cols in depths]
    profile = {k: level(cols) for k, cols in zip(keys, depths)}
    first, last = keys[0], keys[-3] if late_at == 2 else keys[-2]
    block = tuple(names[c] for c in depths[0].tolist())
    where = f"'{block[0]}'" if len(block) == 1 else f"the {len(block)} weight matrices of '{first}' (median)"
    return [
        ctx.finding(
            "vanishing-gradients",
            f"{where} get{'s' if len(block) == 1 else ''} gradients {early:.2g}x "
            f"{'its' if len(block) == 1 else 'their'} weight norm "
            f"while '{last}' gets {late:.2g}x: {late / early:.2g} times smaller at the start of the "
            f"network (the next block '{keys[1]}': {second:.2g}x)",
            params=block,
            stage=None,
            evidence={
                "profile": profile,
                "first": first,
                "last": last,
                "ratio": early / late,
                "next_ratio": second / late,
                "output_layer": keys[-1],
            },
        )
    ]


def _dead_candidates(ctx: RuleContext) -> dict[str, bool]:
    from tlwidgets.diagnostics.rules.stage import _relu_like

    return ctx.cached(
        "relu_modules", lambda: {n: _relu_like(m) for n, m in ctx.session.model.named_modules()}
    )


@rule("dead-relu", ["dead-relu"], "stage", stages=[Stage.FORWARD, Stage.STEP])
def dead_relu(ctx: RuleContext) -> list[Finding]:
    """Most units of a ReLU module are never positive, on several activation measurements in a row."""
    s = ctx.session
    rec = ctx.record
    if rec.stage is Stage.FORWARD:
        if s.kind != "runner":
            return []
        fwd = rec
    else:
        if s.kind != "watch":
            return []
        fwd = s.records.get(Stage.FORWARD)
        if fwd is None or fwd.step != rec.step:
            return []
    acts = fwd.data.activations
    if not acts:
        return []
    relu = _dead_candidates(ctx)
    st = ctx.state
    streak: dict[str, int] = st.setdefault("streak", {})
    since: dict[str, int] = st.setdefault("since", {})
    found = []
    for name, v in acts.items():
        if not relu.get(name):
            continue
        dead, zero = v.get("dead_frac", 0.0), v.get("frac_zero", 0.0)
        if dead > DEAD_FRAC and zero > DEAD_FRAC - 0.05:
            streak[name] = streak.get(name, 0) + 1
            since.setdefault(name, fwd.step)
        else:
            streak.pop(name, None)
            since.pop(name, None)
            continue
        if streak[name] >= DEAD_MEASUREMENTS or (streak[name] >= 2 and fwd.step - since[name] >= DEAD_SPAN):
            found.append(
                ctx.finding(
                    "dead-relu",
                    f"{dead:.0%} of the units of '{name}' output zero for every example of the batch "
                    f"({streak[name]} measurements in a row; {zero:.0%} of its outputs are zero)",
                    params=(name,),
                    stage=None,
                    evidence={
                        "module": name,
                        "dead_frac": dead,
                        "frac_zero": zero,
                        "measurements": streak[name],
                    },
                )
            )
    return found


# ================================================================================ regularization
@rule("over-regularization", ["over-regularization"], "trend", every=20)
def over_regularization(ctx: RuleContext) -> list[Finding]:
    """Weight decay outpulls the data gradient: the weights shrink and the loss stays near its start."""
    s = ctx.session
    h = s.history
    n = h.measured_count
    if n < LR_LOW_MIN_STEPS:
        return []
    loss0 = _loss0(ctx)
    if not (math.isfinite(loss0) and loss0 > 0):
        return []
    recent = nanmedian(tail(h, "loss", 10))
    chance = _chance_loss(s)
    # Not converged: still a fair share of the starting loss, or (a penalty inflates the starting
    # loss) a class loss no better than a uniform guess.
    high = recent > REG_STUCK * loss0
    if not high and not (chance is not None and recent > 0.9 * chance):
        return []
    st = ctx.state
    w = min(LR_WINDOW, n)
    gn_all, wn_all, up_all = tail(h, "grad_norm", w), tail(h, "weight_norm", w), tail(h, "update_norm", w)
    lrs = tail(h, "lr", w, measured=True)  # the LRs of the measured rows
    found = []
    for gi, group in enumerate(s.optimizer.param_groups):
        wd = float(group.get("weight_decay", 0) or 0)
        cols = _group_columns(ctx, gi)
        if cols.size == 0:
            continue
        wn = wn_all[:, cols]
        start = st.setdefault("start_norm", {})
        if gi not in start:
            first = tail(h, "weight_norm", n)[0, cols] if n <= 50 else wn[0]
            start[gi] = float(np.sqrt(np.nansum(first**2)))
        now = float(np.sqrt(np.nansum(wn[-1] ** 2)))
        shrink = now / start[gi] if start[gi] > 0 else 1.0
        if wd <= 0 or not high:
            # No weight decay, yet the weights collapse while the loss stalls: a penalty term
            # added to the loss (an explicit L2/L1 sum) is doing what weight decay would.
            # Only recognisable for a class loss: an untrained classifier starts near ln(C), so a start
            # far above it means the loss holds more than the data term, and with the weights collapsed
            # the model is back at a uniform guess. (A regression that settles at small weights looks
            # the same as a penalized one from the numbers recorded; it is not judged.)
            at_chance = chance is not None and 0.9 * chance < recent < 1.05 * chance
            inflated = chance is not None and loss0 > REG_PENALTY_START * chance
            if wd <= 0 and shrink < REG_PENALTY_SHRINK and at_chance and inflated:
                names = [s.param_names[i] for i in cols.tolist()]
                params = ctx.stable_params("over-regularization", names, f"g{gi}")
                found.append(
                    ctx.finding(
                        "over-regularization",
                        f"{_group_label(ctx, gi)}the weights shrank to {shrink:.0%} of their starting norm "
                        f"without weight decay, and the loss fell from {loss0:.4g} to {recent:.4g}, the "
                        f"{chance:.4g} of a uniform guess: a penalty term outweighs the data",
                        params=params,
                        stage=None,
                        evidence={
                            "group": gi,
                            "weight_decay": 0.0,
                            "shrink": shrink,
                            "loss_ratio": recent / loss0,
                        },
                        cause="A penalty added to the loss (lambda * sum of w**2, say) is so large that "
                        "minimizing it shrinks the weights toward zero instead of fitting the data.",
                        fix="Scale the penalty down (1e-5 to 1e-3 of the data loss is typical) or replace it "
                        "with a small weight_decay in the optimizer.",
                    )
                )
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            if is_decoupled_decay(group, s.optimizer):
                lr = lrs[:, gi : gi + 1] if gi < lrs.shape[1] else np.full((w, 1), np.nan)
                share = nanmedian(np.where(up_all[:, cols] > 0, lr * wd * wn / up_all[:, cols], np.nan))
                what = "the decay term makes up"
            else:
                share = nanmedian(np.where(gn_all[:, cols] > 0, wd * wn / gn_all[:, cols], np.nan))
                what = "weight_decay x |w| is"
        if not math.isfinite(share):
            continue
        if share > REG_SHARE_STRONG or (share > REG_SHARE and shrink < REG_SHRINK):
            label = _group_label(ctx, gi)
            names = [s.param_names[i] for i in cols]
            amount = (
                f"{share:.0%} of each update"
                if is_decoupled_decay(group, s.optimizer)
                else f"{share:.2g}x the data gradient"
            )
            params = ctx.stable_params("over-regularization", names, f"g{gi}")
            found.append(
                ctx.finding(
                    "over-regularization",
                    f"{label}weight_decay={wd:g}: {what} {amount}, the weights shrank to {shrink:.0%} of "
                    "their "
                    f"starting norm and the loss is still {recent / loss0:.0%} of its start",
                    params=params,
                    stage=None,
                    evidence={
                        "group": gi,
                        "weight_decay": wd,
                        "share": share,
                        "shrink": shrink,
                        "loss_ratio": recent / loss0,
                    },
                    fix=f"Reduce weight_decay (now {wd:g}; 1e-4 to 1e-2 is typical with torch.optim.AdamW, "
                    "5e-4 with SGD) and check the scale of any penalty added to the loss.",
                )
            )
    return found


# ================================================================================ loss trends
_EXPLAINS_PLATEAU = {
    "lr-too-low",
    "lr-too-high",
    "over-regularization",
    "zero-init",
    "dead-relu",
    "vanishing-gradients",
    "exploding-gradients",
    "softmax-before-loss",
    "scheduler-too-fast",
    "grad-clipping-too-strong",
    "nothing-trainable",
    "disconnected-param",
    "param-not-updating",
    "param-not-in-optimizer",
    "optimizer-not-stepping",
    "frozen-param-changed",
    "grads-not-zeroed",
    "labels-decoupled",
    "shape-broadcast",
    "input-not-normalized",
    "unshuffled-data",
    "non-finite-input",
    "non-finite-loss",
    "non-finite-grad",
    "eval-mode-training",
    "missing-activation",
    "batch-mixing",
    "channel-order",
}


@rule("loss-plateau", ["loss-plateau"], "trend", every=10)
def loss_plateau(ctx: RuleContext) -> list[Finding]:
    """No improvement over three long windows, when no more specific finding explains it.

    The newest window's median must be within 1% of the one before and within
    2% of the one before that: a slow but steady learner (noisy small-batch
    losses included) improves by more than that over 100 steps.
    """
    s = ctx.session
    h = s.history
    n = len(h)
    half = PLATEAU_WINDOW
    if n < 3 * half:
        return []
    losses = tail(h, "loss", 3 * half)
    older, prev, recent = (nanmedian(losses[i * half : (i + 1) * half]) for i in range(3))
    if not all(math.isfinite(v) and v > 0 for v in (older, prev, recent)):
        return []
    improvement = (prev - recent) / prev
    if improvement >= PLATEAU_IMPROVEMENT or (older - recent) / older >= 2 * PLATEAU_IMPROVEMENT:
        return []
    loss0 = _loss0(ctx)
    if math.isfinite(loss0) and loss0 > 0 and recent < 0.05 * loss0:
        return []  # converged: the loss is a small fraction of where it started
    if s.has_finding(*_EXPLAINS_PLATEAU):
        return []
    chance = _chance_loss(s)
    at_chance = chance is not None and recent > 0.95 * chance
    never_learned = (math.isfinite(loss0) and recent > 0.9 * loss0) or at_chance
    return [
        ctx.finding(
            "loss-plateau",
            f"the loss has not improved over the last {3 * half} steps (medians of {half}-step windows "
            f"{older:.4g} -> {prev:.4g} -> {recent:.4g})"
            + (f", and it is still {recent / loss0:.0%} of where it started" if math.isfinite(loss0) else "")
            + (f"; ln(classes) = {chance:.3g} is the loss of a uniform guess" if at_chance else ""),
            stage=None,
            severity="warning" if never_learned else "info",
            evidence={"older": older, "previous": prev, "recent": recent, "window": half, "start": loss0},
        )
    ]


def _chance_loss(session: Any) -> float | None:
    """ln(C) for a class loss on C-way outputs (the loss of predicting the uniform distribution)."""
    rec = session.records.get(Stage.LOSS)
    value = rec.data.expected_initial_loss if rec is not None else None
    return float(value) if value is not None else None


def _overfit_finding(
    ctx: RuleContext, val: list[float], train: list[float], where: str, accuracy: list[float] | None = None
) -> list[Finding]:
    k = OVERFIT_RISES
    if len(val) < k + 1 or len(train) < k + 1:
        return []
    v, t = val[-(k + 1) :], train[-(k + 1) :]
    if not all(math.isfinite(x) for x in v + t):
        return []
    rising = all(b > a for a, b in zip(v, v[1:]))
    best = min(x for x in val if math.isfinite(x))
    if not (rising and v[-1] > (1 + OVERFIT_MARGIN) * best and t[-1] < t[0]):
        return []
    # Validation loss can rise from over-confidence while validation accuracy still improves; with
    # the accuracy at its best the model is not (yet) getting worse at the task: a note, not a warning.
    benign = bool(accuracy) and accuracy[-1] >= max(accuracy) - OVERFIT_ACCURACY_SLACK
    acc_text = f"; validation accuracy {accuracy[-1]:.3g} (best {max(accuracy):.3g})" if accuracy else ""
    return [
        ctx.finding(
            "overfitting",
            f"validation loss rose for {k} {where}s in a row ({' -> '.join(f'{x:.4g}' for x in v)}; best "
            f"{best:.4g}) while training loss fell ({t[0]:.4g} -> {t[-1]:.4g}){acc_text}",
            stage=None,
            severity="info" if benign else None,
            evidence={
                "val": v,
                "train": t,
                "best_val": best,
                "accuracy": accuracy[-(k + 1) :] if accuracy else None,
            },
        )
    ]


@rule("overfitting", ["overfitting"], "epoch")
def overfitting(ctx: RuleContext) -> list[Finding]:
    """Validation loss rises for several epochs in a row while training loss falls."""
    epochs = [e for e in ctx.session.history.epochs if e.val_loss is not None and e.ok]
    val = [float(e.val_loss) for e in epochs]
    train = [float(e.train_loss) for e in epochs]
    acc = [e.val_metrics.get("accuracy") for e in epochs]
    accuracy = [float(a) for a in acc] if acc and all(a is not None for a in acc) else None
    return _overfit_finding(ctx, val, train, "epoch", accuracy)


# ================================================================================ labels
def _loss_is_weighted(loss_fn: Any) -> bool:
    return any(getattr(loss_fn, attr, None) is not None for attr in ("weight", "pos_weight"))


@rule("labels", ["class-imbalance", "unshuffled-data"], "stage", stages=[Stage.FETCH], needs=["label_counts"])
def labels(ctx: RuleContext) -> list[Finding]:
    """Running label counts (:class:`~tlwidgets.diagnostics.derived.LabelTally`, fed before the rules):
    a heavily skewed distribution, or batches that each hold one class."""
    tally = ctx.derived.labels
    rec = ctx.record
    key = (rec.epoch, rec.batch, rec.step)
    if ctx.state.get("key") == key:  # the same batch described again (a retried FETCH)
        return []
    ctx.state["key"] = key
    order = tally.order
    if order is None:
        return []
    if order.sorted:
        return [
            ctx.finding(
                "unshuffled-data",
                f"{order.observed:.0%} of the last {len(tally.recent)} batches hold a single class (at "
                f"least {PURE_SHARE:.0%} of the batch), against {order.expected:.1%} expected from random "
                "order over "
                f"{np.count_nonzero(tally.counts)} classes; recent classes: "
                f"{short_list([str(c) for c in order.classes], 8)}",
                stage=Stage.FETCH,
                evidence={
                    "observed_single_class": order.observed,
                    "expected_single_class": order.expected,
                    "p_value": order.p_value,
                    "batch_size": order.batch_size,
                    "classes_seen": int(np.count_nonzero(tally.counts)),
                    "recent_classes": list(order.classes),
                },
            )
        ]
    if order.suspect:
        return []
    return _imbalance(ctx, tally.counts, "so far")


def _imbalance(ctx: RuleContext, counts: np.ndarray, when: str) -> list[Finding]:
    present = counts[counts > 0]
    if present.size < 2:
        return []
    n = int(present.sum())
    if n < max(IMBALANCE_MIN_SAMPLES, IMBALANCE_PER_CLASS * present.size):
        return []
    ratio = present.max() / present.min()
    if ratio <= IMBALANCE_RATIO or _loss_is_weighted(getattr(ctx.session, "loss_fn", None)):
        return []
    major, minor = (
        int(np.argmax(np.where(counts > 0, counts, -1))),
        int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max))),
    )
    return [
        ctx.finding(
            "class-imbalance",
            f"class {major} has {ratio:.3g}x as many examples as class {minor} ({counts[major]} vs "
            f"{counts[minor]} "
            f"of {n} labels {when}); the majority class alone is {counts[major] / n:.0%}",
            stage=Stage.FETCH,
            evidence={
                "counts": counts.tolist()[:1000],
                "ratio": float(ratio),
                "majority": major,
                "minority": minor,
                "samples": n,
            },
        )
    ]


_BINARY_LOSSES = {"BCEWithLogitsLoss", "BCELoss", "binary_cross_entropy_with_logits", "binary_cross_entropy"}


def _session_loss_name(session: Any) -> str:
    fn = getattr(session, "loss_fn", None)
    return type(fn).__name__ if isinstance(fn, nn.Module) else str(getattr(fn, "__name__", ""))


@rule(
    "binary-labels",
    ["class-imbalance"],
    "stage",
    stages=[Stage.FETCH],
    needs=["tensors", "non_finite"],  # scanned batches only
)
def binary_labels(ctx: RuleContext) -> list[Finding]:
    """Binary 0/1 float targets of a BCE loss: the share of positives is the mean of the targets."""
    info = ctx.data.tensors.get("targets")
    if not info or info.get("mean") is None or _session_loss_name(ctx.session) not in _BINARY_LOSSES:
        return []
    shape = tuple(info.get("shape", ()))
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or not shape[0]:
        return []  # multi-label targets: rare positives per label are normal there
    if info.get("min") not in (0.0, 1.0) or info.get("max") not in (0.0, 1.0):
        return []  # soft or smoothed labels
    rec = ctx.record
    st = ctx.state
    key = (rec.epoch, rec.batch, rec.step)
    if st.get("key") == key:
        return []
    st["key"] = key
    n = shape[0]
    pos = round(float(info["mean"]) * n)
    counts = st.setdefault("counts", np.zeros(2, np.int64))
    counts += (n - pos, pos)
    return _imbalance(ctx, counts, "so far")


@rule("labels-epoch", ["class-imbalance"], "epoch")
def labels_epoch(ctx: RuleContext) -> list[Finding]:
    """At an epoch end the epoch's label counts are the full distribution, whatever the batch order."""
    tally = ctx.derived.labels
    if tally.epoch_counts is None or tally.suspect:
        return []  # sorted batches: the sampled batches of the epoch need not reflect the distribution
    return _imbalance(ctx, tally.epoch_counts, f"in epoch {ctx.record.epoch}")


TREND_RULES = (
    lr_rate,
    lr_at_nan,
    scheduler_too_fast,
    exploding_gradients,
    exploding_at_overflow,
    vanishing_gradients,
    dead_relu,
    over_regularization,
    loss_plateau,
    overfitting,
    labels,
    labels_epoch,
    binary_labels,
)
