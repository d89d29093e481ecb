"""The step-able training runner: one stage or one batch at a time."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import dataclasses
import logging
import math
import numbers
import operator
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import optimizer as optim_module

from tlwidgets.core.activations import first_tensor
from tlwidgets.core.batches import call_model, default_unpack, tensors_in, to_device
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.checkpoint import (
    AutoCheckpoints,
    Checkpoint,
    capture_generators,
    capture_rng,
    data_generators,
    restore_dropout,
    restore_generators,
    restore_rng,
    restore_scheduler,
)
from tlwidgets.core.controls import (
    ControlsMixin,
    effective_lrs,
    optimizer_param_ids,
)
from tlwidgets.core.events import Event
from tlwidgets.core.findings import Finding
from tlwidgets.core.lean import LeanStepMixin
from tlwidgets.core.plugins import Diagnoser
from tlwidgets.core.records import ControlChange, EpochRecord, ErrorInfo, StageRecord, StageRecords
from tlwidgets.core.session import FindingsMixin
from tlwidgets.core.stages import Stage
from tlwidgets.core.tracker import Tracker
from tlwidgets.core.training import evaluate as evaluate_model
from tlwidgets.core.training import (
    loss_closure,
    needs_closure,
    restore_optimizer,
    snapshot_optimizer,
)

__all__ = ["RunResult", "Runner"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """Why and where :meth:`Runner.run` stopped."""

    steps: int
    epochs: int
    stopped_by: str  # "steps", "epochs", "error", "finding", "non-finite-grad", "pause"
    finding: Finding | None = None
    record: StageRecord | EpochRecord | None = None

    def __str__(self) -> str:
        text = f"ran {self.steps} steps, {self.epochs} epoch ends; stopped by {self.stopped_by}"
        return text + (f": {self.finding.code}" if self.finding is not None else "")


class Runner(FindingsMixin, ControlsMixin, LeanStepMixin):
    """Step through training one stage or one batch at a time.

    Parameters
    ----------
    model
        The ``nn.Module`` to train.
    loss_fn
        ``loss_fn(output, targets) -> scalar tensor`` (an ``nn.Module`` or a function).
    optimizer
        A ``torch.optim.Optimizer`` holding (some of) the model's parameters.
    train_data
        Any iterable of batches, e.g. a ``DataLoader``; re-iterated every epoch.
    val_data
        Optional iterable of validation batches, evaluated at each epoch end.
    scheduler
        Optional LR scheduler.
    scheduler_interval
        ``"epoch"`` (step it at each epoch end) or ``"step"`` (after each optimizer step).
    device
        Where batches go; default: the device of the model's first parameter.
    unpack
        ``unpack(batch) -> (inputs, targets)`` for batches that are not
        ``(inputs, targets)``; dict batches with a ``"target"``/``"label"``/``"y"``
        key are handled by default. Inputs that are a dict are passed to the
        model as keyword arguments, a tuple as positional arguments.
    forward
        ``forward(model, inputs) -> output`` to replace the default call.
    sample_size
        Elements per tensor used for the sampled statistics of ``step()`` and ``run()``.
    history_size
        Steps kept in :attr:`history` (ring buffer).
    activation_every
        Measure per-module activation statistics every this many steps (and in
        the first 3); 0: only for stages stepped alone.
    detail_every
        Describe the batch (value ranges, label counts) and devices every this
        many steps (and in the first 3).
    measure_every, dense_steps
        The measurement schedule of :meth:`step` and :meth:`run`: every step
        is measured (per-parameter statistics, rules) during the first
        ``dense_steps`` steps and again for ``dense_steps`` steps after a
        control change, a rewind or an LR jump; otherwise every
        ``measure_every``-th step. Unmeasured steps record the loss and LR
        (NaN statistics in :attr:`history`) and still stop on a NaN/Inf loss.
        ``measure_every=1`` measures every step.
    diagnose_every
        Past the first 50 steps of a dense phase (each diagnosed), take the
        stage facts and run the rules on a measured step when this many steps
        or more passed since the last time (default 10: every measured step of
        a sparse phase, whose measured steps are ``measure_every`` = 20 apart,
        one step in 10 of a dense phase). The statistics stay measured on every measured
        step and NaN/Inf gradients are held back before STEP on each; 1: the
        rules on every measured step. See :meth:`Tracker.diagnosing`.
    grad_budget
        ``None`` (default): exact grad norms on every measured step, which also
        checks every gradient element for NaN/Inf before STEP. A fraction (e.g. ``0.01``)
        caps the exact pass at that share of step time; steps in between use a
        sampled estimate and check NaN/Inf on the sample only.
    safe_step
        Snapshot weights and optimizer state before every STEP so a failing
        (or interrupted) ``optimizer.step()`` leaves the weights as they were.
        ``None`` (default): for a STEP run by :meth:`step_stage`, for
        optimizers that are not ``torch.optim``'s own and for optimizers with
        step hooks (custom ``step()`` or hook code is what fails half-way; the
        built-in optimizers validate before they write). ``True``: always.
        ``False``: only for :meth:`step_stage`.
    freeze_bn_stats
        Default of ``freeze(..., bn_eval=)``: put fully frozen batch-norm layers in eval mode.
    max_checkpoints
        How many checkpoints :attr:`checkpoints` keeps (oldest dropped; at least 1).
    auto_checkpoints, auto_checkpoint_every, auto_checkpoint_memory
        Automatic checkpoints, kept apart from the user's in
        :attr:`auto_checkpoints` (labelled ``"auto: before run"``, ``"auto: before
        set_lr"``, ``"auto: step 300"``): at the start of :meth:`run` (unless one
        holds this very state), before each control change made at a step
        boundary, every ``auto_checkpoint_every`` steps (0: not
        periodically), and at each epoch end whose validation loss is the best
        so far (``"auto: best validation (epoch 3)"``: what the fit panel's
        early stop rewinds to). At most ``auto_checkpoints`` are kept (0: none taken) and
        at most ``auto_checkpoint_memory`` times the model's state size in
        bytes; the oldest, the newest and the newest best-validation one stay and
        the others are thinned so they stay spread over the run (see
        :class:`AutoCheckpoints`). Never taken
        for a one-shot ``train_data``, which cannot rewind, nor on a GPU when
        one would take over 10% of its free memory. They are what a
        finding's "rewind to before the damage" action finds when the user
        took no checkpoint.
    diagnoser
        The rule set; default: the one registered by :mod:`tlwidgets.diagnostics`.

    Notes
    -----
    **Interrupts.** A ``KeyboardInterrupt`` (any ``BaseException``) raised in
    a stage reaches the caller, and the runner is left where calling
    :meth:`run` again gives exactly what an uninterrupted run would have
    given (bit for bit on CPU):

    - FETCH: the data iterator is not trusted after it raised; the next FETCH
      makes the epoch's iterator again from the RNG states it was first made
      with (the loader's own generators included), skips the batches already
      trained on and fetches the interrupted batch. A one-shot iterator (a
      generator) cannot be made again: see :meth:`checkpoint`.
    - FORWARD: the global torch RNG and the batch-norm running statistics are
      put back as they were before the forward.
    - BACKWARD: the partial gradients are dropped and the next attempt
      rebuilds the graph from the same batch and RNG state.
    - STEP: a Ctrl-C (SIGINT) that arrives during STEP is held until the STEP
      has finished (weights, scheduler and bookkeeping), then raised: the
      step is *completed*. An exception raised by code inside
      ``optimizer.step()`` (a custom optimizer or a step hook) is *restored
      from the snapshot* (see ``safe_step``) and the step is redone on the
      next call. One raised by ``scheduler.step()``, after the weights moved,
      puts the scheduler back as it was and the next call *completes* the
      step (scheduler and bookkeeping) without stepping the optimizer again.
    - Epoch end: RNG states and the scheduler are put back; the next call
      runs the epoch end again.

    Optimizers whose ``step`` requires a closure (``torch.optim.LBFGS``) get
    one that zeroes the gradients and recomputes forward, loss and backward
    on the same batch; :attr:`history` still holds one loss per step (the
    loss of the LOSS stage, before the step).

    Raises
    ------
    TypeError
        When ``model`` is not an ``nn.Module``, ``optimizer`` not an optimizer,
        ``loss_fn``, ``unpack`` or ``forward`` not callable or ``train_data``
        not iterable.
    ValueError
        When the optimizer holds none of the model's parameters, the data is
        empty, ``device`` is not a device (or not on this machine), or an
        option is out of range: counts (``sample_size``, ``history_size``,
        ``measure_every`` >= 1, ``diagnose_every`` >= 1, ``max_checkpoints`` >= 1;
        ``activation_every``, ``detail_every``, ``dense_steps`` >= 0) must be
        integers (numpy ones too, not ``bool``), ``grad_budget`` ``None`` or
        in (0, 1].
    """

    kind = "runner"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        train_data: Iterable[Any],
        val_data: Iterable[Any] | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        device: str | torch.device | None = None,
        *,
        unpack: Callable[[Any], tuple[Any, Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        sample_size: int = 1024,
        history_size: int = 10_000,
        activation_every: int = 25,
        detail_every: int = 10,
        measure_every: int = 20,
        dense_steps: int = 200,
        diagnose_every: int = Tracker.DIAGNOSE_EVERY,
        grad_budget: float | None = None,
        safe_step: bool | None = None,
        freeze_bn_stats: bool = False,
        max_checkpoints: int = 20,
        auto_checkpoints: int = 8,
        auto_checkpoint_every: int = 100,
        auto_checkpoint_memory: float = 16.0,
        diagnoser: Diagnoser | None = None,
    ) -> None:
        _validate(model, loss_fn, optimizer, train_data, val_data, scheduler, scheduler_interval)
        sample_size = _count_option("sample_size", sample_size, low=1)
        history_size = _count_option("history_size", history_size, low=1)
        activation_every = _count_option("activation_every", activation_every, low=0)
        detail_every = _count_option("detail_every", detail_every, low=0)
        measure_every = _count_option("measure_every", measure_every, low=1)
        dense_steps = _count_option("dense_steps", dense_steps, low=0)
        diagnose_every = _count_option("diagnose_every", diagnose_every, low=1)
        max_checkpoints = _count_option("max_checkpoints", max_checkpoints, low=1)
        auto_checkpoints = _count_option("auto_checkpoints", auto_checkpoints, low=0)
        auto_checkpoint_every = _count_option("auto_checkpoint_every", auto_checkpoint_every, low=0)
        if isinstance(auto_checkpoint_memory, bool) or not (
            isinstance(auto_checkpoint_memory, (int, float, np.number)) and auto_checkpoint_memory >= 0
        ):
            raise ValueError(f"auto_checkpoint_memory must be a number >= 0, got {auto_checkpoint_memory!r}")
        grad_budget = _budget_option(grad_budget)
        if safe_step is not None and not isinstance(safe_step, (bool, np.bool_)):
            raise ValueError(f"safe_step must be None, True or False, got {safe_step!r}")
        if not isinstance(freeze_bn_stats, (bool, np.bool_)):
            raise ValueError(f"freeze_bn_stats must be True or False, got {freeze_bn_stats!r}")
        for name, fn in (("unpack", unpack), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.train_data = train_data
        self.val_data = val_data
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        first = next(iter(model.parameters()), None)
        self.device = (
            _device_option(device) if device is not None else (first.device if first is not None else None)
        )
        self.unpack = unpack or default_unpack
        self.forward = forward or call_model
        self.safe_step = _custom_optimizer(optimizer) if safe_step is None else bool(safe_step)
        self._safe_step_auto = safe_step is None  # also snapshot while the optimizer has step hooks
        self._step_hook_dicts = _step_hook_dicts(optimizer)
        self._needs_closure = needs_closure(optimizer)
        self.freeze_bn_stats = freeze_bn_stats
        self._init_session(
            model,
            optimizer,
            diagnoser,
            sample_size=sample_size,
            history_size=history_size,
            grad_budget=grad_budget,
            activation_every=activation_every,
            detail_every=detail_every,
            measure_every=measure_every,
            dense_steps=dense_steps,
            diagnose_every=diagnose_every,
        )
        self.last_record: StageRecord | EpochRecord | None = None
        self.checkpoints: collections.deque[Checkpoint] = collections.deque(maxlen=max_checkpoints)
        state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self._state_bytes = state_bytes
        #: Checkpoints the runner took itself (see the ``auto_checkpoints`` option); never the user's.
        self.auto_checkpoints = AutoCheckpoints(auto_checkpoints, float(auto_checkpoint_memory) * state_bytes)
        self.auto_checkpoint_every = auto_checkpoint_every
        self._changes = 0  # control changes so far: with (step, epoch), tells whether the state moved
        self._ck_mark: tuple[int, int, int] | None = None  # that triple when a checkpoint was last taken
        self._auto_pending: Checkpoint | None = None  # taken before a control, labelled after it

        self.stage = Stage.FETCH
        self.global_step = 0
        self.epoch = 0
        self.batch_index = 0
        self._backward_failed = False
        self._iter: Any = None
        self._epoch_rng = None
        # States of the data sources' own generators when the epoch's iterator was made.
        self._epoch_data_rng: list[tuple[Any, Any]] | None = None
        # The iterator raised (or was interrupted) inside next(): its position is unknown.
        self._iter_broken = False
        self._source_failed = False  # a one-shot source raised this epoch (a batch of it is lost)
        self._fetch_rng: torch.Tensor | None = None  # torch RNG before the batch being fetched
        self._epoch_ending = False  # an epoch end was interrupted: the next FETCH runs it again
        # After optimizer.step() returned: (snapshot, measured, lrs used); the STEP completes from there.
        self._step_applied: tuple[bool, bool, list[float]] | None = None
        self._sigint = _SigintGate()
        self._pre_forward_rng: torch.Tensor | None = None
        # Batch-norm running statistics, saved before each forward (an interrupted forward or a
        # graph rebuilt for a retried BACKWARD must not update them twice).
        self._stat_buffers = [
            b
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in m.buffers(recurse=False)
        ]
        self._stat_saved: list[torch.Tensor] | None = None
        # Not iter(train_data): creating a DataLoader iterator draws from the global RNG.
        self._one_shot = isinstance(train_data, collections.abc.Iterator)
        self._raw_batch: Any = None
        self._have_batch = False
        self._inputs: Any = None
        self._targets: Any = None
        self._output: Any = None
        self._loss: torch.Tensor | None = None
        self._loss_value = math.nan
        self._fwd_rng: torch.Tensor | None = None
        self._step_exact = False
        self._measured = True  # the step in progress measures its statistics
        self._diagnosed = True  # ... and takes the stage facts and runs the rules (Tracker.diagnosing)
        self._run_target: int | None = None  # the global step a run(steps=...) in progress stops at
        self._step_t0 = 0.0
        self._epoch_loss_sum = 0.0
        self._epoch_loss_n = 0
        # Training accuracy of the epoch: correct examples (a 0-d tensor kept on the model's device, read
        # once at the epoch end, so counting costs no host sync per step) and examples counted.
        # Per step only the predictions are taken (one argmax); they are compared with the labels
        # HIT_BATCHES steps at a time (#15: three kernels a step were a percent of a ~1M-parameter step).
        self._batch_hits: tuple[torch.Tensor, torch.Tensor] | None = None  # (predictions, labels)
        self._unfolded_hits: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._epoch_hits: torch.Tensor | None = None
        self._epoch_labelled = 0
        self._bn_eval: dict[str, nn.Module] = {}
        self._in_stage = False
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._pause = threading.Event()
        self._running = False
        self._closed = False
        self._refresh_audit()

    # ------------------------------------------------------------------ public state
    @property
    def running(self) -> bool:
        """True while :meth:`run` or :meth:`run_async` is in progress."""
        return self._running

    @property
    def at_step_boundary(self) -> bool:
        """True between steps: the next stage is FETCH and no batch is held (after a fetch that
        failed, too). Only then can :meth:`checkpoint` capture the state."""
        return self.stage is Stage.FETCH and not self._have_batch

    @property
    def lrs(self) -> list[float]:
        """Effective learning rate of each optimizer group."""
        return effective_lrs(self.optimizer)

    # ------------------------------------------------------------------ stepping
    def step_stage(self) -> StageRecord | EpochRecord:
        """Run exactly one stage (exact statistics) and return its record.

        At the end of the data, FETCH finishes the epoch instead (validation,
        scheduler) and returns an :class:`EpochRecord`; the stage stays FETCH.
        """
        self._check_open()
        return self._do_stage(exact=True)

    def step(self) -> StageRecord | EpochRecord:
        """Finish the current batch (from a boundary: one whole batch).

        Stops early and returns the record of a stage that failed, or of
        BACKWARD when gradients are non-finite (the weights stay untouched;
        call :meth:`step_stage` to apply them anyway).
        """
        self._check_open()
        if self._holding_non_finite():
            return self.records[Stage.BACKWARD]
        while True:
            rec = self._do_stage(exact=False)
            if isinstance(rec, EpochRecord):
                if not rec.ok:
                    return rec
                continue
            if not rec.ok or (rec.stage is Stage.BACKWARD and rec.data.get("non_finite_grad")):
                return rec
            if rec.stage is Stage.STEP:
                return rec

    def run(self, steps: int | None = None, epochs: int | None = None) -> RunResult:
        """Run ``steps`` more optimizer steps or until ``epochs`` more epoch ends (default: one epoch).

        Stops early at a failed stage, at a new error-severity finding, at a
        scheduler that fails to step, before STEP when gradients are
        non-finite, and on :meth:`pause`. A ``KeyboardInterrupt`` stops it
        too and reaches the caller; calling ``run()`` again then continues
        exactly as if it had not happened (see the class notes).

        Parameters
        ----------
        steps, epochs
            Non-negative integers (Python, numpy or 0-d torch integers; not
            ``bool``). ``epochs=0`` runs nothing (and ``steps=0`` only
            finishes a batch in progress).

        Raises
        ------
        ValueError
            For a negative, non-integer or ``bool`` count.
        RuntimeError
            When a run is already in progress.
        """
        self._check_open()
        gen = self._run_iter(steps, epochs, lean=True)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    async def run_async(self, steps: int | None = None, epochs: int | None = None) -> RunResult:
        """:meth:`run` as a coroutine that yields to the event loop between stages."""
        self._check_open()
        gen = self._run_iter(steps, epochs)
        try:
            while True:
                next(gen)
                await asyncio.sleep(0)
        except StopIteration as stop:
            return stop.value

    def skip_batch(self) -> None:
        """Drop the batch in progress (and its gradients) and go back to FETCH.

        The way forward after a run stopped on NaN/Inf gradients: ``run()`` and
        ``step()`` refuse to apply them (``step_stage()`` at STEP would).
        """
        self._check_open()
        if self._running:
            raise RuntimeError("pause the run before skipping a batch")
        if self.stage is Stage.FETCH and not self._have_batch:
            return
        if self._step_applied is not None:
            raise RuntimeError(
                "the optimizer step of this batch was already applied (an interrupted STEP); "
                "call runner.step() to finish it"
            )
        self.optimizer.zero_grad()
        self.stage = Stage.FETCH
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = self._output = self._loss = None
        self._backward_failed = False
        self.records = StageRecords(self._position)
        change = ControlChange("skip_batch", self.global_step, {"batch": self.batch_index})
        self.history.add_control(change)
        self.events.emit(Event.CONTROL, change)

    def _holding_non_finite(self) -> bool:
        """At STEP with NaN/Inf gradients from BACKWARD (a run stopped there)."""
        back = self.records.get(Stage.BACKWARD)
        return self.stage is Stage.STEP and back is not None and bool(back.data.get("non_finite_grad"))

    @property
    def holding_non_finite_grads(self) -> bool:
        """True at STEP with NaN/Inf gradients from BACKWARD: ``run()`` and ``step()`` stopped there,
        and ``step_stage()`` would write them into the weights (``skip_batch()`` drops them)."""
        return self._holding_non_finite()

    def pause(self) -> None:
        """Ask a running :meth:`run` to stop at the next stage boundary."""
        self._pause.set()

    def _run_iter(self, steps: Any, epochs: Any, lean: bool = False) -> Generator[Any, None, RunResult]:
        """The run loop, one stage (or, with ``lean``, one whole undiagnosed step: see
        :mod:`tlwidgets.core.lean`) per iteration."""
        if self._running:
            raise RuntimeError("a run is already in progress on this runner (one run at a time)")
        steps = _count_arg("steps", steps)
        epochs = _count_arg("epochs", epochs)
        if steps is None and epochs is None:
            epochs = 1
        if epochs == 0:  # "until 0 more epoch ends": already there, nothing runs (not one epoch)
            return RunResult(0, 0, "epochs")
        self._auto_checkpoint("before run")
        target = self.global_step + steps if steps is not None else None
        start_step, epochs_done = self.global_step, 0
        self._pause.clear()
        self._running = True
        self._run_target = target
        opened = self._sigint.open()  # one handler for the whole run, not a system call per step
        result = None
        try:
            while result is None:
                if self._pause.is_set():
                    result = RunResult(self.global_step - start_step, epochs_done, "pause")
                    break
                if target is not None and self.global_step >= target and self.stage is Stage.FETCH:
                    result = RunResult(self.global_step - start_step, epochs_done, "steps")
                    break
                # Never apply NaN/Inf gradients unasked (held only at STEP: one comparison per step).
                if self.stage is Stage.STEP and self._holding_non_finite():
                    result = RunResult(
                        self.global_step - start_step,
                        epochs_done,
                        "non-finite-grad",
                        self._latest_error_finding(),
                        self.records[Stage.BACKWARD],
                    )
                    break
                errors_before = self._error_seq  # (the attribute behind _new_errors: a call less per step)
                rec = self._lean_step() if lean and self._lean_ready() else self._do_stage(exact=False)
                yield rec
                done = self.global_step - start_step
                if isinstance(rec, EpochRecord):
                    epochs_done += 1
                    if not rec.ok:  # (the failure is why it stopped, even at the last epoch asked for)
                        result = RunResult(done, epochs_done, "error", record=rec)
                    elif epochs is not None and epochs_done >= epochs:
                        result = RunResult(done, epochs_done, "epochs", record=rec)
                    continue
                if not rec.ok:
                    result = RunResult(done, epochs_done, "error", self._latest_error_finding(), rec)
                elif self._error_seq > errors_before:
                    result = RunResult(done, epochs_done, "finding", self._latest_error_finding(), rec)
                elif rec.stage is Stage.BACKWARD and rec.data.get("non_finite_grad"):
                    result = RunResult(
                        done, epochs_done, "non-finite-grad", self._latest_error_finding(), rec
                    )
                elif rec.stage is Stage.STEP and rec.data.scheduler_error:  # (StepFacts: an attribute)
                    # Stop at every failing scheduler step, not only at the first report: training on
                    # with an LR that no longer follows the schedule would fail silently.
                    result = RunResult(done, epochs_done, "finding", self._stored(rec.findings), rec)
        finally:
            self._running = False
            self._run_target = None
            if opened:
                self._sigint.close()
        return result

    # ------------------------------------------------------------------ stages
    def _do_stage(self, exact: bool) -> StageRecord | EpochRecord:
        if self.stage is not Stage.STEP:
            return self._run_stage(exact)
        # STEP is short and must not stop half-way: a Ctrl-C waits for its end, then is raised.
        opened = self._sigint.hold()
        try:
            rec = self._run_stage(exact)
        finally:
            deliver = self._sigint.release(opened)
        if deliver is not None:
            deliver()  # KeyboardInterrupt, with the step complete
        return rec

    def _run_stage(self, exact: bool) -> StageRecord | EpochRecord:
        stage = self.stage
        if stage is Stage.FETCH:
            if not self._have_batch:
                if not self._iter_broken:  # (a retry keeps the state from before the failed fetch)
                    self._fetch_rng = torch.get_rng_state()
                end = self._maybe_end_epoch()
                if end is not None:
                    return end
            self.records = StageRecords(self._position)
            self._plan_step(exact)
            self._step_t0 = time.perf_counter()
        elif exact:
            self._step_exact = self._measured = self._diagnosed = True
        if stage is Stage.FORWARD:
            self._save_forward_state()
        rec = StageRecord(stage, self.global_step, self.epoch, self.batch_index, exact=exact)
        t0 = time.perf_counter()
        self._in_stage = True
        try:
            getattr(self, _STAGE_METHODS[stage])(rec, exact)
        except Exception as exc:  # user code failed: record, explain, stay at this stage
            self._stage_failed(rec, exc)
        except BaseException:  # Ctrl-C: not a bug to report; leave the stage ready to run again
            self._on_stage_failure(stage)
            raise
        finally:
            self._in_stage = False
            rec.duration_s = time.perf_counter() - t0
        return self._end_stage(rec)

    def _plan_step(self, exact: bool) -> None:
        """What the step starting now measures (``_measured``: its statistics) and diagnoses
        (``_diagnosed``: the stage facts and the rules). Asking twice gives the same answers."""
        step = self.global_step
        self._step_exact = exact
        self.tracker.note_trainable(step)
        self._measured = exact or self.tracker.measuring(step)
        # Diagnosed on the tracker's cadence, counted in completed steps (what the trend rules see after
        # the step); also on the steps of the code-path facts (reached parameters, every
        # OCCASIONAL_EVERY) and on the last step of a run(steps=...), so the findings it returns with
        # are those of where it stopped.
        self._diagnosed = self._measured and (
            exact
            or step + 1 == self._run_target
            or self.tracker.diagnosing(step + 1)
            or self.recorder.occasional(step)
        )

    def _end_stage(self, rec: StageRecord) -> StageRecord:
        """A stage ran (``rec.ok``) or failed: move on, run its rules, keep and announce the record; after
        STEP the step's own end (trend rules, the STEP event, an automatic checkpoint)."""
        stage = rec.stage
        if rec.ok:
            self.stage = stage.next()
            # The stage rules read statistics an unmeasured step lacks; a NaN/Inf loss is diagnosed
            # on any step (what caused it: the LR of the steps before, a bad init, ...).
            if self._diagnosed or (stage is Stage.LOSS and rec.data.get("finite") is False):
                rec.findings.extend(self._diagnose("on_stage", rec))
        self.records[stage] = rec
        self.last_record = rec
        if rec.findings:
            self._publish(rec.findings)
        self.events.emit(Event.STAGE, rec)
        if not rec.ok:
            self.events.emit(Event.ERROR, rec)
        if rec.ok and stage is Stage.STEP:
            self._after_step(rec)
            every = self.auto_checkpoint_every
            if every and self.global_step % every == 0:
                self._auto_checkpoint(f"step {self.global_step}")
        if self._pending:  # controls called during the stage take effect at its end
            self._drain_pending()
        return rec

    def _stage_fetch(self, rec: StageRecord, exact: bool) -> None:
        # The batch was fetched by _maybe_end_epoch's peek (in _do_stage), which also ends epochs.
        inputs, targets = self.unpack(self._raw_batch)
        self._inputs, self._targets = inputs, targets
        if self._tapped_splits:
            self._show_batch("train", inputs, targets)
        if not self._diagnosed:  # described when the loss is NaN/Inf (the likeliest origin)
            self.recorder.fetch_unmeasured(rec)
            return
        # Statistics of the batch on the detail schedule; a NaN/Inf input on other
        # steps still shows up in the loss, which is checked every step.
        detail = exact or self.tracker.details_due(self.global_step)
        self.recorder.fetch(rec, inputs, targets, exact=exact, stats=detail)

    def _stage_zero_grad(self, rec: StageRecord, exact: bool) -> None:
        if not self._diagnosed:
            self.optimizer.zero_grad()
            return
        had = self.recorder.grads_present()
        self.optimizer.zero_grad()
        self.recorder.zero_grad(rec, had)

    def _stage_to_device(self, rec: StageRecord, exact: bool) -> None:
        # Where tensors were and went: on the detail schedule (a batch's devices rarely change
        # between steps, and a device mismatch raises in FORWARD, which the explainer names).
        detail = self._diagnosed and (exact or self.tracker.details_due(self.global_step))
        before = self.recorder.devices_of(self._inputs, self._targets) if detail else None
        self._inputs = to_device(self._inputs, self.device)
        self._targets = to_device(self._targets, self.device)
        self.recorder.to_device(rec, self._inputs, self._targets, device=self.device, before=before)

    def _stage_forward(self, rec: StageRecord, exact: bool) -> None:
        for m in self._bn_eval.values():
            m.eval()
        measure = self._diagnosed and (exact or self.tracker.activations_due(self.global_step))
        if measure:
            self.tracker.probe.start()
        self._fwd_rng = self._pre_forward_rng  # taken just before this stage (_save_forward_state)
        self._output = None  # so an error explanation never shows a previous step's output
        try:
            self._output = self.forward(self.model, self._inputs)
        finally:
            acts = self.tracker.finish_activations(self.global_step) if measure else {}
        if not self._diagnosed:
            rec.data.measured = False
            return
        self.recorder.forward(
            rec,
            self._output,
            training=self.model.training,
            eval_modules=self.recorder.eval_modules(self.model),
            activations=acts,
            summarize_output=measure,
            exact=exact,
        )

    def _stage_loss(self, rec: StageRecord, exact: bool) -> None:
        loss = self._compute_loss()
        value = self.recorder.loss(
            rec,
            loss,
            self._output,
            self._targets,
            loss_fn=self.loss_fn,
            measured=self._diagnosed,
            exact=exact,
        )
        self._loss_value = value
        if not math.isfinite(value):
            self._non_finite_loss(rec, value)

    def _compute_loss(self) -> torch.Tensor:
        """The loss of the batch (kept for BACKWARD) and the step's predictions for the training accuracy."""
        loss = self.loss_fn(self._output, self._targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {shape}; use reduction='mean' or call .mean()"
            )
        self._loss = loss
        # Class targets (as evaluate() counts them): the batch's hits go into the epoch's accuracy when
        # the step completes (a retried or abandoned step counts nothing).
        out, tgt = first_tensor(self._output), self._targets
        classes = isinstance(tgt, torch.Tensor) and tgt.dim() == 1 and not tgt.is_floating_point()
        logits = classes and out is not None and out.dim() == 2 and out.shape[1] > 1
        same = logits and out.shape[0] == tgt.shape[0] and out.device == tgt.device
        self._batch_hits = None
        try:
            if same:
                self._batch_hits = (out.detach().argmax(1), tgt)
        except Exception:  # an output type without argmax: no training accuracy, never a failed LOSS stage
            self._batch_hits = None
        return loss

    def _non_finite_loss(self, rec: StageRecord, value: float) -> None:
        inputs = self._inputs
        rec.findings.extend(
            self.recorder.non_finite_loss_findings(
                rec,
                value,
                fetch=self.records.get(Stage.FETCH),
                inputs=inputs,
                targets=self._targets,
                forward=self.records.get(Stage.FORWARD),
                model=self.model,
                rerun=lambda: self.forward(self.model, inputs),
                rng=self._fwd_rng,
            )
        )

    def _stage_backward(self, rec: StageRecord, exact: bool) -> None:
        if self._backward_failed:
            # The failed attempt may have freed the graph: rebuild it from the same batch, RNG state and
            # batch-norm statistics as the first forward (so they are not updated twice).
            self.optimizer.zero_grad()  # drop what the failed attempt accumulated
            self._restore_forward_state()
            self._output = self.forward(self.model, self._inputs)
            self._loss = self.loss_fn(self._output, self._targets)
            self._backward_failed = False
        if self._loss is None:
            raise RuntimeError("no loss to backpropagate; run the LOSS stage first")
        if not self._loss.requires_grad:
            raise RuntimeError(
                "the loss does not require grad: it is detached from every parameter "
                "(a .detach(), .item(), torch.no_grad() or a frozen model cut the graph)"
            )
        self._loss.backward()
        self._loss = None  # free the graph
        self._output = None
        if not self._measured:
            self.recorder.backward_unmeasured(rec)
            return
        self.recorder.backward(
            rec, exact=True if exact else None, loss=self._loss_value, when="; the step was held back"
        )

    def _stage_step(self, rec: StageRecord, exact: bool) -> None:
        """``optimizer.step()``, the per-step scheduler, then the step's history row.

        Interrupt-safe (see the class notes): an exception inside
        ``optimizer.step()`` restores the snapshot when there is one; after
        ``optimizer.step()`` has returned, ``_step_applied`` marks the weights
        as moved, so a retry completes the step without stepping again.
        """
        if self._step_applied is None:
            snapshot = exact or self._snapshot_step()
            measured = self._measured or snapshot
            stats = self.tracker.stats
            if measured:
                stats.before_step(exact=snapshot)
            saved_opt = snapshot_optimizer(self.optimizer) if snapshot else None
            lrs_used = effective_lrs(self.optimizer)  # before a per-step scheduler moves them
            try:
                self._optimizer_step()
            except BaseException:  # also Ctrl-C: a half-applied step never stays
                if stats.restore() and saved_opt is not None:
                    restore_optimizer(self.optimizer, saved_opt)
                    rec.data["rolled_back"] = True
                else:
                    rec.data["rolled_back"] = False
                raise
            self._step_applied = (snapshot, measured, lrs_used)
        self._complete_step(rec)

    def _complete_step(self, rec: StageRecord) -> None:
        """After ``optimizer.step()`` returned (``_step_applied`` set): the per-step scheduler, the history
        row, the epoch's loss and accuracy counts, the STEP facts."""
        snapshot, measured, lrs_used = self._step_applied
        if self.scheduler is not None and self.scheduler_interval == "step":
            # The weights have moved: a broken scheduler must not make a retry step them twice. A failed
            # or interrupted scheduler.step() is undone, so the retry steps it exactly once.
            before = _SchedulerState(self.scheduler, self.optimizer)
            try:
                self.scheduler.step()
            except Exception as exc:
                before.restore()
                rec.data["scheduler_error"] = f"{type(exc).__name__}: {exc}"
                rec.findings.append(self._scheduler_finding(exc))
            except BaseException:
                before.restore()
                raise
        numbers = self.tracker.record_step(
            step=self.global_step + 1,
            epoch=self.epoch,
            loss=self._loss_value,
            exact=self._step_exact,
            lrs=lrs_used,
            measured=measured,
        )
        self._step_applied = None
        self.global_step += 1
        self._epoch_loss_sum += self._loss_value
        self._epoch_loss_n += 1
        if self._batch_hits is not None:
            self._unfolded_hits.append(self._batch_hits)
            self._epoch_labelled += self._batch_hits[1].numel()
            self._batch_hits = None
            if len(self._unfolded_hits) >= HIT_BATCHES:
                self._fold_hits()
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = None
        # The STEP facts (which parameters moved, frozen ones that did) on diagnosed steps; the
        # statistics of every measured step are in its history row.
        self.recorder.step(
            rec, numbers, measured=measured and (self._diagnosed or snapshot), update_exact=snapshot
        )

    def _snapshot_step(self) -> bool:
        """Snapshot the weights and the optimizer around ``optimizer.step()`` even when unmeasured? For a
        custom optimizer (``safe_step``), and while user code runs inside the step (step hooks)."""
        # (any() over the hook dicts themselves: asked before every step, and a call per dict adds up.)
        return self.safe_step or (self._safe_step_auto and any(self._step_hook_dicts))

    def _optimizer_step(self) -> None:
        if self._needs_closure:
            # LBFGS and the like evaluate the loss themselves: the same batch, as ZERO_GRAD left the grads.
            closure = loss_closure(
                self.model,
                self.loss_fn,
                self.optimizer,
                self._inputs,
                self._targets,
                self.forward,
                set_to_none=None,
            )
            self.optimizer.step(closure)
        else:
            self.optimizer.step()

    def _scheduler_finding(self, exc: Exception, stage: Stage | None = Stage.STEP) -> Finding:
        """The finding for a scheduler that raised: after the optimizer stepped (STEP, the step itself
        counts) or at an epoch end (``stage=None``)."""
        sched = self.scheduler
        when = "after the optimizer step" if stage is Stage.STEP else "at the end of the epoch"
        name = type(sched).__name__
        total = getattr(sched, "total_steps", None)
        if isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) or (
            total is not None and "total" in str(exc).lower()
        ):
            return make_finding(
                "stage-error",
                f"{name} has run out of steps: it was built for total_steps={total} and was stepped "
                f"once more {when} of step {self.global_step + 1} ({type(exc).__name__}: {exc}); the "
                "learning rate no longer follows the schedule",
                step=self.global_step,
                stage=stage,
                params=(name,),
                evidence={"total_steps": total, "step": self.global_step + 1, "error": str(exc)},
                cause=f"{name} is stepped once per optimizer step and refuses to go past total_steps; "
                "the run is longer than the schedule it was built for.",
                fix=f"Build {name} with total_steps at least the number of steps you train "
                "(epochs * steps_per_epoch, e.g. total_steps=epochs * len(train_loader)) and set "
                "runner.scheduler to it, or set runner.scheduler = None to go on at the current LR.",
            )
        found = self._explain(exc, stage)
        found.message = f"the scheduler ({name}) raised {when}: {found.message}"
        return found

    def _stored(self, findings: list[Finding]) -> Finding | None:
        """The log's entry (merged, current) for the last error among ``findings``."""
        errors = [f for f in findings if f.severity == "error"]
        return self._log.get(errors[-1].key) if errors else None

    def _after_step(self, rec: StageRecord) -> None:
        duration = time.perf_counter() - self._step_t0
        schedule = self.tracker.stats.schedule
        if not self._step_exact and schedule.budget is not None:  # (the step time sizes a grad budget only)
            schedule.record_step(duration)
        if self._diagnosed:  # the trend rules read the statistics of measured steps (and run on a cadence)
            self._publish(self._diagnose("on_step"))
        if self.events.has_subscribers(Event.STEP):
            self.recorder.announce_step(
                batch=self.batch_index,
                loss=self._loss_value,
                lrs=rec.data.lr,
                exact=self._step_exact,
                duration_s=duration,
            )

    def _stage_failed(self, rec: StageRecord, exc: Exception) -> None:
        """User code raised in ``rec``'s stage: record and explain it, undo what the stage did half-way."""
        rec.ok = False
        rec.error = ErrorInfo.from_exception(exc)
        self._on_stage_failure(rec.stage)
        rec.findings.append(self._explain(exc, rec.stage))

    def _on_stage_failure(self, stage: Stage) -> None:
        """Undo what a stage that raised did half-way, so that running it again is a first attempt."""
        if stage is Stage.FORWARD:
            self.tracker.probe.stop()
            self._output = None
            self._restore_forward_state()
        if stage is Stage.BACKWARD:
            # The graph may be half freed and the gradients half accumulated: drop them (as ZERO_GRAD
            # left them) and rebuild the graph on the next attempt.
            self._backward_failed = True
            self._loss = None
            self.optimizer.zero_grad()

    def _save_forward_state(self) -> None:
        """The torch RNG and batch-norm statistics before FORWARD (dropout masks, running means)."""
        self._pre_forward_rng = torch.default_generator.get_state()  # (torch.get_rng_state, a frame less)
        if not self._stat_buffers:
            return
        saved = self._stat_saved
        if saved is None or any(a.shape != b.shape for a, b in zip(saved, self._stat_buffers)):
            saved = self._stat_saved = [b.detach().clone() for b in self._stat_buffers]
        else:
            with torch.no_grad():
                torch._foreach_copy_(saved, [b.detach() for b in self._stat_buffers])

    def _restore_forward_state(self) -> None:
        if self._pre_forward_rng is not None:
            torch.set_rng_state(self._pre_forward_rng)
        if self._stat_saved is not None:
            with torch.no_grad():
                torch._foreach_copy_([b.detach() for b in self._stat_buffers], self._stat_saved)

    # ------------------------------------------------------------------ epochs
    def _start_epoch_iter(self) -> None:
        if self._one_shot and self.epoch > 0:
            raise ValueError(
                "train_data is a one-shot iterator (a generator) and is exhausted; pass a re-iterable "
                "object such as a list or a DataLoader to train for more than one epoch"
            )
        # What the iterator's order depends on: the global RNGs and the loader's (sampler's) own generators.
        self._epoch_rng = capture_rng()
        self._epoch_data_rng = capture_generators(data_generators(self.train_data))
        self._iter = iter(self.train_data)
        self._iter_broken = self._source_failed = False

    def _reopen_epoch_iter(self) -> None:
        """Make the epoch's iterator again after it raised inside ``next()`` (its position is unknown).

        Made from the RNG states it was first made with, then advanced past the
        batches already trained on, so the next batch is the one whose fetch
        failed, with the same order and augmentation. The torch RNG is then put
        back as it was before that fetch; numpy's and Python's are where the
        pipeline's own draws left them (replayed with the skipped batches).
        A one-shot iterator cannot be made again: it is kept, and asked again.
        """
        if self._one_shot:
            self._iter_broken = False
            self._source_failed = True  # whatever it yields next, the failed batch is gone
            return
        restore_rng(self._epoch_rng)
        restore_generators(self._epoch_data_rng)
        it = iter(self.train_data)
        for _ in range(self.batch_index):  # (if this raises, the next attempt starts over from here)
            next(it)
        self._iter, self._iter_broken = it, False
        if self._fetch_rng is not None:
            torch.set_rng_state(self._fetch_rng)

    def _maybe_end_epoch(self) -> EpochRecord | StageRecord | None:
        """Peek for the next batch; at the end of the data, finish the epoch."""
        if self._epoch_ending:  # an interrupted epoch end: run it again
            return self._end_epoch()
        try:
            if self._iter is None:
                self._start_epoch_iter()
            elif self._iter_broken:
                self._reopen_epoch_iter()
            try:
                self._raw_batch = next(self._iter)
            except StopIteration:
                raise
            except BaseException:
                self._iter_broken = True  # how far it got is unknown: make it again before the next try
                raise
        except StopIteration:
            if self._source_failed:
                return self._end_epoch()
            if self.batch_index == 0:
                return self._fail_fetch(
                    ValueError(
                        "train_data produced no batches this epoch; check the dataset is not empty "
                        "(and that drop_last=True with a batch size above the dataset size is not the cause)"
                    )
                )
            return self._end_epoch()
        except Exception as exc:  # the data pipeline raised
            return self._fail_fetch(exc)
        self._have_batch = True
        self.batch_index += 1
        return None

    def _fail_fetch(self, exc: Exception) -> Any:
        rec = StageRecord(
            stage=Stage.FETCH,
            step=self.global_step,
            epoch=self.epoch,
            batch=self.batch_index,
            ok=False,
            error=ErrorInfo.from_exception(exc),
        )
        rec.findings.append(self._explain(exc, Stage.FETCH))
        self.records[Stage.FETCH] = rec
        self.last_record = rec
        self._publish(rec.findings)
        self.events.emit(Event.STAGE, rec)
        self.events.emit(Event.ERROR, rec)
        return rec

    def _end_epoch(self) -> EpochRecord:
        """Validation and the per-epoch scheduler (and, when a one-shot source died mid-epoch, say so)."""
        train_loss = self._epoch_loss_sum / self._epoch_loss_n if self._epoch_loss_n else math.nan
        record = EpochRecord(
            epoch=self.epoch, step=self.global_step, train_loss=train_loss, batches=self.batch_index
        )
        self._fold_hits()
        if self._epoch_labelled and self._epoch_hits is not None:  # the epoch's one host sync for it
            record.train_metrics["accuracy"] = float(self._epoch_hits) / self._epoch_labelled
        # An interrupt (Ctrl-C in validation or in the scheduler) puts back what they changed; the
        # next FETCH runs the epoch end again.
        self._epoch_ending = True
        rng = capture_rng()
        val_rng = capture_generators(data_generators(self.val_data))
        sched = (
            _SchedulerState(self.scheduler, self.optimizer)
            if self.scheduler is not None and self.scheduler_interval == "epoch"
            else None
        )
        try:
            if self._source_failed:
                self._cut_short(record)
            if self.val_data is not None:
                metrics = self.evaluate(self._shown_batches("val", self.val_data))
                record.val_loss = metrics.pop("loss")
                record.val_metrics = metrics
            if sched is not None:
                try:
                    if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.scheduler.step(record.val_loss if record.val_loss is not None else train_loss)
                    else:
                        self.scheduler.step()
                except Exception as exc:
                    sched.restore()
                    record.ok = False
                    record.error = ErrorInfo.from_exception(exc)
                    self._publish([self._scheduler_finding(exc, None)])
        except Exception as exc:
            record.ok = False
            record.error = ErrorInfo.from_exception(exc)
            self._publish([self._explain(exc, None)])
        except BaseException:
            restore_rng(rng)
            restore_generators(val_rng)
            if sched is not None:
                sched.restore()
            raise
        self._epoch_ending = False
        self._source_failed = False
        record.lr = effective_lrs(self.optimizer)
        self.epoch += 1
        self.batch_index = 0
        self._iter = None
        self._epoch_loss_sum, self._epoch_loss_n = 0.0, 0
        self._epoch_hits, self._epoch_labelled = None, 0
        self._unfolded_hits = []
        self.history.add_epoch(record)
        self.last_record = record
        self._publish(self._diagnose("on_epoch", record))
        if self._best_validation(record):
            # Before the EPOCH listeners run: a control they change is then made after this state.
            self._auto_checkpoint(f"best validation (epoch {record.epoch + 1})", best=True)
        self.events.emit(Event.EPOCH, record)
        return record

    def _best_validation(self, record: EpochRecord) -> bool:
        """Is ``record`` (the newest epoch) the best so far by validation loss, the lowest of the
        epochs kept (a rewind drops the abandoned ones), first on a tie, as the fit verdict counts?"""

        def val_loss(e: EpochRecord) -> float:  # NaN: not comparable (no validation, or not finite)
            usable = e.val_loss is not None and math.isfinite(float(e.train_loss))
            return float(e.val_loss) if usable and e.val_loss is not None else math.nan

        now = val_loss(record)
        if not math.isfinite(now):
            return False
        earlier = [val_loss(e) for e in self.history.epochs if e is not record]
        return all(now < v for v in earlier if not math.isnan(v))

    def _cut_short(self, record: EpochRecord) -> None:
        """A one-shot source ended right after it raised: the epoch lost its remaining batches."""
        message = (
            "train_data is a one-shot iterator (a generator) that raised during batch "
            f"{self.batch_index + 1} of epoch {self.epoch} and then ended: the epoch stopped after "
            f"{self.batch_index} batches "
            "and the rest of its data is lost (a generator cannot be restarted)"
        )
        record.ok = False
        record.error = ErrorInfo(type="DataSourceEnded", message=message, traceback="")
        self._publish(
            [
                make_finding(
                    "stage-error",
                    message,
                    step=self.global_step,
                    stage=Stage.FETCH,
                    params=("train_data",),
                    evidence={"epoch": self.epoch, "batches": self.batch_index},
                    cause="The data code raised inside a generator, which ends a generator for good; "
                    "the batches it had not yielded yet were never trained on.",
                    fix="Fix the data code, and pass a re-iterable source (a list, a DataLoader, or an "
                    "object whose __iter__ starts over) so a failed batch can be fetched again.",
                )
            ]
        )

    def _shown_batches(self, split: str, data: Iterable[Any]) -> Iterable[Any]:
        """``data``, each batch also shown to the diagnoser while it wants them."""
        if split not in self._tapped_splits:
            return data

        def batches() -> Iterator[Any]:
            for batch in data:
                if split in self._tapped_splits:
                    self._show_batch(split, *self.unpack(batch))
                yield batch

        return batches()

    def evaluate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Mean loss per example (and accuracy for class targets) over ``data`` (default: ``val_data``).

        Runs under ``model.eval()`` and ``torch.no_grad()`` and restores every
        module's mode afterwards; see :func:`tlwidgets.core.training.evaluate`.
        """
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("no validation data: pass val_data to the Runner or data to evaluate()")
        return evaluate_model(
            self.model, self.loss_fn, data, unpack=self.unpack, device=self.device, forward=self.forward
        )

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, label: str = "") -> Checkpoint:
        """Capture everything needed to come back here; returns the handle for :meth:`rewind`.

        Only at a step boundary (stage FETCH with no batch held): finish the
        step first with :meth:`step`.

        Raises
        ------
        RuntimeError
            Mid-step.
        ValueError
            When ``train_data`` is a one-shot iterator (a generator): its
            batches cannot be produced again, so a rewind would replay on
            different data. Pass a re-iterable source (a list, a ``DataLoader``).
        """
        self._check_open()
        self._check_replayable("checkpoint()")
        if self.stage is not Stage.FETCH or self._have_batch:
            raise RuntimeError(
                "checkpoint() works at a step boundary; the runner is mid-step "
                f"(next stage: {self.stage.value}). "
                "Call runner.step() to finish the batch first"
            )
        ck = Checkpoint.capture(self, label)
        self.checkpoints.append(ck)
        self._ck_mark = self._state_mark()
        change = ControlChange("checkpoint", self.global_step, {"id": ck.id, "label": ck.label})
        self.history.add_control(change)
        self.events.emit(Event.CONTROL, change)
        return ck

    def rewind(self, handle: Checkpoint | None = None, *, reason: str = "") -> Checkpoint:
        """Restore model, optimizer, scheduler, RNG states and data position from ``handle``.

        ``None`` rewinds to the newest checkpoint. Replaying the same steps then
        gives the same losses and weights bit for bit on CPU: the data sources'
        own generators (``DataLoader(generator=...)``, a sampler's) are restored
        with the global RNGs, and mid-epoch the epoch's iterator is made again
        from the states it was first made with and advanced to the checkpoint.
        Findings first raised after the checkpoint (an abandoned timeline) are
        dropped and the others are put back as they were; setup findings are
        checked again.

        The loss of the steps abandoned stays reachable in
        ``history.branches`` (labelled with ``reason``, e.g. the action that
        rewound, else the checkpoint's label); automatic checkpoints taken
        after the checkpoint's step (on the abandoned timeline) are forgotten.

        Raises
        ------
        ValueError
            No checkpoint, a checkpoint of another model, or a one-shot ``train_data``.
        """
        self._check_open()
        if self._running:
            raise RuntimeError("pause the run before rewinding")
        self._check_replayable("rewind()")
        if handle is None:
            if not self.checkpoints:
                raise ValueError("no checkpoint to rewind to; call runner.checkpoint() first")
            handle = self.checkpoints[-1]
        if not isinstance(handle, Checkpoint):
            raise TypeError(f"rewind() takes a handle from runner.checkpoint(), got {type(handle).__name__}")
        if len(handle.requires_grad) != len(self.named_params):
            raise ValueError("this checkpoint belongs to a different model")
        ck = handle
        self.history.branch_off(ck.step, reason or f"rewind to {ck.label}")
        self.auto_checkpoints.drop_after(ck.step)
        with torch.no_grad():
            self.model.load_state_dict(ck.model_state)
        for (_, p), rg in zip(self.named_params, ck.requires_grad):
            p.requires_grad_(rg)
            p.grad = None
        for m, mode in zip(self.model.modules(), ck.training):
            m.training = mode
        restore_dropout(self.model, ck.dropout)
        restore_optimizer(self.optimizer, ck.optimizer)
        restore_scheduler(self.scheduler, ck.scheduler, ck.scheduler_extra)
        self._restore_runner_state(ck.runner_state)
        self.tracker.densify(self.global_step)
        self.global_step, self.epoch, self.batch_index = ck.step, ck.epoch, ck.batch_index
        self.stage = Stage.FETCH
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = self._output = self._loss = None
        self.records = StageRecords(self._position)
        self._iter = None
        self._iter_broken = self._epoch_ending = self._source_failed = self._backward_failed = False
        self._step_applied = None
        self._epoch_rng, self._epoch_data_rng = ck.epoch_rng, ck.epoch_data_rng
        if ck.iter_started and ck.epoch_rng is not None:
            # Recreate the epoch's iterator from the RNG states it was created with
            # (same shuffle order), then skip the batches already consumed.
            restore_rng(ck.epoch_rng)
            restore_generators(ck.epoch_data_rng)
            self._iter = iter(self.train_data)
            for _ in range(ck.batch_index):
                next(self._iter)
        restore_rng(ck.rng)
        restore_generators(ck.data_rng)
        self.history.truncate_to_step(ck.step, ck.epoch)
        # The findings as they stood (those of the abandoned timeline go); timeless ones (no step) stay.
        self._log.restore(ck.findings, keep=lambda f: f.step is None)
        if self._last_error is not None and self._log.get(self._last_error.key) is not self._last_error:
            self._last_error = None
        self._after_control(ControlChange("rewind", self.global_step, {"id": ck.id, "label": ck.label}))
        self._ck_mark = self._state_mark()  # the state is the checkpoint's: no copy of it needed now
        return ck

    # ------------------------------------------------------------------ automatic checkpoints
    def _state_mark(self) -> tuple[int, int, int]:
        """Changes when the training state may have: a step, an epoch end, a control change."""
        return (self.global_step, self.epoch, self._changes)

    def _auto_checkpoint(
        self, why: str, *, once_per_step: bool = False, best: bool = False
    ) -> Checkpoint | None:
        """Take an automatic checkpoint (see the ``auto_checkpoints`` option), when one is useful.

        Not for a one-shot source (no rewind), mid-step (``checkpoint()`` works at a boundary
        only), when disabled, or when a checkpoint of this very state exists. Unlike
        :meth:`checkpoint` it records no control change (the loss plot and ``history.controls``
        show what the user did) and a failure to copy (out of memory) turns them off instead of
        breaking the step. ``once_per_step``: none either when one was taken at this step already,
        whatever changed since (controls in a row, like an LR slider dragged, share the state from
        before the first: one copy per tick would lag the slider and crowd out the older ones).
        ``best``: the best validation so far, kept through the thinning
        (:meth:`AutoCheckpoints.add`).
        """
        if (
            self.auto_checkpoints.keep == 0
            or self._one_shot
            or self._closed
            or self._in_stage
            or self.stage is not Stage.FETCH
            or self._have_batch
            or self._ck_mark == self._state_mark()
            or (once_per_step and self._ck_mark is not None and self._ck_mark[:2] == self._state_mark()[:2])
        ):
            return None
        room = _accelerator_room(self.device)
        if room is not None:
            # Copies live on the model's device: on a GPU, one that would take a large share of the
            # memory left could make the next training step run out. Estimate: the last one's size,
            # else weights plus two moments (Adam), the largest state of the usual optimizers.
            last = self.auto_checkpoints[-1].nbytes if len(self.auto_checkpoints) else 3 * self._state_bytes
            if last > AUTO_CHECKPOINT_ROOM * room:
                return None
        try:
            ck = Checkpoint.capture(self, f"auto: {why}")
        except (RuntimeError, MemoryError):  # e.g. CUDA out of memory: training matters more
            self.auto_checkpoints.keep = 0
            self.auto_checkpoints.items.clear()
            return None
        ck.auto = True
        self.auto_checkpoints.add(ck, best=best)
        self._ck_mark = self._state_mark()
        return ck

    def _control(self, apply: Callable[[], Any], result: Any) -> Any:
        def checkpointed() -> None:
            # The state before the change, labelled with its kind once the change says it.
            self._auto_pending = self._auto_checkpoint("before a control change", once_per_step=True)
            try:
                apply()
            finally:
                self._auto_pending = None

        return super()._control(checkpointed, result)

    def _after_control(self, change: ControlChange) -> None:
        self._changes += 1
        if self._auto_pending is not None:
            self._auto_pending.label = f"auto: before {change.kind}"
            self._auto_pending = None
        super()._after_control(change)

    def _check_replayable(self, what: str) -> None:
        if self._one_shot:
            raise ValueError(
                f"{what} needs data that can be replayed, and train_data is a one-shot iterator "
                f"({type(self.train_data).__name__}): after a rewind the same batches could not be produced "
                "again, and training would go on with different data. Pass a re-iterable source instead "
                "(a list of batches, a DataLoader, or an object whose __iter__ starts over)"
            )

    def _fold_hits(self) -> None:
        """Count the correct predictions of the steps taken since the last fold into the epoch's."""
        pending, self._unfolded_hits = self._unfolded_hits, []
        if not pending:
            return
        try:  # one comparison for all of them (the same device, as a rule)
            hits = (torch.cat([p for p, _ in pending]) == torch.cat([t for _, t in pending])).sum()
        except RuntimeError:  # the device or the label dtype changed between steps
            hits = sum((p == t).sum() for p, t in pending)
        self._epoch_hits = hits if self._epoch_hits is None else self._epoch_hits + hits

    def _state_for_checkpoint(self) -> dict[str, Any]:
        self._fold_hits()
        return {
            "epoch_loss": (self._epoch_loss_sum, self._epoch_loss_n),
            "epoch_hits": (self._epoch_hits, self._epoch_labelled),  # a 0-d tensor never changed in place
            "bn_eval": dict(self._bn_eval),
            "freeze_bn_stats": self.freeze_bn_stats,
            "scheduler_interval": self.scheduler_interval,
        }

    def _restore_runner_state(self, state: dict[str, Any]) -> None:
        self._epoch_loss_sum, self._epoch_loss_n = state["epoch_loss"]
        self._epoch_hits, self._epoch_labelled = state.get("epoch_hits", (None, 0))
        self._batch_hits = None
        self._unfolded_hits = []
        self._bn_eval = dict(state["bn_eval"])
        self.freeze_bn_stats = state.get("freeze_bn_stats", self.freeze_bn_stats)
        self.scheduler_interval = state.get("scheduler_interval", self.scheduler_interval)

    # ------------------------------------------------------------------ findings
    @property
    def _new_errors(self) -> int:
        return self._error_seq

    def _explain(self, exc: BaseException, stage: Stage | None) -> Finding:
        context = {
            "input_shapes": {k: tuple(t.shape) for k, t in tensors_in(self._inputs, "inputs")},
            "target_shape": tuple(self._targets.shape) if isinstance(self._targets, torch.Tensor) else None,
            "output_shape": tuple(o.shape) if (o := first_tensor(self._output)) is not None else None,
            "devices": sorted({str(p.device) for p in self.tracker.params}),
            "dtypes": sorted({str(p.dtype) for p in self.tracker.params}),
        }
        try:
            return self.diagnoser.explain(exc, stage, context, self.global_step)
        except Exception:
            from tlwidgets.core.plugins import NullDiagnoser

            return NullDiagnoser().explain(exc, stage, context, self.global_step)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove every hook the runner installed (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.tracker.close()
        self.events.clear()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this runner is closed")

    def __repr__(self) -> str:
        return (
            f"Runner(step={self.global_step}, epoch={self.epoch}, next stage={self.stage.value}, "
            f"findings={len(self._log)})"
        )


# ---------------------------------------------------------------------- helpers
_STAGE_METHODS: dict[Stage, str] = {s: f"_stage_{s.value}" for s in Stage}
#: Steps whose predictions are compared with their labels together (training accuracy).
HIT_BATCHES = 32


def _validate(model, loss_fn, optimizer, train_data, val_data, scheduler, scheduler_interval) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, targets), got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model_ids = {id(p) for p in model.parameters()}
    if not model_ids:
        raise ValueError("the model has no parameters to train")
    if not model_ids & optimizer_param_ids(optimizer):
        raise ValueError(
            "the optimizer holds none of the model's parameters; build it from this model, "
            "e.g. torch.optim.SGD(model.parameters(), lr=0.01) (after replacing any layer)"
        )
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is None and name == "val_data":
            continue
        # Checked without calling iter(): a DataLoader iterator would consume the global RNG
        # (and the shuffle order would no longer match a plain loop's).
        if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")) or isinstance(data, (str, bytes)):
            raise TypeError(
                f"{name} must be an iterable of batches (e.g. a DataLoader), got {type(data).__name__}"
            )
        try:
            size = len(data)
        except TypeError:
            size = None
        if size == 0:
            raise ValueError(f"{name} is empty (len 0); give it at least one batch")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if scheduler is not None and not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    if scheduler_interval == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "ReduceLROnPlateau needs a metric and is stepped per epoch: use scheduler_interval='epoch' "
            "(the runner passes the validation loss, or the training loss without val_data)"
        )
    if scheduler is not None and getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ValueError("the scheduler was built for a different optimizer than the one given")


#: An automatic checkpoint on an accelerator takes at most this share of its free memory.
AUTO_CHECKPOINT_ROOM = 0.1


def _accelerator_room(device: torch.device | None) -> int | None:
    """Bytes a new tensor can still take on ``device`` (free plus cached); ``None`` off CUDA or unknown."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    except (RuntimeError, AssertionError, ValueError):
        return None


def _custom_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``step()`` is user code (not a torch.optim class's own)."""
    step = getattr(type(optimizer), "step", None)
    return not getattr(step, "__module__", "").startswith("torch.optim")


def _step_hook_dicts(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """The dicts that hold the step pre/post hooks (the optimizer's own and torch's global ones).

    torch registers a hook by adding it to one of these dicts, and never replaces them (only
    unpickling an optimizer makes its own anew): kept once, they say at any time whether user code
    runs inside ``optimizer.step()``.
    """
    found = (
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
        getattr(optim_module, "_global_optimizer_pre_hooks", None),
        getattr(optim_module, "_global_optimizer_post_hooks", None),
    )
    return tuple(d for d in found if d is not None)


class _SchedulerState:
    """A scheduler's state and the groups' hyperparameters, to undo a ``scheduler.step()`` that raised.

    ``state_dict()`` is shallow, and lists are copied one level: the schedulers
    replace (not mutate) their values when they step. Group values are copied
    because the scheduler writes the LR (and OneCycleLR the momentum) into them,
    group by group, and a tensor LR in place.
    """

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        self.scheduler = scheduler
        self.optimizer = optimizer
        # (A scheduler of one's own need only have step(): then the groups are all that is kept.)
        can = hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")
        state = scheduler.state_dict() if can else None
        self.state = {k: list(v) if isinstance(v, list) else v for k, v in state.items()} if can else None
        self.groups = snapshot_optimizer(optimizer, state=False)

    def restore(self) -> None:
        if self.state is not None:
            state = {k: list(v) if isinstance(v, list) else v for k, v in self.state.items()}
            self.scheduler.load_state_dict(state)
        restore_optimizer(self.optimizer, self.groups)


class _SigintGate:
    """Ctrl-C (SIGINT) for one runner: a signal that arrives in a held section is kept until its end.

    :meth:`open` installs the handler (once per :meth:`Runner.run`, so a step
    pays for no system call), :meth:`close` puts the previous one back. Outside
    a held section the handler passes the signal on to the previous handler
    (the default raises ``KeyboardInterrupt`` right there). Only in the main
    thread, where Python runs signal handlers, and only over a Python handler.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.holding = False
        self.held: tuple[int, Any] | None = None

    def open(self) -> bool:
        """Install the handler; False when it cannot be (not the main thread) or is already installed."""
        if self.previous is not None or threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            return False
        self.previous = previous
        signal.signal(signal.SIGINT, self._handle)
        return True

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holding:
            if self.held is None:
                self.held = (signum, frame)
        elif self.previous is not None:
            self.previous(signum, frame)

    def hold(self) -> bool:
        """Start a held section; returns whether this call installed the handler (for :meth:`release`)."""
        opened = self.open()  # a stage stepped alone: installed for this stage only
        self.holding = True
        return opened

    def release(self, opened: bool) -> Callable[[], None] | None:
        """End the held section; a call that delivers the Ctrl-C received meanwhile, if one was."""
        self.holding = False
        held, self.held = self.held, None
        previous = self.previous
        if opened:
            self.close()
        if held is None or previous is None:
            return None
        return lambda: previous(*held)


def _as_count(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (int, numpy or 0-d torch integer); else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.is_floating_point() or value.dtype is torch.bool:
            return None
        return int(value)
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    return None


def _count_arg(name: str, value: Any) -> int | None:
    """A ``run()`` count: ``None`` or a non-negative integer (numpy/torch integer scalars too, not bool)."""
    if value is None:
        return None
    n = _as_count(value)
    if n is None or n < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return n


def _count_option(name: str, value: Any, low: int) -> int:
    n = _as_count(value)
    if n is None or n < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return n


def _budget_option(value: Any) -> float | None:
    if value is None:
        return None
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real or not 0 < float(value) <= 1:
        raise ValueError(
            f"grad_budget must be None (exact grad norms every measured step) or a fraction of step time "
            f"in (0, 1], e.g. 0.01; got {value!r}"
        )
    return float(value)


def _device_option(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"device={device!r} is not a device torch knows; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps' "
            f"({exc})"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
