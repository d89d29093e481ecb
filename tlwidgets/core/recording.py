"""The one recording path: what each stage saw, as typed facts, for every kind of session.

The :class:`~tlwidgets.core.runner.Runner` (which drives the stages), the
:class:`~tlwidgets.core.watch.Watcher` (which hooks a user's own loop) and the
framework callbacks all hand the objects of a stage (the batch, the output,
the loss tensor, the optimizer step's numbers) to a :class:`Recorder`. It
decides what the schedule measures, fills the stage's facts
(:mod:`tlwidgets.core.facts`), raises the core's own findings about
non-finite values, and announces the step. Adding a per-stage statistic is a
field in ``facts.py`` and a line here.

Tracking never breaks training: an exception inside tlwidgets' own
statistics (an odd tensor layout, a batch of 0 examples) is recorded in
``session.diagnostic_errors`` and on the record (``data.tracking_error``);
the facts it would have produced stay missing, and the stage goes on. It is
never shown as the user's stage error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.activations import first_tensor, non_finite_origin
from tlwidgets.core.batches import describe, tensor_stats, tensors_in
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.events import Event
from tlwidgets.core.findings import Finding
from tlwidgets.core.graph import locate_non_finite, reached_params
from tlwidgets.core.records import StageRecord, StepSummary
from tlwidgets.core.stages import Stage
from tlwidgets.core.stats import to_host, total_norm, update_ratio

__all__ = ["OCCASIONAL_EVERY", "OCCASIONAL_FIRST", "Recorder", "loss_fn_name"]

log = logging.getLogger(__name__)

#: Facts that depend on the code path, not on the batch (which parameters the loss reaches,
#: whether the output is already a probability), are measured on the first steps and then
#: every ``OCCASIONAL_EVERY`` steps (and on every exact, stage-by-stage record).
OCCASIONAL_FIRST = 3
OCCASIONAL_EVERY = 50


def loss_fn_name(loss_fn: Any) -> str | None:
    """``CrossEntropyLoss`` for a module, the function's name for a function, None for none."""
    if loss_fn is None:
        return None
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


class Recorder:
    """Builds the typed facts of each stage for one session (Runner, Watcher or a callback).

    Parameters
    ----------
    session
        Provides ``tracker``, ``named_params``, ``param_names``, ``events``,
        ``global_step``, ``epoch``, ``records`` and ``diagnostic_errors``.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.tracker = session.tracker
        self._mode_modules: list[tuple[str, nn.Module]] | None = None

    # ------------------------------------------------------------------ schedule
    def occasional(self, step: int, exact: bool = False) -> bool:
        """Are the code-path facts (reached parameters, probability outputs) due at ``step``?"""
        return exact or step < OCCASIONAL_FIRST or step % OCCASIONAL_EVERY == 0

    def new(
        self, stage: Stage, *, exact: bool = False, batch: int = 0, step: int | None = None
    ) -> StageRecord:
        """An empty record of ``stage`` at the session's step and epoch."""
        s = self.session
        return StageRecord(
            stage, s.global_step if step is None else step, int(getattr(s, "epoch", 0)), batch, exact=exact
        )

    @contextlib.contextmanager
    def guarded(self, rec: StageRecord | None, what: str) -> Iterator[None]:
        """Run tlwidgets' own statistics; a failure is recorded, not raised (tracking degrades)."""
        try:
            yield
        except Exception as exc:  # our bug or an input we cannot describe: never the user's error
            self.tracking_failed(rec, what, exc)

    def tracking_failed(self, rec: StageRecord | None, what: str, exc: BaseException) -> None:
        """Record an exception raised inside tlwidgets' own tracking."""
        text = f"tracking {what}: {type(exc).__name__}: {exc}"
        log.debug("%s", text, exc_info=exc)
        errors = getattr(self.session, "diagnostic_errors", None)
        if isinstance(errors, list):
            errors.append(text)
            del errors[:-50]
        if rec is not None:
            rec.data.tracking_error = text

    # ------------------------------------------------------------------ FETCH
    def fetch(self, rec: StageRecord, inputs: Any, targets: Any, *, exact: bool, stats: bool) -> None:
        """FETCH facts: structure and shapes; value ranges and label counts when ``stats``."""
        with self.guarded(rec, "the batch"):
            rec.data.update(describe(inputs, targets, exact=exact, stats=stats))
            finding = self.non_finite_input(rec, inputs, targets, stage=Stage.FETCH, loss_finite=True)
            if finding is not None:
                rec.findings.append(finding)

    def fetch_unmeasured(self, rec: StageRecord) -> None:
        """An unmeasured step's FETCH: nothing scanned (described later if the loss turns NaN/Inf)."""
        rec.data.update(measured=False, non_finite=None)

    def non_finite_input(
        self, fetch: StageRecord, inputs: Any, targets: Any, *, stage: Stage, loss_finite: bool
    ) -> Finding | None:
        """``non-finite-input`` when the batch holds NaN/Inf that is not a mask the model consumes.

        ``-inf`` is how additive attention masks say "never attend here"
        (``nn.Transformer.generate_square_subsequent_mask``): a tensor whose
        only non-finite values are ``-inf`` is a mask, and an error only when
        the loss turns out NaN/Inf (``loss_finite=False``). NaN and ``+inf`` in
        a batch are always reported.
        """
        data = fetch.data
        if not data.non_finite:
            return None
        bad = [k for k, v in (data.tensors or {}).items() if v.get("non_finite")]
        masks = set()
        with self.guarded(fetch, "the batch's NaN/Inf"):
            leaves = dict(tensors_in(inputs, "inputs") + tensors_in(targets, "targets"))
            for path in bad:
                t = leaves.get(path)
                if t is not None and t.is_floating_point() and not t.is_sparse:
                    x = t.detach()
                    has_nan, has_pos = to_host([torch.isnan(x).any(), torch.isposinf(x).any()]).tolist()
                    if not has_nan and not has_pos:
                        masks.add(path)
        if loss_finite:
            bad = [k for k in bad if k not in masks]
        if not bad:
            return None
        counts = {k: int((data.tensors or {})[k].get("non_finite", 0)) for k in bad}
        what = "-inf (a mask?) " if set(bad) <= masks else "NaN/Inf values "
        return make_finding(
            "non-finite-input",
            f"the batch holds {sum(counts.values())} {what}in {', '.join(bad)}"
            + ("; the loss is NaN/Inf" if not loss_finite else ""),
            step=fetch.step,
            stage=stage,
            params=tuple(bad),
            evidence={"non_finite": sum(counts.values()), "tensors": bad, "masks": sorted(masks & set(bad))},
        )

    def scan_batch_after_non_finite_loss(
        self, fetch: StageRecord, inputs: Any, targets: Any
    ) -> Finding | None:
        """The loss is NaN/Inf: scan the batch if this step did not, and report NaN/Inf in it
        (a mask's ``-inf`` included: the model did not consume it correctly)."""
        if fetch.data.non_finite is None:
            with self.guarded(fetch, "the batch"):
                fetch.data.update(describe(inputs, targets, exact=True))
        if any(f.code == "non-finite-input" for f in fetch.findings):
            return None  # reported when the batch was fetched
        return self.non_finite_input(fetch, inputs, targets, stage=Stage.LOSS, loss_finite=False)

    # ------------------------------------------------------------------ ZERO_GRAD
    def grads_present(self) -> int:
        """Tracked parameters holding a gradient now."""
        return sum(p.grad is not None for p in self.tracker.params)

    def zero_grad(self, rec: StageRecord, had: int) -> None:
        """ZERO_GRAD facts: gradients before/after and those ``zero_grad()`` left non-zero."""
        with self.guarded(rec, "zero_grad"):
            kept = [(n, p.grad) for n, p in self.session.named_params if p.grad is not None]
            left = []
            if kept:  # zero_grad(set_to_none=False) or params outside the optimizer: one transfer
                norms = to_host(torch._foreach_norm([g for _, g in kept]))
                left = [n for (n, _), v in zip(kept, norms) if v != 0]
            rec.data.update(grads_before=had, grads_after=len(kept), not_cleared=left)

    # ------------------------------------------------------------------ TO_DEVICE
    @staticmethod
    def devices_of(*objs: Any) -> list[str]:
        """Devices of the tensors in nested batch structures."""
        return sorted({str(t.device) for obj in objs for _, t in tensors_in(obj)})

    def to_device(
        self,
        rec: StageRecord,
        inputs: Any,
        targets: Any,
        *,
        device: Any,
        before: list[str] | None,
    ) -> None:
        """TO_DEVICE facts (``before=None``: not on the detail schedule, only the target device)."""
        rec.data.device = str(device) if device is not None else None
        if before is None:
            return
        with self.guarded(rec, "devices"):
            leaves = tensors_in(inputs, "inputs") + tensors_in(targets, "targets")
            rec.data.update(
                devices_before=before,
                devices=sorted({str(t.device) for _, t in leaves}),
                bytes=int(sum(t.numel() * t.element_size() for _, t in leaves)),
                param_devices=sorted({str(p.device) for p in self.tracker.params}),
            )

    # ------------------------------------------------------------------ FORWARD
    def eval_modules(self, model: nn.Module) -> list[str]:
        """Batch-norm and dropout modules (and ``<model>``) in eval mode now."""
        if self._mode_modules is None:  # the modules whose mode matters, found once
            self._mode_modules = [
                (n, m)
                for n, m in model.named_modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) or n == ""
            ]
        return [n or "<model>" for n, m in self._mode_modules if not m.training]

    def forward(
        self,
        rec: StageRecord,
        output: Any,
        *,
        training: bool,
        eval_modules: list[str],
        activations: dict[str, Any],
        summarize_output: bool,
        exact: bool,
    ) -> None:
        """FORWARD facts: mode, output shape (and statistics when ``summarize_output``), activations."""
        probe_errors = self.tracker.probe.errors
        if probe_errors:  # the activation hooks failed inside the forward (kept there, not raised)
            rec.data.tracking_error = "; ".join(probe_errors[-3:])
            errors = getattr(self.session, "diagnostic_errors", None)
            if isinstance(errors, list):
                errors.extend(f"tracking {e}" for e in probe_errors)
                del errors[:-50]
            probe_errors.clear()
        rec.data.update(
            training=training,
            grad_enabled=torch.is_grad_enabled(),
            eval_modules=eval_modules,
            activations=activations,
        )
        with self.guarded(rec, "the output"):
            out = first_tensor(output)
            if out is not None:
                rec.data.update(output_shape=tuple(out.shape), output_dtype=_dtype(out))
                if summarize_output and out.numel() and not out.is_sparse:
                    lo, hi, mean, std, bad = tensor_stats([out], exact=exact)[0].tolist()
                    rec.data.update(
                        output_min=lo,
                        output_max=hi,
                        output_mean=mean,
                        output_std=std,
                        output_non_finite=int(bad),
                    )
            if activations:
                rec.data.non_finite_origin = non_finite_origin(activations)

    # ------------------------------------------------------------------ LOSS
    def loss(
        self,
        rec: StageRecord,
        loss: torch.Tensor | float,
        output: Any,
        targets: Any,
        *,
        loss_fn: Any,
        measured: bool,
        exact: bool = False,
        terms: int | None = None,
        reached: list[str] | None = None,
    ) -> float:
        """LOSS facts; returns the value (read every step: the history's loss).

        ``loss`` is the loss tensor (its graph tells which parameters it
        reaches, when that is due), or, from a hook that saw the backward
        pass, its value with ``reached`` measured when the loss was computed
        (None: not measured this step). ``output`` and ``targets`` are what the
        loss function compared (the first floating tensor of ``output`` is
        used for class-output facts).
        """
        tensor = loss if isinstance(loss, torch.Tensor) else None
        value = float(tensor.detach()) if tensor is not None else float(loss)
        rec.data.update(loss=value, finite=math.isfinite(value), terms=terms)
        if not measured:
            rec.data.measured = False
            return value
        with self.guarded(rec, "the loss"):
            out = first_tensor(output)
            target = targets if isinstance(targets, torch.Tensor) else None
            rec.data.update(
                requires_grad=tensor.requires_grad if tensor is not None else True,
                loss_fn=loss_fn_name(loss_fn),
                reduction=getattr(loss_fn, "reduction", None),
                output_shape=tuple(out.shape) if out is not None else None,
                target_shape=tuple(target.shape) if target is not None else None,
                target_dtype=_dtype(target) if target is not None else None,
                batch_size=int(out.shape[0]) if out is not None and out.dim() > 0 else None,
            )
            occasional = self.occasional(rec.step, exact)
            if out is not None and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point():
                rec.data.expected_initial_loss = math.log(out.shape[1])
                if occasional:
                    rec.data.update(_probability_facts(out))
            if tensor is not None and occasional:
                reached = reached_params(tensor, self.session.named_params)
            if reached is not None:
                got = set(reached)
                rec.data.update(
                    reached=list(reached),
                    unreached=[n for n, p in self.session.named_params if p.requires_grad and n not in got],
                )
        return value

    def non_finite_loss_findings(
        self,
        rec: StageRecord,
        value: float,
        *,
        fetch: StageRecord | None,
        inputs: Any,
        targets: Any,
        forward: StageRecord | None,
        model: nn.Module | None,
        rerun: Callable[[], Any] | None,
        rng: torch.Tensor | None,
    ) -> list[Finding]:
        """The loss is NaN/Inf: what in the batch is non-finite (the likeliest origin), and where
        in the model the NaN/Inf first appears (see :meth:`non_finite_loss`)."""
        found = []
        if fetch is not None:
            got = self.scan_batch_after_non_finite_loss(fetch, inputs, targets)
            if got is not None:
                found.append(got)
        origin = forward.data.non_finite_origin if forward is not None else None
        found.append(self.non_finite_loss(rec, value, origin=origin, model=model, rerun=rerun, rng=rng))
        return found

    def non_finite_loss(
        self,
        rec: StageRecord,
        value: float,
        *,
        origin: str | None,
        model: nn.Module | None,
        rerun: Callable[[], Any] | None,
        rng: torch.Tensor | None,
    ) -> Finding:
        """``non-finite-loss``, naming where the NaN/Inf first appears.

        ``origin`` is the first module whose measured activations held NaN/Inf
        (when measured); otherwise the forward is re-run with checks on every
        module (``rerun`` under the same RNG state ``rng``; nothing changes).
        """
        if origin is None and model is not None and rerun is not None:
            where: dict[str, Any] = {}
            with self.guarded(rec, "locating the NaN/Inf"):
                where = locate_non_finite(model, rerun, rng)
            origin = where.get("module")
            if origin is None and where.get("inputs_non_finite"):
                origin = "the model's input"
            if origin is None and where and not where.get("output_non_finite") and "error" not in where:
                origin = "the loss function"
        # Name the module's class too: the module may hold no parameters (a LogFeatures in a
        # Sequential reads "head.0"), and its class is what the user wrote.
        kind = ""
        if origin and model is not None:
            module = dict(model.named_modules()).get(origin)
            kind = f" ({type(module).__name__})" if module is not None else ""
        return make_finding(
            "non-finite-loss",
            f"the loss is {value}" + (f"; it first appears in {origin}{kind}" if origin else ""),
            step=rec.step,
            stage=Stage.LOSS,
            params=(origin,) if origin else (),
            evidence={"loss": value, "origin": origin},
        )

    # ------------------------------------------------------------------ BACKWARD
    def backward(self, rec: StageRecord, *, exact: bool | None, loss: float, when: str) -> None:
        """BACKWARD facts from the gradients now (``when`` ends the finding's message: where or what then)."""
        # (try/except, not the guarded() context manager, and attributes, not data.update(): this runs
        # on every measured step, where each Python call counts.)
        try:
            grad, grad_exact = self.tracker.measure_grads(exact)
            total = float(grad.dot(grad))
            if math.isfinite(total):
                # The common case, every measured step: a finite norm for every parameter means every
                # one has a gradient (a missing one reads NaN) and none is NaN/Inf, so the lists below
                # are empty and the total is the plain norm of the norms (the same float64 dot).
                data = rec.data
                data.grad_norm, data.grad_exact, data.total_grad_norm = grad, grad_exact, math.sqrt(total)
                data.missing_grad, data.non_finite_grad = [], []
                return
        except Exception as exc:  # our bug or an input we cannot describe: never the user's error
            self.tracking_failed(rec, "the gradients", exc)
            return
        with self.guarded(rec, "the gradients"):
            params = self.tracker.params
            names = self.session.param_names
            trainable = np.fromiter((p.requires_grad for p in params), dtype=bool, count=len(params))
            has = np.fromiter((p.grad is not None for p in params), dtype=bool, count=len(params))
            bad = has & ~np.isfinite(grad)
            rec.data.update(
                grad_norm=grad,
                grad_exact=grad_exact,
                total_grad_norm=total_norm(grad[has]),
                missing_grad=[n for n, t, h in zip(names, trainable, has) if t and not h],
                non_finite_grad=[n for n, b in zip(names, bad) if b],
            )
            if rec.data.non_finite_grad:
                bad_names = tuple(rec.data.non_finite_grad)
                rec.findings.append(
                    make_finding(
                        "non-finite-grad",
                        f"{len(bad_names)} parameter(s) got NaN/Inf gradients{when}",
                        step=rec.step,
                        stage=Stage.BACKWARD,
                        params=bad_names,
                        evidence={
                            "grad_norm": {n: float(grad[names.index(n)]) for n in bad_names[:20]},
                            "loss": loss,
                        },
                    )
                )

    def clip_ratio(self, rec: StageRecord, before: dict[int, torch.Tensor]) -> float | None:
        """Gradient norm now over the norm right after backward (``before``: parameter index ->
        norm of its sampled gradient then), over the parameters that still hold a gradient.

        Below 1 when the loop clips (or scales) the gradients between backward and step.
        """
        got: float | None = None
        with self.guarded(rec, "the clip ratio"):
            params = self.tracker.params
            idx = [i for i, t in before.items() if t is not None and params[i].grad is not None]
            if not idx:
                return None
            sampler = self.tracker.stats.sampler
            pre = to_host([before[i] for i in idx])
            grad = rec.data.grad_norm
            if grad is not None and not rec.data.grad_exact:
                post = grad[idx] / sampler.scale[idx]  # the sampled norms, unscaled
            else:
                views = sampler.grad_views()
                post = to_host([torch.linalg.vector_norm(views[i].detach().float()) for i in idx])
            total_pre, total_post = float(np.sqrt(np.sum(pre**2))), float(np.sqrt(np.nansum(post**2)))
            got = total_post / total_pre if total_pre > 0 else None
            rec.data.clip_ratio = got
        return got

    def loop_event(self, loop: Any) -> StageRecord:
        """A BACKWARD record carrying a snapshot of the watcher's loop bookkeeping, for the loop rules."""
        rec = self.new(Stage.BACKWARD)
        # A snapshot (not dataclasses.asdict: a deep copy every backward pass).
        rec.data.loop = {
            **vars(loop),
            "clip_ratio": list(loop.clip_ratio),
            "val_losses": list(loop.val_losses),
        }
        rec.data.loop_event = True
        return rec

    def commit(self, rec: StageRecord) -> None:
        """A hooked session's record is complete: keep it, publish its findings, run its rules,
        announce it."""
        s = self.session
        s.records[rec.stage] = rec
        if rec.findings:
            s._publish(rec.findings)
        s._publish(s._diagnose("on_stage", rec))
        s.events.emit(Event.STAGE, rec)

    def backward_unmeasured(self, rec: StageRecord) -> None:
        """An unmeasured step: no grad norms for its history row."""
        self.tracker.skip_grads()
        rec.data.measured = False

    # ------------------------------------------------------------------ STEP
    def step(self, rec: StageRecord, numbers: dict[str, Any], *, measured: bool, update_exact: bool) -> None:
        """STEP facts from :meth:`Tracker.record_step`'s numbers."""
        rec.data.lr = list(numbers["lr"])
        if not measured:
            rec.data.measured = False
            return
        with self.guarded(rec, "the update"):
            update, weight = numbers["update_norm"], numbers["weight_norm"]
            names = self.session.param_names
            # Python floats: comparing numpy scalars one by one costs several times more.
            moved = [u > 0 for u in np.asarray(update, dtype=np.float64).tolist()]
            rec.data.update(
                update_norm=update,
                weight_norm=weight,
                update_ratio=update_ratio(update, weight),
                update_exact=update_exact,
                changed=[n for n, m in zip(names, moved) if m],
                frozen_changed=[
                    n for n, m, p in zip(names, moved, self.tracker.params) if m and not p.requires_grad
                ],
            )

    def announce_step(
        self, *, batch: int, loss: float, lrs: Sequence[float], exact: bool, duration_s: float
    ) -> StepSummary | None:
        """Emit :class:`Event.STEP` for the optimizer step just completed (None: nobody listens, so no
        summary is built)."""
        s = self.session
        if not s.events.has_subscribers(Event.STEP):
            return None
        summary = StepSummary(
            step=s.global_step,
            epoch=int(getattr(s, "epoch", 0)),
            batch=batch,
            loss=loss,
            lr=list(lrs),
            exact=exact,
            duration_s=duration_s,
        )
        s.events.emit(Event.STEP, summary)
        return summary


#: ``torch.float32`` -> ``"float32"``, built once per dtype (read on every measured step).
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype(t: torch.Tensor) -> str:
    dtype = t.dtype
    got = _DTYPE_NAMES.get(dtype)
    if got is None:
        got = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return got


def _probability_facts(out: torch.Tensor) -> dict[str, Any]:
    """Does a 2-D output look like probabilities or log-probabilities rather than logits?"""
    x = out.detach().float()
    if x.numel() == 0:  # an empty batch has no rows to read
        return {}
    lo, hi, sum_dev, lse_dev = to_host(
        [x.min(), x.max(), (x.sum(1) - 1).abs().mean(), torch.logsumexp(x, 1).abs().mean()]
    ).tolist()
    return {
        "output_is_probability": bool(lo >= 0 and hi <= 1 and sum_dev < 1e-3),
        "output_is_log_probability": bool(hi <= 1e-6 and lse_dev < 1e-3),
        "output_row_sum_dev": sum_dev,
        "output_logsumexp_dev": lse_dev,
    }
