"""Facts several rules read, derived once from what the session recorded and found.

Rules never pass flags to each other. What one rule needs to know about a
cause another rule names (the batches are sorted by class, clipping cuts every
step, the schedule collapsed, the gradients were huge from initialization, an
LR was named too high) is read here from the session's *published* findings.
The diagnoser publishes a hook's findings after all of its rules ran, so every
rule of an evaluation sees the same facts: their order cannot change a result.

Running tallies fed by the records (label counts of the scanned batches) are
updated by the diagnoser before the rules of a record run (:meth:`Derived.observe`).
Values that are fixed once known (the run's first losses) are kept here too.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np

from tlwidgets.core.stages import Stage

__all__ = ["Derived", "DerivedView", "LabelTally", "OrderTest", "binom_tail"]

#: A batch whose majority class holds at least this share counts as single-class.
PURE_SHARE = 0.9
#: Scanned batches the order test looks at (the newest).
PURE_WINDOW = 16
#: Scanned batches before the order test says anything.
PURE_MIN_BATCHES = 4
#: Share of single-class batches from which sorted batches are named...
PURE_OBSERVED = 0.5
#: ... when the chance of seeing that many under random order is below this.
PURE_P_VALUE = 1e-6
#: Below this the order is suspect: label statistics wait (the stream may be sorted).
PURE_SUSPECT = 1e-2


def binom_tail(b: int, p: np.ndarray, k: int) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(b, p), vectorized over p (log-space, exact)."""
    ks = np.arange(k, b + 1)
    logc = np.array([math.lgamma(b + 1) - math.lgamma(j + 1) - math.lgamma(b - j + 1) for j in ks])
    with np.errstate(divide="ignore"):
        lp, lq = np.log(p)[:, None], np.log1p(-p)[:, None]
    terms = np.exp(logc[None, :] + ks[None, :] * lp + (b - ks)[None, :] * lq)
    terms[~np.isfinite(terms)] = 0.0
    return terms.sum(axis=1)


@dataclasses.dataclass(frozen=True)
class OrderTest:
    """Do the recent scanned batches each hold one class more often than random order allows?

    Attributes
    ----------
    observed, expected
        Share of single-class batches seen / expected under random order.
    p_value
        Chance of that many (or more) single-class batches under random order.
    batch_size
        Median size of the recent batches.
    sorted
        The order is named sorted (``unshuffled-data``).
    suspect
        Too early to tell, or unlikely under random order: class statistics wait.
    classes
        Majority classes of the recent batches.
    """

    observed: float
    expected: float
    p_value: float
    batch_size: int
    sorted: bool
    suspect: bool
    classes: tuple[int, ...] = ()


class LabelTally:
    """Running class counts of the scanned batches (whole run and current epoch) and their order."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, np.int64)
        self.epoch: int | None = None
        self.epoch_counts: np.ndarray | None = None
        self.recent: collections.deque[tuple[int, float, int]] = collections.deque(maxlen=PURE_WINDOW)
        self.order: OrderTest | None = None
        self._key: tuple[int, int, int] | None = None

    def add(self, counts: np.ndarray, epoch: int, batch: int, step: int) -> bool:
        """Count one batch's labels; False when this batch was counted already (a retried FETCH)."""
        counts = np.asarray(counts, dtype=np.int64)
        size = int(counts.sum())
        key = (epoch, batch, step)
        if size == 0 or key == self._key:
            return False
        self._key = key
        if self.epoch != epoch:
            self.epoch, self.epoch_counts = epoch, np.zeros(0, np.int64)
        self.counts = _added(self.counts, counts)
        self.epoch_counts = _added(self.epoch_counts, counts)
        major = int(np.argmax(counts))
        self.recent.append((size, counts[major] / size, major))
        self.order = self._order_test()
        return True

    @property
    def suspect(self) -> bool:
        """Batch order not yet known to be random (or looks sorted)."""
        return self.order is not None and self.order.suspect

    def _order_test(self) -> OrderTest:
        recent, total = self.recent, self.counts
        early = len(recent) < PURE_MIN_BATCHES
        if early or np.count_nonzero(total) < 2:
            return OrderTest(0.0, 0.0, 1.0, 0, sorted=False, suspect=early)
        b = int(np.median([bb for bb, _, _ in recent]))
        if b < 2:
            return OrderTest(0.0, 0.0, 1.0, b, sorted=False, suspect=False)
        flags = [share >= PURE_SHARE for bb, share, _ in recent if bb >= 2]
        m, k = len(flags), int(sum(flags))
        observed = k / m if m else 0.0
        if observed <= 0.3:  # the usual shuffled case: few single-class batches, nothing to test
            return OrderTest(observed, 0.0, 1.0, b, sorted=False, suspect=False)
        p = total[total > 0] / total.sum()
        p = np.sort(p)[-50:]  # classes with tiny shares cannot fill a batch
        expected = min(1.0, float(binom_tail(b, p, math.ceil(PURE_SHARE * b)).sum()))
        p_value = (
            float(binom_tail(m, np.array([expected]), k)[0]) if 0 < expected < 1 else float(expected >= 1)
        )
        return OrderTest(
            observed,
            expected,
            p_value,
            b,
            sorted=observed >= PURE_OBSERVED and p_value < PURE_P_VALUE,
            suspect=p_value < PURE_SUSPECT,
            classes=tuple(sorted({c for _, _, c in recent})),
        )


def _added(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    total = np.zeros(0, np.int64) if total is None else total
    if total.size < counts.size:
        total = np.concatenate([total, np.zeros(counts.size - total.size, np.int64)])
    total[: counts.size] += counts
    return total


class Derived:
    """What the diagnoser derives for one session: running tallies and values fixed once known."""

    def __init__(self) -> None:
        self.labels = LabelTally()
        self.loss0: float | None = None
        self.first_loss: float | None = None

    def observe(self, record: Any) -> None:
        """Feed a stage record before its rules run (label counts of a scanned FETCH)."""
        if getattr(record, "stage", None) is Stage.FETCH:
            counts = record.data.label_counts
            if counts is not None:
                self.labels.add(counts, record.epoch, record.batch, record.step)


class DerivedView:
    """:class:`Derived` bound to its session: what rules read as ``ctx.derived``."""

    __slots__ = ("_derived", "_session")

    def __init__(self, session: Any, derived: Derived) -> None:
        self._session = session
        self._derived = derived

    # ------------------------------------------------------------------ from the records
    @property
    def labels(self) -> LabelTally:
        """Running label counts of the scanned batches."""
        return self._derived.labels

    @property
    def loss0(self) -> float:
        """Median of the run's first 5 training losses (NaN until there are 5)."""
        d = self._derived
        if d.loss0 is None:
            h = self._session.history
            if len(h) < 5:
                return math.nan
            losses = np.asarray(h.window("loss", len(h))[:5], dtype=np.float64)
            finite = losses[np.isfinite(losses)]
            value = float(np.median(finite)) if finite.size else math.nan
            if not math.isfinite(value):
                return value
            d.loss0 = value
        return d.loss0

    @property
    def first_loss(self) -> float:
        """The run's first training loss (the untrained model's; NaN until known)."""
        d = self._derived
        if d.first_loss is None:
            h = self._session.history
            value = float(h.window("loss", len(h))[0]) if len(h) else math.nan
            if not math.isfinite(value):
                return value
            d.first_loss = value
        return d.first_loss

    @property
    def order_unknown(self) -> bool:
        """Class labels are seen but the batch order is not yet known to be random (or looks sorted).

        Waits for the few scanned batches the order test needs, but not forever (a session that
        scans batches rarely must not silence the LR rules).
        """
        labels = self._derived.labels
        if not labels.suspect:
            return False
        return len(labels.recent) >= PURE_MIN_BATCHES or self._session.global_step < 50

    # ------------------------------------------------------------------ from the findings
    def _found(self, code: str) -> list[Any]:
        return self._session.findings_with(code)

    @property
    def unshuffled(self) -> bool:
        """Batches were named sorted by class (``unshuffled-data``)."""
        return bool(self._found("unshuffled-data"))

    @property
    def stale_grads(self) -> bool:
        """Gradients were named as never reset between steps (``grads-not-zeroed``)."""
        return bool(self._found("grads-not-zeroed"))

    @property
    def clipping(self) -> bool:
        """Clipping was named as cutting every step (``grad-clipping-too-strong``)."""
        return bool(self._found("grad-clipping-too-strong"))

    @property
    def explode_init(self) -> bool:
        """Gradients were named huge relative to the weights from initialization on."""
        return any("grad_to_weight" in f.evidence for f in self._found("exploding-gradients"))

    @property
    def collapsed_groups(self) -> set[int]:
        """Optimizer groups whose schedule was named collapsed (``scheduler-too-fast``)."""
        return {int(f.evidence["group"]) for f in self._found("scheduler-too-fast") if "group" in f.evidence}

    @property
    def lr_named_high(self) -> dict[int, float]:
        """Group -> the LR at which it was last named too high (``lr-too-high``)."""
        out: dict[int, float] = {}
        for f in sorted(self._found("lr-too-high"), key=lambda f: f.step):  # the newest naming wins
            ev = f.evidence
            if "group" in ev and "lr" in ev:
                out[int(ev["group"])] = float(ev["lr"])
        return out
