"""The step-able training runner: one stage or one batch at a time."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.activations import non_finite_origin
from tlwidgets.core.batches import call_model, default_unpack, describe, tensor_stats, tensors_in, to_device
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.checkpoint import (
    Checkpoint,
    capture_rng,
    restore_optimizer,
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
from tlwidgets.core.graph import locate_non_finite, reached_params
from tlwidgets.core.plugins import Diagnoser
from tlwidgets.core.records import ControlChange, EpochRecord, ErrorInfo, StageRecord, StepSummary
from tlwidgets.core.session import FindingsMixin
from tlwidgets.core.stages import Stage
from tlwidgets.core.stats import to_host, total_norm, update_ratio

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


class Runner(FindingsMixin, ControlsMixin):
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
    grad_budget
        ``None`` (default): exact grad norms on every measured step, which also
        checks every gradient element for NaN/Inf before STEP. A fraction (e.g. ``0.01``)
        caps the exact pass at that share of step time; steps in between use a
        sampled estimate and check NaN/Inf on the sample only.
    safe_step
        Snapshot weights and optimizer state before every STEP so a failing
        ``optimizer.step()`` leaves the weights as they were. ``None`` (default):
        for a STEP run by :meth:`step_stage` and for optimizers that are not
        ``torch.optim``'s own (custom ``step()`` code is what fails half-way;
        the built-in optimizers validate before they write). ``True``: always.
    freeze_bn_stats
        Default of ``freeze(..., bn_eval=)``: put fully frozen batch-norm layers in eval mode.
    max_checkpoints
        How many checkpoints :attr:`checkpoints` keeps (oldest dropped).
    diagnoser
        The rule set; default: the one registered by :mod:`tlwidgets.diagnostics`.

    Raises
    ------
    TypeError
        When ``model`` is not an ``nn.Module``, ``optimizer`` not an optimizer,
        ``loss_fn`` not callable or ``train_data`` not iterable.
    ValueError
        When the optimizer holds none of the model's parameters, the data is
        empty, or an option is out of range.
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
        grad_budget: float | None = None,
        safe_step: bool | None = None,
        freeze_bn_stats: bool = False,
        max_checkpoints: int = 20,
        diagnoser: Diagnoser | None = None,
    ) -> None:
        _validate(model, loss_fn, optimizer, train_data, val_data, scheduler, scheduler_interval)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.train_data = train_data
        self.val_data = val_data
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        first = next(iter(model.parameters()), None)
        self.device = (
            torch.device(device) if device is not None else (first.device if first is not None else None)
        )
        self.unpack = unpack or default_unpack
        self.forward = forward or call_model
        self.safe_step = _custom_optimizer(optimizer) if safe_step is None else bool(safe_step)
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
        )
        self.last_record: StageRecord | EpochRecord | None = None
        self.checkpoints: collections.deque[Checkpoint] = collections.deque(maxlen=max_checkpoints)

        self.stage = Stage.FETCH
        self.global_step = 0
        self.epoch = 0
        self.batch_index = 0
        self._backward_failed = False
        self._iter: Any = None
        self._epoch_rng = None
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
        self._step_t0 = 0.0
        self._epoch_loss_sum = 0.0
        self._epoch_loss_n = 0
        self._bn_eval: dict[str, nn.Module] = {}
        self._mode_modules = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) or n == ""
        ]
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

        Stops early at a failed stage, at a new error-severity finding, before
        STEP when gradients are non-finite, and on :meth:`pause`.
        """
        self._check_open()
        gen = self._run_iter(steps, epochs)
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
        self.optimizer.zero_grad()
        self.stage = Stage.FETCH
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = self._output = self._loss = None
        self._backward_failed = False
        self.records = {}
        change = ControlChange("skip_batch", self.global_step, {"batch": self.batch_index})
        self.history.add_control(change)
        self.events.emit(Event.CONTROL, change)

    def _holding_non_finite(self) -> bool:
        """At STEP with NaN/Inf gradients from BACKWARD (a run stopped there)."""
        back = self.records.get(Stage.BACKWARD)
        return self.stage is Stage.STEP and back is not None and bool(back.data.get("non_finite_grad"))

    def pause(self) -> None:
        """Ask a running :meth:`run` to stop at the next stage boundary."""
        self._pause.set()

    def _run_iter(self, steps: int | None, epochs: int | None) -> Generator[Any, None, RunResult]:
        if self._running:
            raise RuntimeError("a run is already in progress on this runner (one run at a time)")
        for name, value in (("steps", steps), ("epochs", epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if steps is None and epochs is None:
            epochs = 1
        target = self.global_step + steps if steps is not None else None
        start_step, epochs_done = self.global_step, 0
        self._pause.clear()
        self._running = True
        result = None
        try:
            while result is None:
                if self._pause.is_set():
                    result = RunResult(self.global_step - start_step, epochs_done, "pause")
                    break
                if target is not None and self.global_step >= target and self.stage is Stage.FETCH:
                    result = RunResult(self.global_step - start_step, epochs_done, "steps")
                    break
                if self._holding_non_finite():  # never apply NaN/Inf gradients unasked
                    result = RunResult(
                        self.global_step - start_step,
                        epochs_done,
                        "non-finite-grad",
                        self._latest_error_finding(),
                        self.records[Stage.BACKWARD],
                    )
                    break
                errors_before = self._new_errors
                rec = self._do_stage(exact=False)
                yield rec
                done = self.global_step - start_step
                if isinstance(rec, EpochRecord):
                    if not rec.ok:
                        result = RunResult(done, epochs_done, "error", record=rec)
                    epochs_done += 1
                    if epochs is not None and epochs_done >= epochs:
                        result = RunResult(done, epochs_done, "epochs", record=rec)
                    continue
                if not rec.ok:
                    result = RunResult(done, epochs_done, "error", self._latest_error_finding(), rec)
                elif self._new_errors > errors_before:
                    result = RunResult(done, epochs_done, "finding", self._latest_error_finding(), rec)
                elif rec.stage is Stage.BACKWARD and rec.data.get("non_finite_grad"):
                    result = RunResult(
                        done, epochs_done, "non-finite-grad", self._latest_error_finding(), rec
                    )
        finally:
            self._running = False
        return result

    # ------------------------------------------------------------------ stages
    def _do_stage(self, exact: bool) -> StageRecord | EpochRecord:
        stage = self.stage
        if stage is Stage.FETCH:
            if not self._have_batch:
                end = self._maybe_end_epoch()
                if end is not None:
                    return end
            self.records = {}
            self._step_exact = exact
            self.tracker.note_trainable(self.global_step)
            self._measured = exact or self.tracker.measuring(self.global_step)
            self._step_t0 = time.perf_counter()
        elif exact:
            self._step_exact = self._measured = True
        rec = StageRecord(stage, self.global_step, self.epoch, self.batch_index, exact=exact)
        t0 = time.perf_counter()
        self._in_stage = True
        try:
            getattr(self, _STAGE_METHODS[stage])(rec, exact)
        except Exception as exc:  # user code failed: record, explain, stay at this stage
            rec.ok = False
            rec.error = ErrorInfo.from_exception(exc)
            self._on_stage_failure(stage)
            rec.findings.append(self._explain(exc, stage))
        finally:
            self._in_stage = False
            rec.duration_s = time.perf_counter() - t0
        if rec.ok:
            self.stage = stage.next()
            # The stage rules read statistics an unmeasured step lacks; a NaN/Inf loss is diagnosed
            # on any step (what caused it: the LR of the steps before, a bad init, ...).
            if self._measured or (stage is Stage.LOSS and rec.data.get("finite") is False):
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
        if self._pending:  # controls called during the stage take effect at its end
            self._drain_pending()
        return rec

    def _stage_fetch(self, rec: StageRecord, exact: bool) -> None:
        if not self._have_batch:
            if self._iter is None:
                self._start_epoch_iter()
            self._raw_batch = next(self._iter)  # StopIteration handled by _maybe_end_epoch's peek
            self._have_batch = True
            self.batch_index += 1
            rec.batch = self.batch_index
        inputs, targets = self.unpack(self._raw_batch)
        self._inputs, self._targets = inputs, targets
        if not self._measured:  # described when the loss is NaN/Inf (the likeliest origin)
            rec.data.update(measured=False, non_finite=None)
            return
        # Statistics of the batch on the detail schedule; a NaN/Inf input on other
        # steps still shows up in the loss, which is checked every step.
        detail = exact or self.tracker.details_due(self.global_step)
        rec.data.update(describe(inputs, targets, exact=exact, stats=detail))
        if rec.data["non_finite"]:
            rec.findings.append(self._non_finite_input_finding(rec, Stage.FETCH))

    def _non_finite_input_finding(self, fetch: StageRecord, stage: Stage) -> Finding:
        bad = [k for k, v in fetch.data["tensors"].items() if v.get("non_finite")]
        return make_finding(
            "non-finite-input",
            f"the batch holds {fetch.data['non_finite']} NaN/Inf values in {', '.join(bad)}",
            step=self.global_step,
            stage=stage,
            params=tuple(bad),
            evidence={"non_finite": fetch.data["non_finite"], "tensors": bad},
        )

    def _stage_zero_grad(self, rec: StageRecord, exact: bool) -> None:
        if not self._measured:
            self.optimizer.zero_grad()
            return
        had = sum(p.grad is not None for p in self.tracker.params)
        self.optimizer.zero_grad()
        kept = [(n, p.grad) for n, p in self.named_params if p.grad is not None]
        left = []
        if kept:  # zero_grad(set_to_none=False) or params outside the optimizer: one transfer
            norms = to_host(torch._foreach_norm([g for _, g in kept]))
            left = [n for (n, _), v in zip(kept, norms) if v != 0]
        rec.data.update(
            grads_before=had,
            grads_after=sum(p.grad is not None for p in self.tracker.params),
            not_cleared=left,
        )

    def _stage_to_device(self, rec: StageRecord, exact: bool) -> None:
        # Where tensors were and went: on the detail schedule (a batch's devices rarely change
        # between steps, and a device mismatch raises in FORWARD, which the explainer names).
        detail = self._measured and (exact or self.tracker.details_due(self.global_step))
        if detail:
            before = sorted({str(t.device) for _, t in tensors_in((self._inputs, self._targets))})
        self._inputs = to_device(self._inputs, self.device)
        self._targets = to_device(self._targets, self.device)
        rec.data["device"] = str(self.device) if self.device is not None else None
        if detail:
            leaves = tensors_in(self._inputs, "inputs") + tensors_in(self._targets, "targets")
            rec.data.update(
                devices_before=before,
                devices=sorted({str(t.device) for _, t in leaves}),
                bytes=int(sum(t.numel() * t.element_size() for _, t in leaves)),
                param_devices=sorted({str(p.device) for p in self.tracker.params}),
            )

    def _stage_forward(self, rec: StageRecord, exact: bool) -> None:
        for m in self._bn_eval.values():
            m.eval()
        measure = self._measured and (exact or self.tracker.activations_due(self.global_step))
        if measure:
            self.tracker.probe.start()
        self._fwd_rng = torch.get_rng_state()
        self._output = None  # so an error explanation never shows a previous step's output
        try:
            self._output = self.forward(self.model, self._inputs)
        finally:
            acts = self.tracker.finish_activations(self.global_step) if measure else {}
        if not self._measured:
            rec.data["measured"] = False
            return
        out = _first_tensor(self._output)
        rec.data.update(
            training=self.model.training,
            grad_enabled=torch.is_grad_enabled(),
            eval_modules=[n or "<model>" for n, m in self._mode_modules if not m.training],
            activations=acts,
        )
        if out is not None:
            rec.data.update(_output_shape(out))
            if measure:
                rec.data.update(_tensor_summary(out, "output", exact))
        if acts:
            origin = non_finite_origin(acts)
            if origin is not None:
                rec.data["non_finite_origin"] = origin

    def _stage_loss(self, rec: StageRecord, exact: bool) -> None:
        loss = self.loss_fn(self._output, self._targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {shape}; use reduction='mean' or call .mean()"
            )
        self._loss = loss
        value = float(loss.detach())
        self._loss_value = value
        if not self._measured:
            rec.data.update(loss=value, finite=math.isfinite(value), measured=False)
            if not math.isfinite(value):
                self._non_finite_loss(rec, value)
            return
        out = _first_tensor(self._output)
        rec.data.update(
            loss=value,
            finite=math.isfinite(value),
            requires_grad=loss.requires_grad,
            loss_fn=type(self.loss_fn).__name__
            if isinstance(self.loss_fn, nn.Module)
            else getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__),
            reduction=getattr(self.loss_fn, "reduction", None),
            output_shape=tuple(out.shape) if out is not None else None,
            target_shape=tuple(self._targets.shape) if isinstance(self._targets, torch.Tensor) else None,
            target_dtype=str(self._targets.dtype).replace("torch.", "")
            if isinstance(self._targets, torch.Tensor)
            else None,
            batch_size=rec_batch_size(out),
        )
        # Facts that depend on the code path, not on the batch: measured early and now and then.
        occasional = exact or self.global_step < 3 or self.global_step % 50 == 0
        if out is not None and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point():
            rec.data["expected_initial_loss"] = math.log(out.shape[1])
            if occasional:
                rec.data.update(_probability_facts(out))
        if occasional:
            rec.data["reached"] = reached_params(loss, self.named_params)
            trainable = [n for n, p in self.named_params if p.requires_grad]
            rec.data["unreached"] = [n for n in trainable if n not in set(rec.data["reached"])]
        if not math.isfinite(value):
            self._non_finite_loss(rec, value)

    def _non_finite_loss(self, rec: StageRecord, value: float) -> None:
        fetch = self.records.get(Stage.FETCH)
        if fetch is not None and not fetch.data.get("measured", True):
            # The batch was not scanned this step: do it now, a NaN input is the likeliest origin.
            fetch.data.update(describe(self._inputs, self._targets, exact=True))
            if fetch.data["non_finite"]:
                rec.findings.append(self._non_finite_input_finding(fetch, Stage.LOSS))
        rec.findings.append(self._non_finite_loss_finding(value))

    def _stage_backward(self, rec: StageRecord, exact: bool) -> None:
        if self._backward_failed:
            # The failed attempt may have freed the graph: rebuild it from the same batch and RNG state.
            self._backward_failed = False
            self.optimizer.zero_grad()  # drop what the failed attempt accumulated
            if self._fwd_rng is not None:
                torch.set_rng_state(self._fwd_rng)
            self._output = self.forward(self.model, self._inputs)
            self._loss = self.loss_fn(self._output, self._targets)
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
            self.tracker.skip_grads()
            rec.data["measured"] = False
            return
        grad, grad_exact = self.tracker.measure_grads(True if exact else None)
        trainable = np.array([p.requires_grad for p in self.tracker.params], dtype=bool)
        has_grad = np.array([p.grad is not None for p in self.tracker.params], dtype=bool)
        bad = has_grad & ~np.isfinite(grad)
        names = self.param_names
        rec.data.update(
            grad_norm=grad,
            grad_exact=grad_exact,
            total_grad_norm=total_norm(grad[has_grad]),
            missing_grad=[n for n, t, h in zip(names, trainable, has_grad) if t and not h],
            non_finite_grad=[n for n, b in zip(names, bad) if b],
        )
        if rec.data["non_finite_grad"]:
            bad_names = tuple(rec.data["non_finite_grad"])
            rec.findings.append(
                make_finding(
                    "non-finite-grad",
                    f"{len(bad_names)} parameter(s) got NaN/Inf gradients; the step was held back",
                    step=self.global_step,
                    stage=Stage.BACKWARD,
                    params=bad_names,
                    evidence={
                        "grad_norm": {n: float(grad[names.index(n)]) for n in bad_names[:20]},
                        "loss": self._loss_value,
                    },
                )
            )

    def _stage_step(self, rec: StageRecord, exact: bool) -> None:
        snapshot = exact or self.safe_step
        measured = self._measured or snapshot
        stats = self.tracker.stats
        if measured:
            stats.before_step(exact=snapshot)
        saved_opt = _capture_opt_state(self.optimizer) if snapshot else None
        lrs_used = effective_lrs(self.optimizer)  # before a per-step scheduler moves them
        try:
            self.optimizer.step()
        except Exception:
            if stats.restore() and saved_opt is not None:
                _restore_opt_state(self.optimizer, saved_opt)
                rec.data["rolled_back"] = True
            else:
                rec.data["rolled_back"] = False
            raise
        if self.scheduler is not None and self.scheduler_interval == "step":
            # The weights have moved: a broken scheduler must not make a retry step them twice.
            try:
                self.scheduler.step()
            except Exception as exc:
                rec.data["scheduler_error"] = f"{type(exc).__name__}: {exc}"
                rec.findings.append(self._explain(exc, Stage.STEP))
        numbers = self.tracker.record_step(
            step=self.global_step + 1,
            epoch=self.epoch,
            loss=self._loss_value,
            exact=self._step_exact,
            lrs=lrs_used,
            measured=measured,
        )
        self.global_step += 1
        self._epoch_loss_sum += self._loss_value
        self._epoch_loss_n += 1
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = None
        if not measured:
            rec.data.update(lr=numbers["lr"], measured=False)
            return
        update, weight = numbers["update_norm"], numbers["weight_norm"]
        ratio = update_ratio(update, weight)
        names = self.param_names
        frozen = [not p.requires_grad for p in self.tracker.params]
        rec.data.update(
            update_norm=update,
            weight_norm=weight,
            update_ratio=ratio,
            lr=numbers["lr"],
            update_exact=snapshot,
            changed=[n for n, u in zip(names, update) if u > 0],
            frozen_changed=[n for n, u, f in zip(names, update, frozen) if f and u > 0],
        )

    def _after_step(self, rec: StageRecord) -> None:
        duration = time.perf_counter() - self._step_t0
        if not self._step_exact:
            self.tracker.stats.schedule.record_step(duration)
        if self._measured:  # the trend rules read the statistics of measured steps
            self._publish(self._diagnose("on_step"))
        self.events.emit(
            Event.STEP,
            StepSummary(
                step=self.global_step,
                epoch=self.epoch,
                batch=self.batch_index,
                loss=self._loss_value,
                lr=list(rec.data["lr"]),
                exact=self._step_exact,
                duration_s=duration,
            ),
        )

    def _on_stage_failure(self, stage: Stage) -> None:
        if stage is Stage.FORWARD:
            self.tracker.probe.stop()
        if stage in (Stage.FORWARD, Stage.LOSS):
            self._output = None if stage is Stage.FORWARD else self._output
        if stage is Stage.BACKWARD:
            self._backward_failed = True

    # ------------------------------------------------------------------ epochs
    def _start_epoch_iter(self) -> None:
        if self._one_shot and self.epoch > 0:
            raise ValueError(
                "train_data is a one-shot iterator (a generator) and is exhausted; pass a re-iterable "
                "object such as a list or a DataLoader to train for more than one epoch"
            )
        self._epoch_rng = capture_rng()
        self._iter = iter(self.train_data)

    def _maybe_end_epoch(self) -> EpochRecord | None:
        """Peek for the next batch; at the end of the data, finish the epoch."""
        try:
            if self._iter is None:
                self._start_epoch_iter()
            self._raw_batch = next(self._iter)
        except StopIteration:
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
        train_loss = self._epoch_loss_sum / self._epoch_loss_n if self._epoch_loss_n else math.nan
        record = EpochRecord(
            epoch=self.epoch, step=self.global_step, train_loss=train_loss, batches=self.batch_index
        )
        try:
            if self.val_data is not None:
                metrics = self.evaluate(self.val_data)
                record.val_loss = metrics.pop("loss")
                record.val_metrics = metrics
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(record.val_loss if record.val_loss is not None else train_loss)
                else:
                    self.scheduler.step()
        except Exception as exc:
            record.ok = False
            record.error = ErrorInfo.from_exception(exc)
            self._publish([self._explain(exc, None)])
        record.lr = effective_lrs(self.optimizer)
        self.epoch += 1
        self.batch_index = 0
        self._iter = None
        self._epoch_loss_sum, self._epoch_loss_n = 0.0, 0
        self.history.add_epoch(record)
        self.last_record = record
        self._publish(self._diagnose("on_epoch", record))
        self.events.emit(Event.EPOCH, record)
        return record

    def evaluate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Mean loss (and accuracy for class targets) over ``data`` (default: ``val_data``).

        Runs under ``model.eval()`` and ``torch.no_grad()`` and restores every
        module's mode afterwards.
        """
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("no validation data: pass val_data to the Runner or data to evaluate()")
        modes = [(m, m.training) for m in self.model.modules()]
        total, count, correct, n_cls = 0.0, 0, 0, 0
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in data:
                    inputs, targets = self.unpack(batch)
                    inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
                    out = self.forward(self.model, inputs)
                    n = rec_batch_size(_first_tensor(out)) or 1
                    total += float(self.loss_fn(out, targets)) * n
                    count += n
                    o = _first_tensor(out)
                    if (
                        o is not None
                        and isinstance(targets, torch.Tensor)
                        and o.dim() == 2
                        and targets.dim() == 1
                        and not targets.is_floating_point()
                    ):
                        correct += int((o.argmax(1) == targets).sum())
                        n_cls += targets.numel()
        finally:
            for m, mode in modes:
                m.train(mode)
        out = {"loss": total / count if count else math.nan}
        if n_cls:
            out["accuracy"] = correct / n_cls
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, label: str = "") -> Checkpoint:
        """Capture everything needed to come back here; returns the handle for :meth:`rewind`.

        Only at a step boundary (stage FETCH with no batch held): finish the
        step first with :meth:`step`.
        """
        self._check_open()
        if self.stage is not Stage.FETCH or self._have_batch:
            raise RuntimeError(
                "checkpoint() works at a step boundary; the runner is mid-step "
                f"(next stage: {self.stage.value}). "
                "Call runner.step() to finish the batch first"
            )
        ck = Checkpoint.capture(self, label)
        self.checkpoints.append(ck)
        change = ControlChange("checkpoint", self.global_step, {"id": ck.id, "label": ck.label})
        self.history.add_control(change)
        self.events.emit(Event.CONTROL, change)
        return ck

    def rewind(self, handle: Checkpoint | None = None) -> Checkpoint:
        """Restore model, optimizer, scheduler, RNG states and data position from ``handle``.

        ``None`` rewinds to the newest checkpoint. Replaying the same steps then
        gives the same losses and weights bit for bit on CPU.
        """
        self._check_open()
        if self._running:
            raise RuntimeError("pause the run before rewinding")
        if handle is None:
            if not self.checkpoints:
                raise ValueError("no checkpoint to rewind to; call runner.checkpoint() first")
            handle = self.checkpoints[-1]
        if not isinstance(handle, Checkpoint):
            raise TypeError(f"rewind() takes a handle from runner.checkpoint(), got {type(handle).__name__}")
        if len(handle.requires_grad) != len(self.named_params):
            raise ValueError("this checkpoint belongs to a different model")
        ck = handle
        with torch.no_grad():
            self.model.load_state_dict(ck.model_state)
        for (_, p), rg in zip(self.named_params, ck.requires_grad):
            p.requires_grad_(rg)
            p.grad = None
        for m, mode in zip(self.model.modules(), ck.training):
            m.training = mode
        restore_optimizer(self.optimizer, ck.optimizer)
        restore_scheduler(self.scheduler, ck.scheduler, ck.scheduler_extra)
        self._restore_runner_state(ck.runner_state)
        self.tracker.densify(self.global_step)
        self.global_step, self.epoch, self.batch_index = ck.step, ck.epoch, ck.batch_index
        self.stage = Stage.FETCH
        self._have_batch = False
        self._raw_batch = self._inputs = self._targets = self._output = self._loss = None
        self.records = {}
        self._iter = None
        self._epoch_rng = ck.epoch_rng
        if ck.iter_started and ck.epoch_rng is not None:
            # Recreate the epoch's iterator from the RNG state it was created with
            # (same shuffle order), then skip the batches already consumed.
            restore_rng(ck.epoch_rng)
            self._iter = iter(self.train_data)
            for _ in range(ck.batch_index):
                next(self._iter)
        restore_rng(ck.rng)
        self.history.truncate_to_step(ck.step, ck.epoch)
        self._after_control(ControlChange("rewind", self.global_step, {"id": ck.id, "label": ck.label}))
        return ck

    def _state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch_loss": (self._epoch_loss_sum, self._epoch_loss_n),
            "bn_eval": dict(self._bn_eval),
        }

    def _restore_runner_state(self, state: dict[str, Any]) -> None:
        self._epoch_loss_sum, self._epoch_loss_n = state["epoch_loss"]
        self._bn_eval = dict(state["bn_eval"])

    # ------------------------------------------------------------------ findings
    @property
    def _new_errors(self) -> int:
        return self._error_seq

    def _explain(self, exc: BaseException, stage: Stage | None) -> Finding:
        context = {
            "input_shapes": {k: tuple(t.shape) for k, t in tensors_in(self._inputs, "inputs")},
            "target_shape": tuple(self._targets.shape) if isinstance(self._targets, torch.Tensor) else None,
            "output_shape": tuple(o.shape) if (o := _first_tensor(self._output)) is not None else None,
            "devices": sorted({str(p.device) for p in self.tracker.params}),
            "dtypes": sorted({str(p.dtype) for p in self.tracker.params}),
        }
        try:
            return self.diagnoser.explain(exc, stage, context, self.global_step)
        except Exception:
            from tlwidgets.core.plugins import NullDiagnoser

            return NullDiagnoser().explain(exc, stage, context, self.global_step)

    def _non_finite_loss_finding(self, value: float) -> Finding:
        origin = self.records.get(Stage.FORWARD, StageRecord(Stage.FORWARD, 0, 0, 0)).data.get(
            "non_finite_origin"
        )
        if origin is None:
            inputs = self._inputs
            where = locate_non_finite(self.model, lambda: self.forward(self.model, inputs), self._fwd_rng)
            origin = where.get("module") or (
                "the model's input" if where.get("inputs_non_finite") and not where.get("module") else None
            )
            if origin is None and not where.get("output_non_finite"):
                origin = "the loss function"
        where_text = f"; it first appears in {origin}" if origin else ""
        return make_finding(
            "non-finite-loss",
            f"the loss is {value}{where_text}",
            step=self.global_step,
            stage=Stage.LOSS,
            params=(origin,) if origin else (),
            evidence={"loss": value, "origin": origin},
        )

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


def _custom_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``step()`` is user code (not a torch.optim class's own)."""
    step = getattr(type(optimizer), "step", None)
    return not getattr(step, "__module__", "").startswith("torch.optim")


def _capture_opt_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {
        id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for p, s in optimizer.state.items()
    }


def _restore_opt_state(optimizer: torch.optim.Optimizer, saved: dict[int, dict[str, Any]]) -> None:
    params = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    for p in list(optimizer.state.keys()):
        if id(p) not in saved:
            del optimizer.state[p]
    for pid, state in saved.items():
        p = params.get(pid)
        if p is None:
            continue
        current = optimizer.state[p]
        for k, v in state.items():
            if (
                isinstance(v, torch.Tensor)
                and isinstance(current.get(k), torch.Tensor)
                and current[k].shape == v.shape
            ):
                current[k].copy_(v)
            else:
                current[k] = v


def _first_tensor(obj: Any) -> torch.Tensor | None:
    from tlwidgets.core.activations import first_tensor

    return first_tensor(obj)


def rec_batch_size(t: torch.Tensor | None) -> int | None:
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None


def _output_shape(t: torch.Tensor) -> dict[str, Any]:
    return {"output_shape": tuple(t.shape), "output_dtype": str(t.dtype).replace("torch.", "")}


def _tensor_summary(t: torch.Tensor, prefix: str, exact: bool) -> dict[str, Any]:
    lo, hi, mean, std, bad = tensor_stats([t], exact=exact)[0].tolist()
    return {
        f"{prefix}_shape": tuple(t.shape),
        f"{prefix}_dtype": str(t.dtype).replace("torch.", ""),
        f"{prefix}_min": lo,
        f"{prefix}_max": hi,
        f"{prefix}_mean": mean,
        f"{prefix}_std": std,
        f"{prefix}_non_finite": int(bad),
    }


def _probability_facts(out: torch.Tensor) -> dict[str, Any]:
    """Does a 2-D output look like probabilities or log-probabilities rather than logits?"""
    x = out.detach().float()
    vals = (
        torch.stack(
            [
                x.min(),
                x.max(),
                (x.sum(1) - 1).abs().mean(),
                torch.logsumexp(x, 1).abs().mean(),
            ]
        )
        .cpu()
        .tolist()
    )
    lo, hi, sum_dev, lse_dev = vals
    return {
        "output_is_probability": bool(lo >= 0 and hi <= 1 and sum_dev < 1e-3),
        "output_is_log_probability": bool(hi <= 1e-6 and lse_dev < 1e-3),
        "output_row_sum_dev": sum_dev,
        "output_logsumexp_dev": lse_dev,
    }
