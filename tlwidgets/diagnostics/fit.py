"""The fit verdict: is a run underfitting, overfitting or fitting well, and what can be done about it.

The bias-variance view of seed 004: the validation error of a run is the error nothing can remove, plus
the *bias* (how far training performance stays from what is achievable: underfitting; fix with a bigger
model, longer training, a higher learning rate, less regularization) plus the *variance* (how much worse
validation is than training: overfitting; fix with more data, regularization, early stopping).

Quantity, instrument and plotter are apart (as in Cockpit): :func:`assess_fit` is a pure function of the
epoch records (:class:`~tlwidgets.core.records.EpochRecord`) and a :class:`Baseline` that returns a
:class:`FitReport`; :func:`fit_report` gathers both from a session; :func:`fit_actions` turns a report into
the :class:`~tlwidgets.core.actions.Action` objects the session can carry out through its own controls
(raise weight decay, rewind to the best epoch, raise the learning rate); the dashboard's fit panel
(:mod:`tlwidgets.ui.fit`) only draws them.

How the verdict is reached (the thresholds are the constants below):

- Both gaps are measured on one scale, the range from the baseline (chance: accuracy ``1/K`` and
  cross-entropy ``ln K`` for ``K`` classes; else the loss at the start of training) to the goal (perfect,
  or the target the user gives). Accuracy is used when the epochs measured it on both training and
  validation data (what the user cares about, and immune to the over-confidence that inflates a
  validation loss); the loss otherwise.
- ``bias`` is the share of that range the *training* data still lacks; ``variance`` the share lost
  between training and validation.
- Nothing is said before :data:`MIN_EPOCHS` epochs: the first epoch's training numbers are running means
  that include the untrained start.
- Overfitting: ``variance >= OVERFIT_GAP``, or the validation loss has risen for
  :data:`RISE_EPOCHS` epochs since its best, by :data:`RISE` of it, while the training loss fell
  (the early-stopping signal) with ``variance >= GAP_MIN`` (so the small wobble of a converged run, or
  over-confidence that costs no accuracy, is no alarm).
- Underfitting: ``bias`` above :data:`UNDERFIT_CHANCE` (accuracy; less than halfway from chance to
  perfect: the achievable error is unknown, so only a run that clearly has not learned is named),
  :data:`UNDERFIT_LOSS` (loss without a target: the loss came down by less than a fifth) or
  :data:`UNDERFIT_TARGET` (short of the user's target), and not about to close that gap: a run whose
  recent pace would bring the bias under the threshold within :data:`LEARNING_EPOCHS` epochs is "too
  early" (a slow but healthy run is no false alarm).
- Both at once: the larger of bias and variance is named (the one worth working on first).
- Without validation data only underfitting can be named ("no validation" otherwise).

The best epoch (what "rewind to the best epoch" goes back to) is the one with the lowest validation
loss, what early stopping watches: on a small validation set accuracy moves by single examples.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

# The fit's actions reuse the finding actions' helpers: the same LR from the same numbers, the same
# rewind that keeps the abandoned run as a checkpoint, the same idea of a usual weight decay.
from tlwidgets.core.actions import (
    MAX_FACTOR,
    MIN_FACTOR,
    TYPICAL_DECAY,
    Action,
    is_decoupled_decay,
    rewind_keeping,
    suggest_lr,
)
from tlwidgets.core.records import EpochRecord
from tlwidgets.core.stages import Stage

__all__ = [
    "GAP_MIN",
    "LEARNING_EPOCHS",
    "MIN_EPOCHS",
    "OVERFIT_GAP",
    "RISE",
    "RISE_EPOCHS",
    "UNDERFIT_CHANCE",
    "UNDERFIT_LOSS",
    "UNDERFIT_TARGET",
    "Baseline",
    "FitReport",
    "Verdict",
    "assess_fit",
    "fit_actions",
    "fit_report",
    "session_baseline",
]

#: Epochs (with a finite training loss) before any verdict: the first epoch's training loss and
#: accuracy are running means over an epoch that starts untrained.
MIN_EPOCHS = 2
#: Overfitting: validation this far below training, as a share of the baseline-to-goal range. Healthy
#: runs of the zoo stay under 0.04 (e.g. digits MLP: 0.98 vs 0.97 accuracy); 50 training examples for
#: a 300k-parameter MLP reach 0.2 (1.00 vs 0.82).
OVERFIT_GAP = 0.10
#: ... or the validation loss rose for this many epochs since its best ...
RISE_EPOCHS = 2
#: ... to at least this fraction above the best ...
RISE = 0.05
#: ... while training loss fell, with at least this gap (a converged healthy run's validation loss
#: wobbles up a few percent with a gap near 0.02).
GAP_MIN = 0.05
#: Underfitting with a chance baseline and accuracy: training accuracy less than halfway from chance
#: to perfect (the achievable accuracy is unknown: only a run that clearly has not learned is named).
UNDERFIT_CHANCE = 0.5
#: ... with the loss alone and no target (the start of training or ln K as baseline): the training loss
#: came down by less than a fifth of it (noise in the targets can keep a healthy loss at half of it).
UNDERFIT_LOSS = 0.8
#: ... with a target the user gave: short of it by more than this share of the baseline-to-target range.
UNDERFIT_TARGET = 0.05
#: "Too early" instead of underfitting while the recent pace would close the excess bias within this
#: many epochs (loss curves flatten: the projection is optimistic, and the verdict comes later if so).
LEARNING_EPOCHS = 5
#: Epochs whose pace is averaged (the improvement per epoch of the bias).
PACE_EPOCHS = 3
#: Loss functions whose chance value is ln K for K classes (a uniform prediction).
_CE_LOSSES = frozenset({"CrossEntropyLoss", "NLLLoss", "cross_entropy", "nll_loss"})
#: Weight decay is raised at most to this multiple of the usual value (more is over-regularization).
MAX_DECAY_FACTOR = 10.0


class Verdict(str, enum.Enum):
    """What the training and validation curves say about the fit."""

    UNDERFITTING = "underfitting"
    OVERFITTING = "overfitting"
    GOOD_FIT = "good fit"
    TOO_EARLY = "too early"
    NO_VALIDATION = "no validation"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What the training and validation numbers are measured against.

    Attributes
    ----------
    loss
        The loss of a model that learned nothing (``ln K`` for cross-entropy over ``K`` classes, else
        the loss at the start of training); ``None``: the first epoch's highest loss is used.
    accuracy
        Chance accuracy (``1/K``); ``None`` when unknown (0 is used).
    target_loss, target_accuracy
        The goal the user gives (``None``: perfect, loss 0 and accuracy 1).
    label
        How the baseline was found, for the plot's legend (e.g. ``"chance (10 classes)"``).
    """

    loss: float | None = None
    accuracy: float | None = None
    target_loss: float | None = None
    target_accuracy: float | None = None
    label: str = "baseline"

    @classmethod
    def chance(cls, classes: int, **targets: float | None) -> Baseline:
        """Chance for ``classes`` balanced classes: loss ``ln K``, accuracy ``1/K``."""
        if classes < 2:
            raise ValueError(f"chance needs at least 2 classes, got {classes}")
        return cls(math.log(classes), 1.0 / classes, label=f"chance ({classes} classes)", **targets)

    @property
    def has_target(self) -> bool:
        """Did the user give a goal (else perfect is the goal)?"""
        return self.target_loss is not None or self.target_accuracy is not None


@dataclasses.dataclass(frozen=True)
class FitReport:
    """The verdict on the fit of a run and the numbers it rests on.

    Attributes
    ----------
    verdict
        :class:`Verdict`.
    reason
        One line: the numbers that decided it.
    suggestions
        What to do, most promising first (text; :func:`fit_actions` gives those a session can do).
    measure
        ``"accuracy"`` or ``"loss"``: what ``bias`` and ``variance`` are measured on.
    bias
        Share of the baseline-to-goal range the training data still lacks (last epoch; NaN unknown).
    variance
        Share of that range lost from training to validation (last epoch; NaN without validation).
    pace
        Recent improvement of ``bias`` per epoch (positive: improving).
    epochs
        Epochs used (finite training loss).
    epoch, train_loss, val_loss, train_accuracy, val_accuracy
        The last epoch's numbers (``epoch`` counts the epochs completed: the first is 1).
    best_epoch
        The epoch (1-based) with the lowest validation loss; ``None`` without validation.
    best_val_loss, best_val_accuracy
        Its validation numbers.
    best_step
        The global step at its end.
    rising
        Epochs since ``best_epoch`` with the validation loss above the best by :data:`RISE` while
        training loss fell (0 when not rising).
    baseline
        What was measured against.
    """

    verdict: Verdict
    reason: str
    suggestions: tuple[str, ...] = ()
    measure: str = "loss"
    bias: float = math.nan
    variance: float = math.nan
    pace: float = math.nan
    epochs: int = 0
    epoch: int | None = None
    train_loss: float = math.nan
    val_loss: float = math.nan
    train_accuracy: float = math.nan
    val_accuracy: float = math.nan
    best_epoch: int | None = None
    best_val_loss: float = math.nan
    best_val_accuracy: float = math.nan
    best_step: int | None = None
    rising: int = 0
    baseline: Baseline = dataclasses.field(default_factory=Baseline)

    @property
    def headline(self) -> str:
        """``"Overfitting: <reason>"``: the verdict line shown."""
        return f"{self.verdict.value.capitalize()}: {self.reason}"


# ================================================================================ the quantity
def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(float(x))


def _series(epochs: Sequence[EpochRecord]) -> dict[str, np.ndarray]:
    """Per-epoch arrays (NaN where not measured) of the usable epochs (finite training loss)."""

    def get(e: EpochRecord, key: str) -> float:
        if key == "train_loss":
            v: Any = e.train_loss
        elif key == "val_loss":
            v = e.val_loss
        elif key == "train_acc":
            v = (e.train_metrics or {}).get("accuracy")
        else:
            v = (e.val_metrics or {}).get("accuracy")
        return float(v) if _finite(v) else math.nan

    used = [e for e in epochs if _finite(e.train_loss)]
    keys = ("train_loss", "val_loss", "train_acc", "val_acc")
    out = {k: np.array([get(e, k) for e in used], dtype=np.float64) for k in keys}
    out["epoch"] = np.array([e.epoch + 1 for e in used], dtype=np.int64)
    out["step"] = np.array([e.step for e in used], dtype=np.int64)
    return out


def _best(s: dict[str, np.ndarray]) -> int | None:
    """Index of the best validation epoch: the lowest validation loss (what early stopping watches: on
    a small validation set accuracy moves by single examples, the loss is the smoother estimate).
    ``None`` without validation."""
    vl = s["val_loss"]
    return int(np.nanargmin(vl)) if np.isfinite(vl).any() else None


def _rising(s: dict[str, np.ndarray]) -> tuple[int, int | None]:
    """Epochs since the lowest validation loss with it above the lowest by RISE and training loss below
    its value then (the early-stopping signal), and the index of that lowest epoch."""
    vl, tl = s["val_loss"], s["train_loss"]
    if not np.isfinite(vl).any():
        return 0, None
    low = int(np.nanargmin(vl))
    after = np.arange(low + 1, len(vl))
    count = 0
    for i in after[::-1]:  # the last epochs, newest first, while they stay above the best
        if np.isfinite(vl[i]) and vl[i] > vl[low] * (1 + RISE) and tl[i] < tl[low]:
            count += 1
        else:
            break
    return count, low


def assess_fit(epochs: Sequence[EpochRecord], baseline: Baseline | None = None) -> FitReport:
    """The fit verdict of a run from its epoch records (see the module notes for the rules).

    Parameters
    ----------
    epochs
        Epoch-end records, oldest first (``runner.history.epochs``): ``train_loss``, ``val_loss``,
        ``val_metrics["accuracy"]`` and ``train_metrics["accuracy"]`` where measured.
    baseline
        What to measure against (default: the first epoch's highest loss, accuracy from 0).

    Returns
    -------
    FitReport
    """
    baseline = baseline or Baseline()
    s = _series(epochs)
    n = len(s["train_loss"])
    if n == 0:
        return FitReport(
            Verdict.TOO_EARLY,
            "no epoch has finished with a finite training loss yet",
            ("train at least two epochs (with val_data) to see the fit",),
            baseline=baseline,
        )
    has_val = bool(np.isfinite(s["val_loss"]).any())
    use_acc = bool(np.isfinite(s["train_acc"][-1])) and (not has_val or bool(np.isfinite(s["val_acc"][-1])))
    # The range from the baseline to the goal on the measure used.
    if use_acc:
        lo = float(baseline.accuracy) if _finite(baseline.accuracy) else 0.0
        hi = float(baseline.target_accuracy) if _finite(baseline.target_accuracy) else 1.0
        span = hi - lo
        train, val = s["train_acc"], s["val_acc"]
        bias_all = (hi - train) / span if span > 0 else np.full(n, np.nan)
        var_all = (train - val) / span if span > 0 else np.full(n, np.nan)
        threshold = UNDERFIT_TARGET if _finite(baseline.target_accuracy) else UNDERFIT_CHANCE
    else:
        first = float(np.nanmax([s["train_loss"][0], s["val_loss"][0]]))
        top = float(baseline.loss) if _finite(baseline.loss) else first
        floor = float(baseline.target_loss) if _finite(baseline.target_loss) else 0.0
        span = top - floor
        train, val = s["train_loss"], s["val_loss"]
        bias_all = (train - floor) / span if span > 0 else np.full(n, np.nan)
        var_all = (val - train) / span if span > 0 else np.full(n, np.nan)
        threshold = UNDERFIT_TARGET if _finite(baseline.target_loss) else UNDERFIT_LOSS
    measure = "accuracy" if use_acc else "loss"
    bias, variance = float(bias_all[-1]), float(var_all[-1])
    k = min(PACE_EPOCHS, n - 1)
    pace = float((bias_all[-1 - k] - bias_all[-1]) / k) if k > 0 else math.nan
    rising, low = _rising(s)
    best = _best(s)
    numbers: dict[str, Any] = {
        "measure": measure,
        "bias": bias,
        "variance": variance,
        "pace": pace,
        "epochs": n,
        "epoch": int(s["epoch"][-1]),
        "train_loss": float(s["train_loss"][-1]),
        "val_loss": float(s["val_loss"][-1]),
        "train_accuracy": float(s["train_acc"][-1]),
        "val_accuracy": float(s["val_acc"][-1]),
        "best_epoch": int(s["epoch"][best]) if best is not None else None,
        "best_val_loss": float(s["val_loss"][best]) if best is not None else math.nan,
        "best_val_accuracy": float(s["val_acc"][best]) if best is not None else math.nan,
        "best_step": int(s["step"][best]) if best is not None else None,
        "rising": rising,
        "baseline": baseline,
    }
    goal = "the target" if baseline.has_target else "perfect"
    start = baseline.label

    def report(verdict: Verdict, reason: str, suggestions: Sequence[str] = ()) -> FitReport:
        return FitReport(verdict, reason, tuple(suggestions), **numbers)

    if n < MIN_EPOCHS:
        return report(
            Verdict.TOO_EARLY,
            f"{n} epoch done: the first epoch's training numbers include the untrained start",
            ("train another epoch",),
        )
    if not math.isfinite(bias):
        return report(Verdict.TOO_EARLY, f"the training {measure} cannot be placed against {start}")
    last_train, last_val = _fmt(train[-1], measure), _fmt(val[-1], measure)
    # Overfitting: a large gap, or the validation loss rising from its best while training improves.
    early_stop = rising >= RISE_EPOCHS and math.isfinite(variance) and variance >= GAP_MIN
    overfit = math.isfinite(variance) and (variance >= OVERFIT_GAP or early_stop)
    underfit = bias > threshold
    gap_text = (
        f"validation {measure} {last_val} against training {last_train}: a gap of {_pct(variance)} of "
        f"the range from {start} to {goal}"
    )
    if underfit and (not overfit or bias >= variance):
        excess = bias - threshold
        reason = (
            f"training {measure} {last_train} after {n} epochs still lacks {_pct(bias)} of the range from "
            f"{start} to {goal} (underfitting above {_pct(threshold)})"
        )
        if math.isfinite(pace) and pace > 0 and excess / pace <= LEARNING_EPOCHS:
            return report(
                Verdict.TOO_EARLY,
                f"still learning: {reason}, but it improves {_pct(pace)} of the range per epoch",
                ("train longer",),
            )
        slow = math.isfinite(pace) and pace > 0.01
        tips = [
            "train longer: it still improves" if slow else "a higher learning rate (if the updates are tiny)",
            "a bigger model (more units or layers) or a stronger architecture",
            "a higher learning rate (if the updates are tiny)" if slow else "train longer",
            "less regularization (weight decay, dropout)",
        ]
        pace_text = f"; it improves {_pct(pace)} of the range per epoch" if math.isfinite(pace) else ""
        return report(Verdict.UNDERFITTING, reason + pace_text, tips)
    if overfit:
        why = [gap_text]
        if rising >= RISE_EPOCHS and low is not None:
            why.append(
                f"validation loss above its best ({_fmt(s['val_loss'][low])} after epoch "
                f"{int(s['epoch'][low])}) for {rising} epochs while training loss fell"
            )
        tips = ["more training data (or data augmentation)", "regularization: weight decay, dropout"]
        if best is not None and best < n - 1:
            tips.append(f"early stopping: the best validation was after epoch {int(s['epoch'][best])}")
        else:
            tips.append("a smaller model")
        return report(Verdict.OVERFITTING, "; ".join(why), tips)
    if not has_val:
        return report(
            Verdict.NO_VALIDATION,
            f"training {measure} {last_train} is fine ({_pct(bias)} short of {goal}), but overfitting cannot "
            "be judged without validation data",
            ("pass val_data to the Runner",),
        )
    below = f"{_pct(variance)} of the range below training" if variance > 0 else "no worse than training"
    return report(
        Verdict.GOOD_FIT,
        f"training {measure} {last_train} ({_pct(max(bias, 0.0))} of the range short of {goal}) and "
        f"validation {last_val} ({below}) after {n} epochs",
    )


def _fmt(x: float, measure: str = "loss") -> str:
    if not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):.3f}" if measure == "accuracy" else f"{float(x):.3g}"


def _pct(x: float) -> str:
    return f"{100 * float(x):.0f}%" if math.isfinite(float(x)) else "n/a"


# ================================================================================ from a session
def _classes(session: Any) -> int | None:
    """The number of classes of a classifier session, or ``None``.

    Only once an epoch measured an accuracy (2-D logits against integer class targets: a regression
    with several outputs is no classifier). Read from the LOSS stage's output shape, else from the last
    linear layer; kept once known (a rewind clears the stage records).
    """
    cached = session.__dict__.get("_fit_classes")
    if cached:
        return int(cached)
    epochs = getattr(getattr(session, "history", None), "epochs", ())
    if not any("accuracy" in (e.train_metrics or {}) or "accuracy" in (e.val_metrics or {}) for e in epochs):
        return None
    rec = (getattr(session, "records", None) or {}).get(Stage.LOSS)
    shape = getattr(rec.data, "output_shape", None) if rec is not None else None
    k = int(shape[1]) if shape is not None and len(shape) == 2 and int(shape[1]) > 1 else None
    if k is None:
        linears = [m for m in session.model.modules() if isinstance(m, nn.Linear)]
        k = linears[-1].out_features if linears and linears[-1].out_features > 1 else None
    if k is not None:
        session.__dict__["_fit_classes"] = k
    return k


def _initial_loss(session: Any) -> float | None:
    """Median of the run's first five finite training losses (kept once known)."""
    cached = session.__dict__.get("_fit_initial_loss")
    if cached is not None:
        return float(cached)
    hist = getattr(session, "history", None)
    if hist is None or not len(hist):
        return None
    losses = hist.loss[:5]
    losses = losses[np.isfinite(losses)]
    if not losses.size or int(hist.step[0]) > 1:  # the ring lost the start: unknown
        return None
    value = float(np.median(losses))
    session.__dict__["_fit_initial_loss"] = value
    return value


def session_baseline(
    session: Any, *, target_accuracy: float | None = None, target_loss: float | None = None
) -> Baseline:
    """The baseline of a session: chance for a classifier (``ln K`` as the loss for a cross-entropy
    loss, ``1/K`` accuracy), else the loss at the start of training; with the user's targets."""
    for name, value in (("target_accuracy", target_accuracy), ("target_loss", target_loss)):
        if value is not None and not (_finite(value) and float(value) >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if target_accuracy is not None and not 0 < float(target_accuracy) <= 1:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy!r}")
    k = _classes(session)
    loss_fn = getattr(session, "loss_fn", None)
    name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "")
    targets = {"target_accuracy": target_accuracy, "target_loss": target_loss}
    if k is not None and name in _CE_LOSSES:
        return Baseline.chance(k, **targets)
    start = _initial_loss(session)
    return Baseline(
        loss=start,
        accuracy=1.0 / k if k is not None else None,
        label="start of training" if start is not None else "first epoch",
        **targets,
    )


def fit_report(
    session: Any, *, target_accuracy: float | None = None, target_loss: float | None = None
) -> FitReport:
    """:func:`assess_fit` of a session's epochs (``session.history.epochs``) against its baseline.

    Parameters
    ----------
    session
        A Runner (or a watcher / callback whose history has epochs).
    target_accuracy, target_loss
        The goal (e.g. the accuracy people reach on the task); default: perfect.
    """
    baseline = session_baseline(session, target_accuracy=target_accuracy, target_loss=target_loss)
    return assess_fit(list(session.history.epochs), baseline)


# ================================================================================ actions
#: ``finding_key`` of the fit panel's actions (they belong to no finding).
FIT_KEY: tuple[str, tuple[str, ...]] = ("fit", ())


def fit_actions(session: Any, report: FitReport) -> tuple[Action, ...]:
    """The actions that apply to ``report`` now, most useful first.

    Overfitting: rewind to the best epoch (early stopping) when a checkpoint holds it, and raise the
    weight decay of the groups that hold weight matrices. Underfitting: raise the learning rate of the
    groups whose measured update/weight ratio says it is far too low (:func:`suggest_lr`). Each goes
    through the session's controls (``rewind``, ``set_weight_decay``, ``set_lr``), and only while the
    session has them and the state it was offered for holds.
    """
    out: list[Action] = []
    if report.verdict is Verdict.OVERFITTING:
        out += _rewind_to_best(session, report)
        out += _raise_weight_decay(session)
    elif report.verdict is Verdict.UNDERFITTING:
        out += _raise_lr(session)
    for a in out:
        a._session = session  # the confirmation line is kept with the session's others
    return tuple(out)


def _rewind_to_best(session: Any, report: FitReport) -> list[Action]:
    """Early stopping: back to a checkpoint taken at the best epoch's end (or between two epochs that
    were both as good), when the best epoch is not the last one."""
    if (
        report.best_epoch is None
        or report.best_step is None
        or report.best_epoch == report.epoch
        or getattr(session, "_one_shot", False)
        or not callable(getattr(session, "rewind", None))
    ):
        return []
    epochs = [e for e in session.history.epochs if _finite(e.train_loss)]
    good_steps = _good_steps(epochs, report)
    cks = [*getattr(session, "checkpoints", ()), *getattr(session, "auto_checkpoints", ())]
    chosen = [c for c in cks if _holds_good_weights(c.step, epochs, good_steps)]
    if not chosen:
        return []
    ck = min(chosen, key=lambda c: (abs(c.step - report.best_step), -c.id))
    best = next(e for e in epochs if e.step == report.best_step)

    def still() -> bool:
        # Training on (a click during a run applies once it paused) keeps it valid; a rewind past the
        # best epoch, or the checkpoint thinned away, does not.
        held = [*getattr(session, "checkpoints", ()), *getattr(session, "auto_checkpoints", ())]
        kept = any(e is best for e in session.history.epochs)
        return kept and session.global_step > ck.step and any(c is ck for c in held)

    at = f"the end of epoch {report.best_epoch}" if ck.step == report.best_step else f"step {ck.step}"
    label = f"Rewind to epoch {report.best_epoch} (early stop)"

    def run() -> str:
        undo = rewind_keeping(session, ck, label, fixing="overfitting")
        return f"Rewound to {at} ({ck.label or f'checkpoint {ck.id}'}), the best validation{undo}."

    numbers = (
        f"validation accuracy {report.best_val_accuracy:.3g}, loss {report.best_val_loss:.3g}"
        if math.isfinite(report.best_val_accuracy)
        else f"validation loss {report.best_val_loss:.3g}"
    )
    return [
        Action(
            label,
            f"Rewind to checkpoint {ck.id} ({at}; best {numbers}), dropping the epochs that overfit; "
            "the abandoned run is kept as a checkpoint.",
            "fit",
            FIT_KEY,
            run,
            still,
        )
    ]


def _good_steps(epochs: Sequence[EpochRecord], report: FitReport) -> set[int]:
    """End steps of the epochs whose validation loss is as good as the best (within half of RISE)."""
    good = {int(report.best_step)} if report.best_step is not None else set()
    for e in epochs:
        if _finite(e.val_loss) and float(e.val_loss) <= report.best_val_loss * (1 + RISE / 2):
            good.add(int(e.step))
    return good


def _holds_good_weights(step: int, epochs: Sequence[EpochRecord], good: set[int]) -> bool:
    """A checkpoint at ``step`` holds as-good weights: taken at a good epoch's end, or between two
    consecutive good epoch ends."""
    if step in good:
        return True
    ends = [int(e.step) for e in epochs]
    for a, b in zip(ends, ends[1:]):
        if a < step < b:
            return a in good and b in good
    return False


def _raise_weight_decay(session: Any) -> list[Action]:
    """Weight decay up to the usual value (or ten times the current one), for the groups that hold
    weight matrices, while below :data:`MAX_DECAY_FACTOR` times the usual value."""
    if not callable(getattr(session, "set_weight_decay", None)):
        return []
    groups = session.optimizer.param_groups
    plan: dict[int, tuple[float, float]] = {}
    for i, g in enumerate(groups):
        if "weight_decay" not in g or not any(p.dim() >= 2 for p in g["params"]):
            continue
        kind = "decoupled" if is_decoupled_decay(g, session.optimizer) else "coupled"
        wd = float(g.get("weight_decay") or 0.0)
        usual = TYPICAL_DECAY[kind]
        new = float(f"{max(usual, 10 * wd):.2g}")
        if new <= wd or new > usual * MAX_DECAY_FACTOR:
            continue
        plan[i] = (wd, new)
    if not plan:
        return []

    def still() -> bool:
        return all(float(groups[i].get("weight_decay") or 0.0) == wd for i, (wd, _) in plan.items())

    def run() -> str:
        for i, (_, new) in plan.items():
            session.set_weight_decay(new, group=i)
        return "Set " + "; ".join(_wd_text(i, wd, new, len(groups)) for i, (wd, new) in plan.items()) + "."

    values = sorted({new for _, new in plan.values()})
    calls = ", ".join(
        f"set_weight_decay({new:.2g}{f', group={i}' if len(groups) > 1 else ''})"
        for i, (_, new) in plan.items()
    )
    return [
        Action(
            f"Raise weight decay to {'/'.join(f'{v:.2g}' for v in values)}",
            f"{calls}: pull the weights toward zero so the model cannot memorize the training set as "
            f"easily (was {', '.join(f'{wd:g}' for wd, _ in plan.values())}).",
            "fit",
            FIT_KEY,
            run,
            still,
        )
    ]


def _wd_text(i: int, old: float, new: float, n: int) -> str:
    where = f"group {i}" if n > 1 else "the optimizer"
    return f"the weight_decay of {where} to {new:.2g} (was {old:g})"


def _raise_lr(session: Any) -> list[Action]:
    """The LR of each group whose measured update/weight ratio puts the LR that hits the usual ratio at
    least :data:`MIN_FACTOR` times higher (at most :data:`MAX_FACTOR`)."""
    if not callable(getattr(session, "set_lr", None)):
        return []
    groups = session.optimizer.param_groups
    plan: dict[int, tuple[float, float]] = {}
    for i, g in enumerate(groups):
        now = float(g["lr"])
        if not now > 0 or not any(p.requires_grad for p in g["params"]):
            continue
        new = suggest_lr(session, i)
        if new is None:
            continue
        new = float(f"{min(new, now * MAX_FACTOR):.2g}")
        if new >= now * MIN_FACTOR:
            plan[i] = (now, new)
    if not plan:
        return []

    def still() -> bool:
        return all(float(groups[i]["lr"]) == now for i, (now, _) in plan.items())

    def run() -> str:
        for i, (_, new) in plan.items():
            session.set_lr(new, group=i)
        parts = [
            f"the LR of {f'group {i}' if len(groups) > 1 else 'the optimizer'} to {new:.2g} (was {now:.3g})"
            for i, (now, new) in plan.items()
        ]
        return "Set " + "; ".join(parts) + "."

    values = "/".join(f"{new:.2g}" for _, new in plan.values())
    calls = ", ".join(
        f"set_lr({new:.2g}{f', group={i}' if len(groups) > 1 else ''})" for i, (_, new) in plan.items()
    )
    return [
        Action(
            f"Raise lr to {values}",
            f"{calls} (now {', '.join(f'{now:.3g}' for now, _ in plan.values())}): the LR whose "
            "update/weight ratio reaches the usual ~1e-2 of the first steps, by the numbers measured.",
            "fit",
            FIT_KEY,
            run,
            still,
        )
    ]
