"""Attach to the user's own training loop through public hooks only."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.batches import describe
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.controls import ControlsMixin
from tlwidgets.core.events import Event
from tlwidgets.core.findings import Finding
from tlwidgets.core.graph import locate_non_finite, reached_params
from tlwidgets.core.plugins import Diagnoser
from tlwidgets.core.records import StageRecord, StepSummary
from tlwidgets.core.session import FindingsMixin
from tlwidgets.core.stages import Stage
from tlwidgets.core.stats import to_host, total_norm, update_ratio

__all__ = ["LoopFacts", "Watcher", "watch"]

log = logging.getLogger(__name__)

#: How many parameters carry the gradient-bookkeeping hooks (two Python calls per
#: hooked parameter and backward pass, every step: a few, spread over the model).
_HOOKED_PARAMS = 4


@dataclasses.dataclass
class LoopFacts:
    """What the watcher has learned about the structure of the user's loop.

    Attributes
    ----------
    backwards
        Backward passes seen (through the model's parameters).
    steps
        Optimizer steps seen.
    backwards_without_step
        Consecutive backward passes whose gradients were reset before them but
        with no optimizer step in between (a loop that forgot ``step()``).
    stale_steps
        Consecutive steps whose gradients still held the previous step's
        gradients (never zeroed) when the next backward added to them.
    clip_ratio
        Gradient norm at ``optimizer.step()`` divided by the norm right after
        backward (measured on a schedule): ~1 without clipping.
    val_losses
        Losses computed without gradient (validation) since the last step.
    """

    backwards: int = 0
    steps: int = 0
    backwards_without_step: int = 0
    stale_steps: int = 0
    accumulating: bool = False
    clip_ratio: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[float] = dataclasses.field(default_factory=list)


class Watcher(FindingsMixin, ControlsMixin):
    """Tracks a training loop the user writes; see :func:`watch`.

    Attributes
    ----------
    history
        Same :class:`~tlwidgets.core.history.History` as a Runner's.
    findings
        Current findings, most likely root cause first.
    records
        The latest record of each stage the hooks can see (FETCH from the
        model's inputs, FORWARD, LOSS, BACKWARD, STEP).
    loop
        :class:`LoopFacts` about the loop's structure.
    """

    kind = "watch"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any = None,
        *,
        sample_size: int = 1024,
        history_size: int = 10_000,
        activation_every: int = 25,
        detail_every: int = 10,
        measure_every: int = 20,
        dense_steps: int = 200,
        grad_budget: float | None = None,
        scheduler: Any = None,
        diagnoser: Diagnoser | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if loss_fn is not None and not isinstance(loss_fn, nn.Module):
            raise TypeError(
                "loss_fn must be an nn.Module (e.g. nn.CrossEntropyLoss()) so its calls can be hooked; "
                "for a plain function, leave loss_fn out and call watcher.record_loss(loss) in your loop"
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
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
        self.loop = LoopFacts()
        self.global_step = 0
        self.epoch = 0
        self.scheduler = scheduler
        self.freeze_bn_stats = False
        self._bn_eval: dict[str, nn.Module] = {}
        self._in_stage = False
        self._pending: collections.deque[Any] = collections.deque()
        self._handles: list[Any] = []
        self._closed = False
        self._pending_loss: torch.Tensor | None = None
        self._pending_facts: dict[str, Any] | None = None
        self._last_inputs: Any = None
        self._fwd_rng: torch.Tensor | None = None
        self._loss_value = math.nan
        self._step_since_backward = True
        self._backward_open = False
        self._fingerprint: dict[int, tuple[int, int]] = {}
        self._after_step_fp: dict[int, tuple[int, int]] = {}
        self._clip_pre: list[torch.Tensor | None] = []
        self._backward_open = False
        self._backward_seen: set[int] = set()
        self._pending_forward: StageRecord | None = None
        self._measure_clip = False
        self._clip_handles: list[Any] = []
        self._install()
        self._refresh_audit()

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        opt = self.optimizer
        self._handles.append(opt.register_step_pre_hook(self._on_pre_step))
        self._handles.append(opt.register_step_post_hook(self._on_post_step))
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_pre))
        self._handles.append(self.model.register_forward_hook(self._on_model_post))
        if self.loss_fn is not None:
            self._handles.append(self.loss_fn.register_forward_hook(self._on_loss))
        trainable = [(i, p) for i, (_, p) in enumerate(self.named_params) if p.requires_grad]
        pick = (
            np.unique(np.linspace(0, len(trainable) - 1, min(_HOOKED_PARAMS, len(trainable))).astype(int))
            if trainable
            else []
        )
        self._hooked: list[int] = []
        for j in pick:
            i, p = trainable[j]
            self._hooked.append(i)
            self._handles.append(p.register_hook(self._grad_pre_hook(i)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_post_hook(i)))
        self._clip_pre = [None] * len(self.named_params)

    def _start_clip_measure(self) -> None:
        """Hook every trainable parameter's gradient for this pass (on a schedule: a hook per
        parameter costs a Python call per parameter and step, so they exist only when used)."""
        self._measure_clip = True
        if self._clip_handles:
            return
        self._clip_handles = [
            p.register_post_accumulate_grad_hook(self._clip_hook(i))
            for i, (_, p) in enumerate(self.named_params)
            if p.requires_grad
        ]

    def _stop_clip_measure(self) -> None:
        self._measure_clip = False
        for h in self._clip_handles:
            h.remove()
        self._clip_handles = []

    def _grad_pre_hook(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            # Without a hooked loss, the first hooked gradient of a pass opens it;
            # a parameter seen twice means a new pass (e.g. retain_graph).
            if not self._backward_open or i in self._backward_seen:
                self._begin_backward(only=i)
            self._backward_seen.add(i)
            return None

        return hook

    def _on_loss_backward(self, grad: torch.Tensor) -> None:
        """Backward reached the loss tensor: a pass starts, before any parameter gets its gradient."""
        if not self._closed:
            self._begin_backward(only=None)

    def _grad_post_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._fingerprint[i] = (id(p.grad), p.grad._version)

        return hook

    def _clip_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self._measure_clip and p.grad is not None and not p.grad.is_sparse:
                view = self.tracker.stats.sampler._sample(i, p.grad)
                self._clip_pre[i] = torch.linalg.vector_norm(view.detach().float())

        return hook

    def _begin_backward(self, only: int | None) -> None:
        """A backward pass starts: classify how the loop treated the gradients since the last one.

        A gradient is *untouched* when it is the very tensor, unmodified, that
        the previous pass left (not set to None, not zeroed in place). ``only``
        restricts the look to one parameter (when the pass was detected through
        that parameter's hook, the others may already hold this pass's gradient).
        """
        self._backward_open = True
        self._backward_seen = set()
        params = self.tracker.params
        untouched = stale = False
        for i in [only] if only is not None else self._hooked:
            g = params[i].grad
            if g is not None and self._fingerprint.get(i) == (id(g), g._version):
                untouched = True
                stale = stale or self._after_step_fp.get(i) == (id(g), g._version)
        self.loop.backwards += 1
        if self._step_since_backward:
            # A step happened since the last backward: the grads should have been reset.
            self.loop.stale_steps = self.loop.stale_steps + 1 if stale else 0
            self.loop.backwards_without_step = 0
            self.loop.accumulating = False
        elif untouched:
            self.loop.accumulating = True  # deliberate accumulation over micro-batches
            self.loop.backwards_without_step = 0
        else:
            self.loop.backwards_without_step += 1
        self._step_since_backward = False
        if self._pending_loss is not None:
            self._confirm_training_loss()
        loop = self.loop
        if self.tracker.measuring(self.global_step) or loop.stale_steps or loop.backwards_without_step:
            self._diagnose_loop()

    def _on_model_pre(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._backward_open = False
        self._last_inputs = args
        self._fwd_rng = torch.get_rng_state()
        step = self.global_step
        self.tracker.note_trainable(step)
        if not self.tracker.measuring(step):
            return
        if self.tracker.activations_due(step):
            self.tracker.probe.start()
        if step < 5 or step % 10 == 0:
            self._start_clip_measure()

    def _on_model_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        acts = self.tracker.finish_activations(self.global_step) if self.tracker.probe.active else {}
        if not self.tracker.measuring(self.global_step):
            self._pending_forward = None
            return
        rec = StageRecord(stage=Stage.FORWARD, step=self.global_step, epoch=self.epoch, batch=0, exact=False)
        rec.data.update(
            training=module.training,
            grad_enabled=True,
            eval_modules=[
                n or "<model>"
                for n, m in module.named_modules()
                if not m.training
                and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
            ]
            + ([] if module.training else ["<model>"]),
            activations=acts,
        )
        # Only a forward whose loss is backpropagated is training (validation
        # under eval() without no_grad() is not): committed in _confirm_training_loss.
        self._pending_forward = rec

    def _on_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.numel() != 1:
            return
        if not torch.is_grad_enabled() or not output.requires_grad:
            self.loop.val_losses.append(float(output.detach()))
            return
        self._pending_loss = output
        self._pending_facts = {"args": args}
        self._backward_open = False
        output.register_hook(self._on_loss_backward)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Tell the watcher the loss of this iteration (when ``loss_fn`` is a plain function)."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("record_loss() takes the scalar loss tensor")
        if not loss.requires_grad:
            self.loop.val_losses.append(float(loss.detach()))
            return
        self._pending_loss = loss
        self._pending_facts = {"args": ()}
        self._backward_open = False
        loss.register_hook(self._on_loss_backward)

    def _confirm_training_loss(self) -> None:
        """The pending loss is being backpropagated: it is a training loss; record LOSS and FETCH."""
        loss = self._pending_loss
        facts = self._pending_facts or {}
        self._pending_loss = None
        value = float(loss.detach())
        self._loss_value = value
        step = self.global_step
        if math.isfinite(value) and not self.tracker.measuring(step):
            self._pending_forward = None
            return
        rec = StageRecord(stage=Stage.LOSS, step=step, epoch=self.epoch, batch=0, exact=False)
        args = facts.get("args", ())
        out = args[0] if len(args) > 0 and isinstance(args[0], torch.Tensor) else None
        target = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        rec.data.update(
            loss=value,
            finite=math.isfinite(value),
            requires_grad=True,
            loss_fn=type(self.loss_fn).__name__ if self.loss_fn is not None else None,
            reduction=getattr(self.loss_fn, "reduction", None),
            output_shape=tuple(out.shape) if out is not None else None,
            target_shape=tuple(target.shape) if target is not None else None,
            target_dtype=str(target.dtype).replace("torch.", "") if target is not None else None,
            batch_size=int(out.shape[0]) if out is not None and out.dim() else None,
        )
        from tlwidgets.core.runner import _probability_facts

        if out is not None and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point():
            rec.data["expected_initial_loss"] = math.log(out.shape[1])
            if step < 3 or step % 50 == 0:
                rec.data.update(_probability_facts(out))
        if step < 3 or step % 50 == 0:
            rec.data["reached"] = reached_params(loss, self.named_params)
            trainable = [n for n, p in self.named_params if p.requires_grad]
            rec.data["unreached"] = [n for n in trainable if n not in set(rec.data["reached"])]
        inputs = (
            self._last_inputs[0] if self._last_inputs and len(self._last_inputs) == 1 else self._last_inputs
        )
        fetch = StageRecord(stage=Stage.FETCH, step=step, epoch=self.epoch, batch=0, exact=False)
        detail = self.tracker.details_due(step)
        fetch.data.update(describe(inputs, target, exact=False, stats=detail or not math.isfinite(value)))
        self.records[Stage.FETCH] = fetch
        self.records[Stage.LOSS] = rec
        forward, self._pending_forward = self._pending_forward, None
        if forward is not None:
            self.records[Stage.FORWARD] = forward
        findings = []
        if fetch.data["non_finite"]:
            findings.append(
                make_finding(
                    "non-finite-input",
                    f"the batch holds {fetch.data['non_finite']} NaN/Inf values",
                    step=step,
                    stage=Stage.FETCH,
                    evidence={"non_finite": fetch.data["non_finite"]},
                )
            )
        if not math.isfinite(value):
            findings.append(self._non_finite_loss_finding(value))
        self._publish(findings)
        for r in (fetch, forward, rec):
            if r is not None:
                self._publish(self._diagnose("on_stage", r))
                self.events.emit(Event.STAGE, r)

    def _non_finite_loss_finding(self, value: float) -> Finding:
        origin = None
        if self._last_inputs is not None:
            args = self._last_inputs
            where = locate_non_finite(self.model, lambda: self.model(*args), self._fwd_rng)
            origin = where.get("module")
            if origin is None and where.get("inputs_non_finite"):
                origin = "the model's input"
            if origin is None and not where.get("output_non_finite") and "error" not in where:
                origin = "the loss function"
        return make_finding(
            "non-finite-loss",
            f"the loss is {value}" + (f"; it first appears in {origin}" if origin else ""),
            step=self.global_step,
            stage=Stage.LOSS,
            params=(origin,) if origin else (),
            evidence={"loss": value, "origin": origin},
        )

    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.tracker.measuring(self.global_step):
            self.tracker.skip_grads()
            return
        try:
            grad, exact = self.tracker.measure_grads()
            names = self.param_names
            trainable = np.array([p.requires_grad for p in self.tracker.params], dtype=bool)
            has = np.array([p.grad is not None for p in self.tracker.params], dtype=bool)
            rec = StageRecord(
                stage=Stage.BACKWARD, step=self.global_step, epoch=self.epoch, batch=0, exact=exact
            )
            rec.data.update(
                grad_norm=grad,
                grad_exact=exact,
                total_grad_norm=total_norm(grad[has]),
                missing_grad=[n for n, t, h in zip(names, trainable, has) if t and not h],
                non_finite_grad=[n for n, h, g in zip(names, has, grad) if h and not np.isfinite(g)],
            )
            if self._measure_clip:
                params = self.tracker.params
                # Parameters whose gradient was measured after backward and still exists now
                # (a zero_grad() between backward and step leaves None).
                idx = [
                    i for i, t in enumerate(self._clip_pre) if t is not None and params[i].grad is not None
                ]
                if idx:
                    pre = to_host([self._clip_pre[i] for i in idx])
                    post = grad[idx] / self.tracker.stats.sampler.scale[idx] if not exact else None
                    if post is None:
                        views = self.tracker.stats.sampler.grad_views()
                        post = to_host([torch.linalg.vector_norm(views[i].detach().float()) for i in idx])
                    total_pre, total_post = float(np.sqrt(np.sum(pre**2))), float(np.sqrt(np.nansum(post**2)))
                    if total_pre > 0 and math.isfinite(total_pre):
                        self.loop.clip_ratio.append(total_post / total_pre)
                        del self.loop.clip_ratio[:-50]
                    rec.data["clip_ratio"] = total_post / total_pre if total_pre > 0 else None
                self._clip_pre = [None] * len(self._clip_pre)
                self._stop_clip_measure()
            self.records[Stage.BACKWARD] = rec
            if rec.data["non_finite_grad"]:
                self._publish(
                    [
                        make_finding(
                            "non-finite-grad",
                            f"{len(rec.data['non_finite_grad'])} parameter(s) have NaN/Inf gradients "
                            "at optimizer.step()",
                            step=self.global_step,
                            stage=Stage.BACKWARD,
                            params=tuple(rec.data["non_finite_grad"]),
                            evidence={"loss": self._loss_value},
                        )
                    ]
                )
            self._publish(self._diagnose("on_stage", rec))
            self.events.emit(Event.STAGE, rec)
        except Exception:  # never break the user's training loop
            log.exception("watch: pre-step tracking failed")
        finally:
            # Always snapshot, so the post-step hook can measure the update.
            self.tracker.stats.before_step(exact=False)

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self.loop.steps += 1
            self._step_since_backward = True
            params = self.tracker.params
            for i in self._fingerprint:
                g = params[i].grad
                if g is not None:
                    self._after_step_fp[i] = (id(g), g._version)
            measured = self.tracker.measuring(self.global_step)
            numbers = self.tracker.record_step(
                step=self.global_step + 1,
                epoch=self.epoch,
                loss=self._loss_value,
                exact=False,
                measured=measured,
            )
            self.global_step += 1
            if self.loop.val_losses:
                self.loop.val_losses.clear()
            if not measured:
                self._emit_step(numbers["lr"])
                return
            update, weight = numbers["update_norm"], numbers["weight_norm"]
            frozen = [not p.requires_grad for p in self.tracker.params]
            rec = StageRecord(
                stage=Stage.STEP, step=self.global_step - 1, epoch=self.epoch, batch=0, exact=False
            )
            rec.data.update(
                update_norm=update,
                weight_norm=weight,
                update_ratio=update_ratio(update, weight),
                lr=numbers["lr"],
                update_exact=False,
                changed=[n for n, u in zip(self.param_names, update) if u > 0],
                frozen_changed=[n for n, u, f in zip(self.param_names, update, frozen) if f and u > 0],
            )
            self.records[Stage.STEP] = rec
            self._publish(self._diagnose("on_stage", rec))
            self.events.emit(Event.STAGE, rec)
            self._publish(self._diagnose("on_step"))
            self._emit_step(numbers["lr"])
        except Exception:
            log.exception("watch: post-step tracking failed")

    def _emit_step(self, lrs: list[float]) -> None:
        self.events.emit(
            Event.STEP,
            StepSummary(
                step=self.global_step,
                epoch=self.epoch,
                batch=0,
                loss=self._loss_value,
                lr=list(lrs),
                exact=False,
                duration_s=0.0,
            ),
        )

    def _diagnose_loop(self) -> None:
        rec = StageRecord(stage=Stage.BACKWARD, step=self.global_step, epoch=self.epoch, batch=0, exact=False)
        loop = self.loop  # a snapshot (not dataclasses.asdict: a deep copy every backward pass)
        rec.data["loop"] = {
            **vars(loop),
            "clip_ratio": list(loop.clip_ratio),
            "val_losses": list(loop.val_losses),
        }
        rec.data["loop_event"] = True
        self._publish(self._diagnose("on_stage", rec))

    # ------------------------------------------------------------------ findings
    def finish(self) -> None:
        """Final checks (the loop ended): e.g. backward passes that never led to a step."""
        if self.loop.backwards and not self.loop.steps:
            self.loop.backwards_without_step = max(self.loop.backwards_without_step, self.loop.backwards)
        self._diagnose_loop()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove every hook (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_clip_measure()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.tracker.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this watcher is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self._closed:
                self.finish()
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "watching"
        return f"Watcher({state}, step={self.global_step}, findings={len(self._log)})"


@contextmanager
def _noop() -> Iterator[None]:
    yield


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any = None, **options: Any) -> Watcher:
    """Track the user's own training loop; use as ``with tlw.watch(model, opt, loss_fn=crit) as w:``.

    The loop stays unchanged. Hooks: the optimizer's step pre/post hooks, the
    model's forward (pre-)hooks, a forward hook on ``loss_fn`` (an
    ``nn.Module``) and gradient hooks on the parameters. Validation under
    ``torch.no_grad()`` is not counted as training. Findings are complete when
    the ``with`` block exits (or after :meth:`Watcher.finish`); ``close()``
    removes the hooks. Options are those of :class:`Watcher`.
    """
    return Watcher(model, optimizer, loss_fn, **options)
