"""Bounded per-step history: ring buffers with numpy accessors.

Memory is fixed at construction (``capacity`` rows); once full, the oldest row
is overwritten, so a long run never grows. Values are float32 (NaN = not
measured): 4 statistics x 60 parameters x 4 bytes = 960 bytes per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlwidgets.core.records import ControlChange, EpochRecord

__all__ = ["Branch", "History", "RingBuffer"]

#: Abandoned timelines kept in :attr:`History.branches` (oldest dropped).
MAX_BRANCHES = 8


class RingBuffer:
    """A fixed-capacity 2-D ring of float32 rows (or 1-D when ``width`` is None)."""

    def __init__(self, capacity: int, width: int | None = None, dtype: Any = np.float32) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        shape = (capacity,) if width is None else (capacity, width)
        fill = np.nan if np.issubdtype(np.dtype(dtype), np.floating) else 0
        self._data = np.full(shape, fill, dtype=dtype)
        self._fill = fill
        self._cap = capacity
        self._start = 0
        self._len = 0

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        return self._data.nbytes

    @property
    def width(self) -> int:
        """Values per row (1 for a 1-D ring)."""
        return 1 if self._data.ndim == 1 else self._data.shape[1]

    def __len__(self) -> int:
        return self._len

    def append(self, row: Any) -> None:
        cap = self._cap
        n = self._len
        self._data[(self._start + n) % cap] = row
        if n < cap:
            self._len = n + 1
        else:
            self._start = (self._start + 1) % cap

    def widen(self, width: int) -> None:
        """Add columns (filled with NaN) so rows can hold ``width`` values."""
        if self._data.ndim != 2 or width <= self._data.shape[1]:
            return
        extra = np.full((self.capacity, width - self._data.shape[1]), self._fill, dtype=self._data.dtype)
        self._data = np.concatenate([self._data, extra], axis=1)

    def truncate(self, length: int) -> None:
        """Keep only the oldest ``length`` rows (used by rewind)."""
        self._len = max(0, min(self._len, length))

    def values(self) -> np.ndarray:
        """A copy of the rows, oldest first."""
        idx = (self._start + np.arange(self._len)) % self.capacity
        return self._data[idx].copy()

    def last(self) -> np.ndarray | None:
        if not self._len:
            return None
        return self._data[(self._start + self._len - 1) % self.capacity].copy()


@dataclasses.dataclass(frozen=True)
class Branch:
    """A timeline abandoned by a rewind: what the run did after ``start`` before going back.

    Attributes
    ----------
    start
        Global step of the checkpoint rewound to (where the branch leaves the kept timeline).
    end
        Global step the run had reached when it was rewound.
    step, loss
        The abandoned steps (each > ``start``) and their training loss, oldest first.
    val_loss
        Validation loss per epoch end of the abandoned timeline, rows of (global step, loss).
    label
        What rewound it, e.g. the action's label ("Rewind to step 0 and set lr=0.044").
    """

    start: int
    end: int
    step: np.ndarray
    loss: np.ndarray
    val_loss: np.ndarray
    label: str


#: The statistics of an unmeasured row (written as NaN).
_NO_STATS = np.zeros(0)
_NO_STATS.flags.writeable = False


class History:
    """Per-step numbers of a run (DESIGN section 3).

    Attributes are numpy arrays, oldest step first: ``loss`` (steps,),
    ``lr`` (steps x groups), and ``grad_norm``, ``weight_norm``,
    ``update_norm``, ``update_ratio`` (steps x parameters, columns are
    ``param_names``). ``step`` holds the global step of each row,
    ``exact`` whether its statistics are exact or sampled estimates and
    ``measured`` whether they were measured at all (unmeasured rows of the
    tracking schedule hold NaN statistics, with their loss and LR).

    Parameters
    ----------
    param_names
        Column names of the per-parameter arrays.
    capacity
        Rows kept; older rows are overwritten.
    """

    _PER_PARAM = ("grad_norm", "weight_norm", "update_norm")
    #: Unmeasured rows kept back before they are written into the rings together.
    PENDING_MAX = 64

    def __init__(self, param_names: Sequence[str], capacity: int = 10_000) -> None:
        self.param_names: list[str] = list(param_names)
        self.capacity = capacity
        n = len(self.param_names)
        self._loss = RingBuffer(capacity)
        self._step = RingBuffer(capacity, dtype=np.int64)
        self._epoch = RingBuffer(capacity, dtype=np.int32)
        self._exact = RingBuffer(capacity, dtype=np.bool_)
        self._measured = RingBuffer(capacity, dtype=np.bool_)
        self._lr = RingBuffer(capacity, width=1)
        self._stats = {k: RingBuffer(capacity, width=max(n, 1)) for k in self._PER_PARAM}
        #: The rings of one row per step (appended and truncated together).
        self._rows: tuple[RingBuffer, ...] = (
            self._loss,
            self._step,
            self._epoch,
            self._exact,
            self._measured,
            self._lr,
            *self._stats.values(),
        )
        #: validation loss per epoch, as (global step, value); bounded like the rest.
        self._val = RingBuffer(capacity, width=2, dtype=np.float64)
        #: timelines abandoned by rewinds, newest last, at most MAX_BRANCHES (see :meth:`branch_off`).
        self.branches: list[Branch] = []
        #: control markers (freeze, set_lr, rewind ...), newest last, bounded.
        self.controls: list[ControlChange] = []
        #: epoch-end records, newest last, bounded.
        self.epochs: list[EpochRecord] = []
        #: per-module activation statistics: name -> ring of (step, mean, std, frac_zero, dead_frac).
        self.activations: dict[str, RingBuffer] = {}
        self._act_capacity = max(1, capacity // 10)
        #: Bumped by every write, so derived indexes (the measured rows) are rebuilt only when stale.
        self._version = 0
        self._measured_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))
        #: Rows not yet written into the rings, as :meth:`_write`'s arguments. Written together by
        #: :meth:`_flush` before anything reads the rings, or when ``PENDING_MAX`` rows wait (see
        #: :meth:`append`).
        self._pending: list[tuple[Any, ...]] = []

    # -- writing -----------------------------------------------------------
    def append(
        self,
        *,
        step: int,
        epoch: int,
        loss: float,
        lr: Sequence[float],
        grad_norm: np.ndarray,
        weight_norm: np.ndarray,
        update_norm: np.ndarray,
        exact: bool,
        measured: bool = True,
    ) -> None:
        """Add one optimizer step (``measured=False``: a row without statistics).

        The arrays are kept, not copied: the caller hands over new arrays each step.
        """
        # A tuple now, the ring writes later and together. Between two training steps' kernels each
        # numpy write runs cold (several us each, about a dozen per row); a batch of rows written at
        # once costs a fraction of that per row. Every reader flushes first.
        pending = self._pending
        if measured:
            pending.append((step, epoch, loss, tuple(lr), grad_norm, weight_norm, update_norm, exact, True))
        else:
            pending.append((step, epoch, loss, tuple(lr), _NO_STATS, _NO_STATS, _NO_STATS, exact, False))
        if len(pending) >= self.PENDING_MAX:
            self._flush()

    def _flush(self) -> None:
        """Write the deferred rows into the rings (oldest first)."""
        pending, self._pending = self._pending, []
        write = self._write
        for row in pending:
            write(*row)

    def _write(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: Sequence[float],
        grad_norm: np.ndarray,
        weight_norm: np.ndarray,
        update_norm: np.ndarray,
        exact: bool,
        measured: bool,
    ) -> None:
        # Every per-step ring holds the same rows: find the slot once and write into it (this
        # runs every training step, and eight ring appends cost more than the writes).
        ring = self._loss
        cap, n = ring._cap, ring._len
        slot = (ring._start + n) % cap
        self._loss._data[slot] = loss
        self._step._data[slot] = step
        self._epoch._data[slot] = epoch
        self._exact._data[slot] = exact
        self._measured._data[slot] = measured
        lr_ring = self._lr
        if len(lr) > lr_ring.width:
            lr_ring.widen(len(lr))
        lr_row = lr_ring._data[slot]
        lr_row[: len(lr)] = lr
        if len(lr) < len(lr_row):
            lr_row[len(lr) :] = np.nan
        stats = self._stats
        for key, values in (
            ("grad_norm", grad_norm),
            ("weight_norm", weight_norm),
            ("update_norm", update_norm),
        ):
            stats[key]._data[slot] = values if len(values) else np.nan
        for r in self._rows:
            if n < cap:
                r._len = n + 1
            else:
                r._start = (r._start + 1) % cap
        self._version += 1

    def add_activations(self, step: int, stats: dict[str, tuple[float, float, float, float]]) -> None:
        """Record per-module activation statistics measured at ``step``."""
        for name, (mean, std, frac_zero, dead) in stats.items():
            ring = self.activations.get(name)
            if ring is None:
                ring = self.activations[name] = RingBuffer(self._act_capacity, width=5, dtype=np.float64)
            ring.append((step, mean, std, frac_zero, dead))

    def add_epoch(self, record: EpochRecord) -> None:
        self.epochs.append(record)
        del self.epochs[: -self.capacity]
        if record.val_loss is not None:
            self._val.append((record.step, record.val_loss))

    def add_control(self, change: ControlChange) -> None:
        self.controls.append(change)
        del self.controls[: -self.capacity]

    def branch_off(self, step: int, label: str) -> Branch | None:
        """Keep the loss of the rows after ``step`` as a :class:`Branch` (call before truncating).

        ``None`` (nothing kept) when no row lies after ``step``. At most
        ``MAX_BRANCHES`` are kept, so the memory stays bounded (each holds at most
        ``capacity`` losses).
        """
        if self._pending:
            self._flush()
        steps = self._step.values()
        after = steps > step
        if not after.any():
            return None
        val = self._val.values()
        branch = Branch(
            start=int(step),
            end=int(steps[-1]),
            step=steps[after].copy(),
            loss=self._loss.values()[after].astype(np.float64),
            val_loss=val[val[:, 0] > step] if len(val) else np.zeros((0, 2)),
            label=label,
        )
        self.branches.append(branch)
        del self.branches[:-MAX_BRANCHES]
        return branch

    def truncate_to_step(self, step: int, epoch: int | None = None) -> None:
        """Forget what happened after ``step`` optimizer steps (rewind keeps the older past).

        Step rows are stamped with the step they completed (1, 2, ...) and are
        kept up to ``step``; activation rows are stamped with the steps
        completed before their forward pass, so only those below ``step`` are
        kept; epoch ends are kept when their epoch index is below ``epoch``
        (an epoch can end after its last step, so its step number alone cannot
        tell whether it happened before a checkpoint).
        """
        if self._pending:
            self._flush()
        steps = self._step.values()
        keep = int(np.searchsorted(steps, step, side="right")) if len(steps) else 0
        for ring in self._rows:
            ring.truncate(keep)
        self._version += 1
        gone = [e for e in self.epochs if (e.epoch >= epoch if epoch is not None else e.step > step)]
        self.epochs = [e for e in self.epochs if e not in gone]
        self._val.truncate(len(self._val) - sum(e.val_loss is not None for e in gone))
        for ring in self.activations.values():
            vals = ring.values()
            ring.truncate(int(np.sum(vals[:, 0] < step)) if len(vals) else 0)

    # -- reading -----------------------------------------------------------
    def __len__(self) -> int:
        return min(self.capacity, len(self._loss) + len(self._pending))

    @property
    def loss(self) -> np.ndarray:
        if self._pending:
            self._flush()
        return self._loss.values().astype(np.float64)

    @property
    def step(self) -> np.ndarray:
        if self._pending:
            self._flush()
        return self._step.values()

    @property
    def epoch(self) -> np.ndarray:
        if self._pending:
            self._flush()
        return self._epoch.values()

    @property
    def exact(self) -> np.ndarray:
        if self._pending:
            self._flush()
        return self._exact.values()

    @property
    def measured(self) -> np.ndarray:
        """Per row: True where the per-parameter statistics were measured (else NaN)."""
        if self._pending:
            self._flush()
        return self._measured.values()

    @property
    def lr(self) -> np.ndarray:
        if self._pending:
            self._flush()
        return self._lr.values().astype(np.float64)

    @property
    def grad_norm(self) -> np.ndarray:
        return self._per_param("grad_norm")

    @property
    def weight_norm(self) -> np.ndarray:
        return self._per_param("weight_norm")

    @property
    def update_norm(self) -> np.ndarray:
        return self._per_param("update_norm")

    @property
    def update_ratio(self) -> np.ndarray:
        from tlwidgets.core.stats import update_ratio

        return update_ratio(self.update_norm, self.weight_norm)

    @property
    def val_loss(self) -> np.ndarray:
        """Validation loss per epoch end, as rows of (global step, loss)."""
        return self._val.values()

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers (fixed once constructed, apart from activation rings)."""
        rings = [*self._rows, self._val]
        return sum(r.nbytes for r in rings) + sum(r.nbytes for r in self.activations.values())

    # -- windows (what the rules read) -----------------------------------------
    def _measured_positions(self) -> np.ndarray:
        """Row positions (0 = oldest kept row) of the measured rows, oldest first; cached per write."""
        if self._pending:
            self._flush()
        version, positions = self._measured_cache
        if version != self._version:
            positions = np.flatnonzero(self._measured.values())
            self._measured_cache = (self._version, positions)
        return positions

    @property
    def measured_count(self) -> int:
        """Number of kept rows whose per-parameter statistics were measured."""
        return int(self._measured_positions().size)

    def span(self, n: int) -> int:
        """Rows (measured or not) from the ``n``-th newest measured row to the newest row.

        The loss and LR are recorded on every step: a loss window that covers the
        same steps as a window of ``n`` measured rows is ``window("loss", span(n),
        measured=False)``.
        """
        positions = self._measured_positions()
        if n <= 0 or not positions.size:
            return 0
        return len(self) - int(positions[-min(n, positions.size)])

    def window(self, key: str, n: int, *, measured: bool | None = None) -> np.ndarray:
        """The newest ``n`` rows of a per-step series, oldest first (a copy; never the whole ring).

        Parameters
        ----------
        key
            ``loss``, ``step``, ``epoch``, ``exact``, ``measured``, ``lr``,
            ``grad_norm``, ``weight_norm`` or ``update_norm``.
        n
            Rows wanted (fewer when fewer exist).
        measured
            Count measured rows only. Default: True for the per-parameter
            statistics (unmeasured rows hold only NaN there) and False for the
            series recorded on every step (loss, LR, step, epoch). Trend rules
            count measured rows so that a trend starting late in a long run is
            judged on as much evidence as one at the start, whatever the schedule.

        Returns
        -------
        numpy.ndarray
            float64 for the float series (per-parameter ones cut to
            ``param_names``), int for ``step``/``epoch``, bool for the flags.
        """
        if self._pending:
            self._flush()
        ring = self._stats[key] if key in self._stats else getattr(self, f"_{key}", None)
        if not any(ring is r for r in self._rows):
            raise KeyError(f"no per-step series {key!r}")
        if measured is None:
            measured = key in self._PER_PARAM
        length = len(ring)
        cap = ring.capacity
        if measured:
            positions = self._measured_positions()
            chosen = positions[max(0, positions.size - n) :] if n > 0 else positions[:0]
            out = ring._data[(ring._start + chosen) % cap]
        else:
            n = max(0, min(n, length))
            first = (ring._start + length - n) % cap
            if first + n <= cap:  # contiguous: a view, copied once below
                out = ring._data[first : first + n]
            else:
                out = np.concatenate([ring._data[first:], ring._data[: first + n - cap]])
        if key in self._PER_PARAM:
            out = out[:, : len(self.param_names)]
        if out.dtype.kind == "f":
            return out.astype(np.float64)  # always a copy
        return out.copy()

    def recent_losses(self, n: int) -> list[float]:
        """The newest ``n`` training losses, oldest first, as Python floats.

        ``window("loss", n)`` for the few values a rule reads on every step (no
        array copies: the rows are read straight out of the ring).
        """
        if self._pending:
            self._flush()
        ring = self._loss
        length, cap, start, data = ring._len, ring._cap, ring._start, ring._data
        n = max(0, min(n, length))
        return [float(data[(start + i) % cap]) for i in range(length - n, length)]

    def _per_param(self, key: str) -> np.ndarray:
        if self._pending:
            self._flush()
        values = self._stats[key].values().astype(np.float64)
        return values[:, : len(self.param_names)]

    def column(self, key: str, name: str) -> np.ndarray:
        """One parameter's series for ``key`` (e.g. ``"update_ratio"``)."""
        return getattr(self, key)[:, self.param_names.index(name)]

    def last(self) -> dict[str, Any] | None:
        """The newest row as a dict, or None when empty."""
        if self._pending:
            self._flush()
        if not len(self):
            return None
        return {
            "step": int(self._step.last()),
            "loss": float(self._loss.last()),
            "lr": self._lr.last().astype(np.float64),
            "grad_norm": self._stats["grad_norm"].last()[: len(self.param_names)].astype(np.float64),
            "weight_norm": self._stats["weight_norm"].last()[: len(self.param_names)].astype(np.float64),
            "update_norm": self._stats["update_norm"].last()[: len(self.param_names)].astype(np.float64),
        }

    # -- export --------------------------------------------------------------
    def to_dataframe(self, wide: bool = True):
        """Per-step history as a pandas DataFrame (pandas is an optional dependency).

        ``wide=True`` gives one row per step with ``loss``, ``lr/<group>`` and
        ``<stat>/<param>`` columns; ``wide=False`` gives a long table with
        columns step, param, grad_norm, weight_norm, update_norm, update_ratio.
        """
        from tlwidgets.core.export import history_to_dataframe

        return history_to_dataframe(self, wide=wide)

    def to_tensorboard(
        self, log_dir: Any = None, *, writer: Any = None, histogram_every: int = 0, model: Any = None
    ) -> str:
        """Write scalars (loss, lr, per-parameter statistics) to TensorBoard; returns the log dir.

        See :func:`tlwidgets.core.export.history_to_tensorboard`.
        """
        from tlwidgets.core.export import history_to_tensorboard

        return history_to_tensorboard(
            self, log_dir, writer=writer, histogram_every=histogram_every, model=model
        )
