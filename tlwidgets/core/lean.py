"""An undiagnosed :class:`~tlwidgets.core.runner.Runner` step in one frame (``run()`` between rule runs).

Why a second path: between two training steps' kernels the interpreter runs
cold (each step's matrix products evict its working set), so the price of the
stage-by-stage machinery (a generator round trip, the checks of ``run()`` and
the generic begin/end of a stage, seven times a step) is set by how many
distinct Python operations a step runs, not by how heavy each one is. On the
steps that take no stage facts and run no rules (19 in 20 of a sparse phase,
which measure nothing; 4 in 5 of a dense phase past its first steps, which
measure the grad, weight and update norms for the history), the seven stages
run here in sequence with the same effects on the runner and the same seven
records, and everything unusual (a failure, a NaN/Inf loss or gradient, a
finding, a Ctrl-C) hands over to the stage-by-stage path at the stage it
happened in, exactly as if that path had run the step.

Not used on a diagnosed step, when a STAGE subscriber (a dashboard) wants each
stage as it happens, while the data audits read the training batches, when a
control or a retry is pending, for a closure optimizer, around a snapshot step
(``safe_step``), or from ``run_async`` (which yields between stages).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from tlwidgets.core.batches import to_device
from tlwidgets.core.controls import effective_lrs
from tlwidgets.core.events import Event
from tlwidgets.core.records import EpochRecord, StageRecord, StageRecords
from tlwidgets.core.stages import Stage

__all__ = ["LeanStepMixin"]

_FETCH, _ZERO_GRAD, _TO_DEVICE, _FORWARD, _LOSS, _BACKWARD, _STEP = Stage

#: ``torch.get_rng_state`` without its Python frame (it returns ``default_generator.get_state()``).
_cpu_rng_state = torch.default_generator.get_state


class LeanStepMixin:
    """:meth:`_lean_step` for :class:`~tlwidgets.core.runner.Runner` (which provides the state it uses)."""

    self: Any  # (the Runner's attributes; see runner.py)

    def _lean_ready(self: Any) -> bool:
        """Can the next step run in one frame? At a step boundary, undiagnosed, with nothing that needs
        the stage-by-stage path."""
        if (
            self.stage is not _FETCH
            or self._have_batch
            or self._iter_broken
            or self._epoch_ending
            or self._pending
            or self._backward_failed
            or self._step_applied is not None
            or self._needs_closure
            or "train" in self._tapped_splits  # (the data audits still want training batches)
            or self.events.has_subscribers(Event.STAGE)
            or self._snapshot_step()
        ):
            return False
        self._plan_step(False)  # (FETCH would ask again, and get the same answers)
        return not self._diagnosed

    def _lean_step(self: Any) -> StageRecord | EpochRecord:
        """Run one undiagnosed step; returns its STEP record, or the record of the stage where it handed
        over to the stage-by-stage path (a failure, a NaN/Inf loss or gradient), or the epoch end it met."""
        self._fetch_rng = _cpu_rng_state()
        end = self._maybe_end_epoch()
        if end is not None:
            return end
        step, epoch, batch = self.global_step, self.epoch, self.batch_index
        records = self.records = StageRecords(self._position)
        measured = self._measured  # (the statistics: grad norms at BACKWARD, update norms at STEP)
        clock = time.perf_counter
        t0 = self._step_t0 = clock()
        stage = _FETCH
        rec = StageRecord(stage, step, epoch, batch, exact=False)
        self._in_stage = True
        completed = False  # the step is done: what raises after it is not the user's code
        try:
            self._inputs, self._targets = self.unpack(self._raw_batch)
            rec.data.measured = False
            rec.data.non_finite = None
            records[stage] = rec
            rec.duration_s = (t1 := clock()) - t0

            stage = self.stage = _ZERO_GRAD
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            self.optimizer.zero_grad()
            records[stage] = rec
            rec.duration_s = (t0 := clock()) - t1

            stage = self.stage = _TO_DEVICE
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            device = self.device
            if device is not None:
                self._inputs = to_device(self._inputs, device)
                self._targets = to_device(self._targets, device)
                rec.data.device = str(device)
            else:
                rec.data.device = None
            records[stage] = rec
            rec.duration_s = (t1 := clock()) - t0

            stage = self.stage = _FORWARD
            self._save_forward_state()
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            for m in self._bn_eval.values():
                m.eval()
            self._fwd_rng = self._pre_forward_rng
            self._output = None
            self._output = self.forward(self.model, self._inputs)
            rec.data.measured = False
            records[stage] = rec
            rec.duration_s = (t0 := clock()) - t1

            stage = self.stage = _LOSS
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            loss = self._loss = self._compute_loss()
            value = self._loss_value = float(loss.detach())
            data = rec.data
            data.loss, data.finite, data.measured = value, math.isfinite(value), False
            rec.duration_s = (t1 := clock()) - t0
            if not data.finite:  # the findings and the LOSS rules, then on stage by stage
                self._in_stage = False
                self._non_finite_loss(rec, value)
                return self._end_stage(rec)
            records[stage] = rec

            stage = self.stage = _BACKWARD
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            self._stage_backward(rec, False)
            rec.duration_s = (t0 := clock()) - t1
            if rec.findings:  # NaN/Inf gradients (measured steps): announced, and run() stops before STEP
                self._in_stage = False
                return self._end_stage(rec)
            records[stage] = rec

            stage = self.stage = _STEP
            rec = StageRecord(stage, step, epoch, batch, exact=False)
            # STEP is short and must not stop half-way: a Ctrl-C waits for its end (as in _do_stage).
            # (run() installed the handler: holding is one attribute, not two calls.)
            sigint = self._sigint
            if sigint.previous is not None:
                sigint.holding, opened = True, False
            else:
                opened = sigint.hold()
            try:
                if measured:
                    self.tracker.stats.before_step(exact=False)  # the sampled weights, for the update norms
                lrs_used = effective_lrs(self.optimizer)  # before a per-step scheduler moves them
                try:
                    self.optimizer.step()
                except BaseException:
                    rec.data["rolled_back"] = False  # no snapshot (sampled statistics only)
                    raise
                self._step_applied = (False, measured, lrs_used)
                self._complete_step(rec)
                completed = True
                self._in_stage = False
                rec.duration_s = clock() - t0
                self._end_stage(rec)
            finally:
                if opened or sigint.held is not None:
                    deliver = sigint.release(opened)
                else:
                    sigint.holding, deliver = False, None
        except Exception as exc:  # user code failed: as _run_stage records it, at this stage
            if completed:  # (the step's own end, as after _run_stage: not a failed stage)
                raise
            self._in_stage = False
            self.stage = stage
            self._stage_failed(rec, exc)
            return self._end_stage(rec)
        except BaseException:  # Ctrl-C: leave the stage ready to run again
            self._in_stage = False
            self.stage = stage
            if stage is not _STEP:  # (STEP held it until the step was complete or undone)
                self._on_stage_failure(stage)
            raise
        if deliver is not None:
            deliver()  # KeyboardInterrupt, with the step complete
        return rec
