"""What the Lightning and Hugging Face callbacks share: one watcher per fit, fed by the framework.

A framework callback does not record anything itself. When the framework has
built the model, optimizer and scheduler it creates a
:class:`FrameworkWatcher` (a :class:`~tlwidgets.core.watch.Watcher`, so the
same hooks, recorder, rules and history as ``tlw.watch``), hands it the loss
of each backward pass and the validation results, applies the controls
queued from a dashboard at batch boundaries, and finishes and closes the
watcher when the fit ends or raises.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.events import Event
from tlwidgets.core.records import EpochRecord
from tlwidgets.core.watch import Watcher

__all__ = ["BackgroundFit", "CallbackAdapter", "FrameworkWatcher", "fit_in_background", "missing_extra"]

log = logging.getLogger(__name__)


def missing_extra(package: str, extra: str, exc: ImportError) -> ImportError:
    """The ImportError raised when a framework is not installed, naming the extra that installs it."""
    err = ImportError(
        f'tlwidgets.integrations.{extra} needs {package}: pip install "tlwidgets[{extra}]" ({exc})'
    )
    err.__cause__ = exc
    return err


class FrameworkWatcher(Watcher):
    """A watcher driven by a framework's callback (Lightning, Hugging Face ``Trainer``).

    It is a :class:`~tlwidgets.core.watch.Watcher` (``kind == "watch"``: the
    same rules, panels and history) with three additions the callbacks need:

    - controls (``freeze``, ``unfreeze``, ``set_lr``, ``set_bn_eval``) called
      while the fit runs are queued (thread-safe) and applied by
      :meth:`apply_pending` at the next batch boundary, where the framework is
      between two optimizer steps;
    - :meth:`record_loss` takes a ``scale``: frameworks divide the loss they
      backpropagate by the number of accumulation steps, and the history keeps
      the loss on the criterion's own scale;
    - :meth:`record_validation` turns a validation result into the epoch
      record a Runner writes (``history.epochs``, ``history.val_loss``, the
      epoch rules, ``Event.EPOCH``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._control_lock = threading.Lock()
        self._fitting = False
        self._last_val_step = 0
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ controls
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "this watcher is closed: the fit it followed has ended (its hooks are removed); "
                "freeze/unfreeze/set_lr act during a fit, at the next batch"
            )

    def _control(self, apply: Callable[[], Any], result: Any) -> Any:
        self._check_open()
        with self._control_lock:
            if self._fitting:  # the framework is inside a step: wait for the batch boundary
                self._pending.append(apply)
                return result
        apply()
        return result

    def begin_fit(self) -> None:
        """From now on, controls wait for :meth:`apply_pending`."""
        with self._control_lock:
            self._fitting = True

    def end_fit(self) -> None:
        """Apply what is still queued; later controls act at once (until the watcher is closed)."""
        with self._control_lock:
            self._fitting = False
        if not self.closed:
            self.apply_pending()
        else:
            self._pending.clear()

    def apply_pending(self) -> None:
        """Apply the queued controls (call at a batch boundary, on the training thread)."""
        if not self._pending:
            return
        with self._control_lock:
            todo = list(self._pending)
            self._pending.clear()
        for apply in todo:
            try:
                apply()
            except Exception as exc:  # a control that no longer applies must not stop the fit
                self._internal_error("queued control", exc)

    # ------------------------------------------------------------------ loss
    def record_loss(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """The loss of this backward pass; ``scale`` multiplies the value recorded (not the gradient).

        ``scale`` undoes a framework's division of the loss by the number of
        accumulation steps, so the recorded loss is the criterion's value.
        """
        before = next(reversed(self._terms)) if self._terms else None
        super().record_loss(loss)
        if scale == 1.0 or not self._terms:
            return
        key = next(reversed(self._terms))
        if key != before:  # the term record_loss just noted (not one added to a pass already under way)
            term = self._terms[key]
            self._terms[key] = dataclasses.replace(term, value=term.value * scale)

    # ------------------------------------------------------------------ validation
    def record_validation(
        self, val_loss: float | None, *, epoch: int | None = None, metrics: dict[str, float] | None = None
    ) -> EpochRecord:
        """Record a validation result as an epoch record (what a Runner writes at an epoch end).

        The training loss of the record is the mean recorded loss of the steps
        since the previous validation.
        """
        step = self.global_step
        losses, steps = self.history.loss, self.history.step
        recent = losses[(steps > self._last_val_step) & np.isfinite(losses)] if losses.size else losses
        self._last_val_step = step
        record = EpochRecord(
            epoch=self.epoch if epoch is None else int(epoch),
            step=step,
            train_loss=float(recent.mean()) if recent.size else math.nan,
            val_loss=None if val_loss is None or not math.isfinite(val_loss) else float(val_loss),
            val_metrics=dict(metrics or {}),
            lr=[float(g["lr"]) for g in self.optimizer.param_groups],
            batches=int(recent.size),
        )
        self.history.add_epoch(record)
        self._publish(self._diagnose("on_epoch", record))
        self.events.emit(Event.EPOCH, record)
        return record

    def _end_step(self) -> None:
        # A framework's closure (Lightning's automatic optimization) runs the last micro-batch of an
        # accumulation inside optimizer.step(closure): the step's loss is the mean over the
        # micro-batches before the step and that one (the watcher keeps only the former when both exist).
        if self._step_values and self._instep_values:
            self._step_values = [*self._step_values, self._instep_values[0]]
        super()._end_step()


class CallbackAdapter:
    """The framework-independent half of a ``DebugCallback``.

    Holds the watcher of the current (or last) fit and delegates to it, so
    ``cb.findings``, ``cb.history``, ``cb.records``, ``cb.events``,
    ``cb.freeze(...)``, ``cb.set_lr(...)`` are the watcher's own. Before the
    first fit ``cb.findings`` is empty and ``cb.session`` is None; anything
    else raises an AttributeError that says so.

    Parameters
    ----------
    **watch_options
        Options of :class:`~tlwidgets.Watcher` (``measure_every``,
        ``dense_steps``, ``sample_size``, ``diagnoser``, ...).
    """

    #: Not "runner"/"watch": a Dashboard attaches later, when the watcher exists (see :meth:`on_attach`).
    kind = "callback"

    def _init_adapter(self, watch_options: dict[str, Any]) -> None:
        forbidden = {"model", "optimizer", "loss_fn", "scheduler"} & set(watch_options)
        if forbidden:
            raise TypeError(
                f"DebugCallback takes no {sorted(forbidden)}: the framework provides them at fit start"
            )
        self.watch_options = dict(watch_options)
        #: One watcher per fit, oldest first (the last is :attr:`session`).
        self.watchers: list[FrameworkWatcher] = []
        self._listeners: list[Callable[[FrameworkWatcher], None]] = []

    # ------------------------------------------------------------------ the watcher
    @property
    def session(self) -> FrameworkWatcher | None:
        """The watcher of the current or last fit (None before the first fit)."""
        watchers = self.__dict__.get("watchers")
        return watchers[-1] if watchers else None

    @property
    def findings(self) -> list[Any]:
        """The current (or last) fit's findings, most likely root cause first ([] before a fit)."""
        s = self.session
        return s.findings if s is not None else []

    @property
    def history(self) -> Any:
        """The current (or last) fit's :class:`~tlwidgets.History`."""
        return self._require("history").history

    def _require(self, what: str) -> FrameworkWatcher:
        s = self.session
        if s is None:
            raise AttributeError(
                f"{type(self).__name__}.{what} exists once the fit has started (the framework builds the "
                "optimizer then); pass the callback to the trainer and call fit/train first"
            )
        return s

    def __getattr__(self, name: str) -> Any:
        # Only called for names the callback lacks: the watcher's (records, events, freeze, set_lr, ...).
        if name.startswith("_") or "watchers" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._require(name), name)

    def on_attach(self, fn: Callable[[FrameworkWatcher], None]) -> Callable[[], None]:
        """Call ``fn(watcher)`` when a fit creates its watcher, and again with the same watcher when
        that fit ends (it is closed then); returns the unsubscribe function.

        ``tlw.Dashboard(cb)`` uses this to build its panels when the fit starts and to draw the
        final state when it ends (redraws during the fit are throttled).
        """
        self._listeners.append(fn)

        def off() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return off

    def _start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> FrameworkWatcher:
        """A new watcher for this fit (the previous one, if still open, is finished and closed)."""
        self._stop(interrupted=True)
        watcher = FrameworkWatcher(model, optimizer, scheduler=scheduler, **self.watch_options)
        self.watchers.append(watcher)
        del self.watchers[:-8]  # each keeps its history: a notebook that fits many times stays bounded
        watcher.begin_fit()
        self._notify(watcher)
        return watcher

    def _notify(self, watcher: FrameworkWatcher) -> None:
        for fn in list(self._listeners):
            try:
                fn(watcher)
            except Exception:  # a dashboard failing to follow must not stop the fit
                log.exception("tlwidgets: a listener of the callback raised")

    def _stop(self, *, interrupted: bool) -> None:
        """Finish (final loop checks) and close the current watcher; idempotent, never raises."""
        w = self.session
        if w is None or w.closed:
            return
        try:
            w.end_fit()
            w.finish(interrupted=interrupted)
        except Exception as exc:
            w._internal_error("finish", exc)
        finally:
            w.close()
            self._notify(w)  # dashboards draw the final state

    def close(self) -> None:
        """Remove the hooks of the current fit's watcher (also done at the end of every fit)."""
        self._stop(interrupted=True)

    @property
    def active(self) -> bool:
        """True while a fit is being watched (its hooks are in place)."""
        s = self.session
        return s is not None and not s.closed

    # ------------------------------------------------------------------ pickling (spawned processes)
    def __getstate__(self) -> dict[str, Any]:
        # A process started by the framework (ddp_spawn) gets the callback without the watchers of
        # this process (hooks, tensors) or the dashboards listening to it.
        state = dict(self.__dict__)
        state["watchers"] = []
        state["_listeners"] = []
        return state

    def __repr__(self) -> str:
        s = self.session
        where = "before fit" if s is None else repr(s)
        return f"{type(self).__name__}({where})"


class BackgroundFit:
    """A fit running in a background thread (see :func:`fit_in_background`).

    Attributes
    ----------
    thread
        The ``threading.Thread`` running it.
    exception
        What the fit raised (None while it runs or when it ended cleanly).
    """

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.exception: BaseException | None = None
        self._result: Any = None
        ctx = contextvars.copy_context()  # ipykernel 7 reads ContextVars when widgets send from a thread

        def target() -> None:
            try:
                self._result = fn(*args, **kwargs)
            except BaseException as exc:  # kept for result(); a thread would only print it
                self.exception = exc
                log.error("tlwidgets: the background fit raised %s: %s", type(exc).__name__, exc)

        self.thread = threading.Thread(target=ctx.run, args=(target,), name="tlwidgets-fit", daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        """True once the fit has returned or raised."""
        return not self.thread.is_alive()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the fit; return what it returned, or raise what it raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the fit is still running after {timeout} s")
        if self.exception is not None:
            raise self.exception
        return self._result

    def __repr__(self) -> str:
        state = "running" if not self.done else ("raised" if self.exception is not None else "done")
        return f"BackgroundFit({state})"


def fit_in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BackgroundFit:
    """Run ``fn(*args, **kwargs)`` (``trainer.fit`` / ``trainer.train``) in a background thread.

    A fit that blocks the cell receives no dashboard clicks until it ends;
    in a thread it leaves the kernel free, so the dashboard's toggles and
    sliders act during the fit (the callback applies them at the next batch
    boundary). The thread is started through ``contextvars.copy_context().run``
    (ipykernel 7 needs the cell's context to send widget updates from a
    thread). Returns a :class:`BackgroundFit`; ``.result()`` waits for the end.
    """
    return BackgroundFit(fn, args, kwargs)
