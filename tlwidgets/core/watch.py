"""Attach to the user's own training loop through public hooks only.

How the watcher reads a loop
----------------------------
It follows the autograd graph, not call counts:

- A **backward pass** counts as training the watched model only when it
  reaches the model's parameters: the gradient hooks of a few of them (spread
  over the model, among those the optimizer holds) fire. A probe trained on
  ``features.detach()``, or a discriminator's loss on ``fake.detach()`` seen
  by the generator's watcher, never reaches them and is not seen as a pass.
- A **criterion call** is a loss term of the watched model only when its
  graph reaches the model's parameters. The terms backpropagated in one pass
  combine into that pass's loss (see :class:`Watcher` for the value).
- Gradients live in **windows**: from one reset (``zero_grad()``, set to
  ``None``, or overwritten) to the next. A step is *missing* only when a reset
  discards a window in which gradients were produced and no optimizer step
  consumed them; a step *consumes stale gradients* only when a backward pass
  added to gradients that an earlier step had already applied, with no reset
  in between. Gradient accumulation (several passes, then one step), a GAN's
  generator step that backpropagates through the discriminator (whose
  gradients are reset before its next step) and the closure of
  ``optimizer.step(closure)`` (LBFGS: passes inside the step belong to it)
  are all healthy.
- An exception that ends the ``with`` block is not a loop bug.

Everything a hook does is guarded: an internal failure is logged and kept in
``Watcher.diagnostic_errors``, the tracking of that part degrades, and the
user's loop goes on. Whatever the watcher attaches to the model and the loss
module is dropped when they are pickled, deep-copied or saved with
``torch.save``: the copy is the model as it would be unwatched.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.batches import tensors_in
from tlwidgets.core.controls import ControlsMixin, optimizer_param_ids
from tlwidgets.core.distributed import RankSync, attach
from tlwidgets.core.findings import Finding
from tlwidgets.core.graph import reached_params, reaches_any
from tlwidgets.core.plugins import Diagnoser
from tlwidgets.core.records import StageRecord
from tlwidgets.core.session import FindingsMixin
from tlwidgets.core.stages import Stage
from tlwidgets.core.stats import to_host

__all__ = ["LoopFacts", "Watcher", "watch"]

log = logging.getLogger(__name__)

#: Recent passes whose loss gradient (the loss scale under GradScaler) the watcher keeps.
LOSS_GRADS_KEPT = 64
#: How many parameters carry the gradient-bookkeeping hooks (two Python calls per
#: hooked parameter and backward pass, every step: a few, spread over the model).
_HOOKED_PARAMS = 4

#: Criterion outputs remembered until their backward pass (or the next optimizer step). Each
#: holds detached references to the criterion's inputs, for the LOSS facts; losses computed
#: with gradients but never backpropagated (validation without no_grad()) are forgotten first.
_MAX_PENDING_TERMS = 8

#: Internal failures kept in ``diagnostic_errors`` (the newest).
_MAX_DIAGNOSTIC_ERRORS = 50


# ---------------------------------------------------------------------------------- hooks
def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a watcher hook becomes when it is copied on its own: nothing."""
    return None


class _Hook:
    """A watcher hook: guarded, recognisable, and never copied along with the model.

    Every hook the watcher registers (on the model, the loss module, the
    optimizer, parameters and loss tensors) is one of these. A call runs
    ``fn``; an exception is recorded on the watcher (``diagnostic_errors``)
    and swallowed, and the hook returns ``None`` (which leaves the module's
    input/output or the gradient as they are), so tlwidgets never raises into
    the user's loop. Being one class lets the watched module's pickling drop
    exactly these entries from its hook dicts (see :class:`_DropWatchHooks`).
    """

    __slots__ = ("__weakref__", "fn", "owner", "where")
    #: torch's "hook will not be serialized" check: it is not, on purpose.
    __torch_unserializable__ = True

    def __init__(self, fn: Callable[..., Any], owner: Watcher, where: str) -> None:
        self.fn = fn
        self.owner = owner
        self.where = where

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.owner._suspended:  # tlwidgets' own probe of the model: not the user's loop
            return None
        try:
            self.fn(*args, **kwargs)
        except Exception as exc:  # tlwidgets' own failure: never the user's
            self.owner._internal_error(self.where, exc)
        return None

    # A hook copied on its own (a hooks dict pickled by hand) becomes inert: it
    # must not drag the watcher (rules, history, tensors) into the copy.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_resolve_inert, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _inert_hook


def _resolve_inert() -> Callable[..., None]:
    return _inert_hook


def _without_watch_hooks(state: Any) -> Any:
    """A module's pickled state without the watcher's hook entries (and without the reducer itself)."""
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        return (_without_watch_hooks(state[0]), state[1])  # (dict, slots) of a class with __slots__
    if not isinstance(state, dict):
        return state
    out = dict(state)  # a shallow copy: the live module keeps its hooks
    if isinstance(out.get("__reduce_ex__"), _DropWatchHooks):
        del out["__reduce_ex__"]
    ours = {k for v in state.values() if isinstance(v, dict) for k, h in v.items() if isinstance(h, _Hook)}
    if ours:
        # The hook dicts, and their companions keyed by the same handle ids
        # (_forward_hooks_with_kwargs, _forward_hooks_always_called, ...).
        for name, v in state.items():
            if isinstance(v, dict) and name.startswith("_") and not ours.isdisjoint(v.keys()):
                out[name] = type(v)((k, h) for k, h in v.items() if k not in ours)
    return out


class _DropWatchHooks:
    """Set as a watched module's *instance* ``__reduce_ex__``: pickle it as if it were not watched.

    ``pickle`` (so ``torch.save``), ``copy.deepcopy`` and ``copy.copy`` look
    ``__reduce_ex__`` up on the object, so an instance attribute overrides the
    class's for this one module without touching its class. It reduces the
    module the way its class would and removes the watcher's entries from the
    hook dicts of the state (and itself): the copy has exactly the user's own
    hooks, and the original keeps being watched. Parameters drop tensor hooks
    when pickled or deep-copied (torch's own rule), so they need nothing.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self, protocol: int) -> Any:
        module = self.module()
        if module is None:  # cannot happen while the module exists; be safe
            raise TypeError("the watched module no longer exists")
        rv = type(module).__reduce_ex__(module, protocol)
        if isinstance(rv, tuple) and len(rv) >= 3:
            rv = (*rv[:2], _without_watch_hooks(rv[2]), *rv[3:])
        return rv

    def __reduce__(self) -> tuple[Any, ...]:  # copied on its own (vars(model) pickled by hand)
        return (_resolve_inert, ())


def _protect(module: nn.Module) -> None:
    """Make ``module`` pickle and copy without the watcher's hooks (idempotent, shared by watchers)."""
    if "__reduce_ex__" not in vars(module):
        object.__setattr__(module, "__reduce_ex__", _DropWatchHooks(module))


def _unprotect(module: nn.Module) -> None:
    """Undo :func:`_protect` once no watcher hook is left on ``module`` (another watcher may remain)."""
    if not isinstance(vars(module).get("__reduce_ex__"), _DropWatchHooks):
        return
    if any(
        isinstance(h, _Hook)
        for name, v in vars(module).items()
        if name.startswith("_") and isinstance(v, dict)
        for h in v.values()
    ):
        return
    object.__delattr__(module, "__reduce_ex__")


# ---------------------------------------------------------------------------------- loop facts
@dataclasses.dataclass
class LoopFacts:
    """What the watcher has learned about the structure of the user's loop.

    Attributes
    ----------
    backwards
        Backward passes that reached the watched model's parameters.
    steps
        Optimizer steps seen.
    backwards_without_step
        Consecutive gradient resets that each discarded gradients no
        optimizer step had consumed (a loop that forgot ``step()``); gradients
        produced after a step and reset before the next one (a GAN generator
        step through the discriminator) do not count, nor do the resets inside
        ``optimizer.step(closure)``.
    stale_steps
        Consecutive optimizer steps that applied gradients added onto
        gradients an earlier step had already applied (never zeroed).
    accumulating
        The latest backward pass added to gradients of the same window with
        no step in between (deliberate accumulation over micro-batches).
    clip_ratio
        Gradient norm at ``optimizer.step()`` divided by the norm right after
        backward (measured on a schedule): ~1 without clipping.
    val_losses
        Losses computed without gradient (validation) since the last step.
    steps_before_backward
        Consecutive optimizer steps taken with no gradient on the watched
        parameters while the iteration's loss still waited for its backward
        pass (``optimizer.step()`` called before ``loss.backward()``).
    """

    backwards: int = 0
    steps: int = 0
    backwards_without_step: int = 0
    stale_steps: int = 0
    accumulating: bool = False
    clip_ratio: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[float] = dataclasses.field(default_factory=list)
    steps_before_backward: int = 0


@dataclasses.dataclass(slots=True)
class _Term:
    """A criterion output (or a loss given to ``record_loss``) that trains the watched model."""

    value: torch.Tensor  # detached scalar
    args: tuple[Any, ...]  # the criterion's inputs, detached (no graph is kept alive)
    reached: list[str] | None  # parameters its graph reaches (on the reach schedule only)
    explicit: bool  # given to record_loss(): it replaces the criterion terms of its pass
    backpropagated: bool = False  # its backward hook fired


@dataclasses.dataclass(slots=True)
class _Pass:
    """One backward pass as the hooks see it (between two boundaries: a forward, a step, ...)."""

    #: Loss terms whose backward hook fired in this pass, with the gradient that reached them.
    terms: list[tuple[_Term, torch.Tensor | None]] = dataclasses.field(default_factory=list)
    tokens: set[int] = dataclasses.field(default_factory=set)
    #: Hooked parameters whose gradient this pass produced.
    seen: set[int] = dataclasses.field(default_factory=set)
    #: A hooked parameter's gradient hook fired: the pass trains the watched model.
    confirmed: bool = False
    #: Inside ``optimizer.step()`` (a closure's pass): its gradients are that step's.
    in_step: bool = False


class Watcher(FindingsMixin, ControlsMixin):
    """Tracks a training loop the user writes; see :func:`watch`.

    The loss of a step (``history.loss``) is what the step's gradients were
    computed from. Within one backward pass, the terms of the criterion that
    the pass backpropagates combine with their weights in the objective (read
    from the gradient that reaches each term): ``crit(o1, y) + 0.3 * crit(o2,
    y)`` records exactly that sum. A factor common to all terms of the pass
    is left out, so the value stays on the criterion's own scale whatever the
    loop multiplies the loss by (``loss / accumulation_steps``, a
    ``GradScaler``'s scale, a sign). Over the passes whose gradients one step
    applies (micro-batches of gradient accumulation, a GAN discriminator's
    real and fake passes) the step's loss is their mean; for
    ``optimizer.step(closure)`` it is the closure's first evaluation (what
    LBFGS returns). A loss passed to :meth:`record_loss` replaces the
    criterion terms of its pass. NaN when no loss was seen.

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
    diagnostic_errors
        Failures inside tlwidgets itself (a hook, a statistic, a rule): kept
        here and logged, never raised into the user's loop.
    distributed
        Under ``torch.distributed`` with more than one rank, this rank's
        :class:`~tlwidgets.core.distributed.RankSync` (rank 0's findings and
        history then cover every rank); ``None`` in a single process, or with
        ``sync_ranks=False`` (each rank watched alone: models that differ by
        design per rank, or no collective wanted at all).
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
        sync_ranks: bool = True,
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
        self._grad_handles: list[Any] = []
        self._closed = False
        self._failures: collections.Counter[str] = collections.Counter()
        self._last_inputs: Any = None
        self._suspended = False  # see suspended()
        self._val_inputs: Any = None  # the last no-grad forward's inputs (validation), for the data audits
        self._fwd_rng: torch.Tensor | None = None
        self._loss_value = math.nan
        self._pending_forward: StageRecord | None = None
        self._param_ids = frozenset(id(p) for p in self.tracker.params)
        # Loss terms and backward passes.
        self._tokens = itertools.count()
        self._terms: collections.OrderedDict[int, _Term] = collections.OrderedDict()
        self._pass: _Pass | None = None
        self._outputs: collections.deque[weakref.ref[torch.Tensor]] = collections.deque(maxlen=8)
        # Gradient windows (reset to reset) and the step in progress.
        self._last_fp: dict[int, tuple[int, int]] = {}  # hooked param -> (id, version) of the grad we left
        self._win_passes = 0  # passes since the last reset
        self._win_steps = 0  # steps since the last reset
        self._passes_since_step = 0
        self._contaminated = False  # a pass since the last step added to gradients a step had applied
        self._in_step = False
        #: Nesting of optimizer.step() calls under way: a subclass whose step() calls
        #: super().step() fires the step hooks at both levels (torch wraps each class's step).
        self._step_depth = 0
        #: The pre-step hook snapshotted the weights for this step's update statistics.
        self._snapshot_taken = False
        #: The gradient that reached the loss in each recent pass (0-d tensors, read only when a rule
        #: asks: 1 without loss scaling, GradScaler's scale with it).
        self._loss_grads: collections.deque[torch.Tensor] = collections.deque(maxlen=LOSS_GRADS_KEPT)
        self._step_closure = False
        self._window_values: list[float] = []  # losses of the passes since the last reset or step
        self._step_values: list[float] = []  # ... as they were when the step began
        self._instep_values: list[float] = []  # losses of the passes inside optimizer.step(closure)
        self._instep_recorded = False
        # Clipping measurement.
        self._clip_pre: list[torch.Tensor | None] = []
        self._measure_clip = False
        self._clip_handles: list[Any] = []
        self._hooked: list[int] = []
        #: This rank's share of a distributed run (None in a single process: nothing runs, nothing costs).
        self.distributed: RankSync | None = None
        self._sync_ranks_option = sync_ranks
        self._install()
        self._refresh_audit()

    # ------------------------------------------------------------------ failures
    def _internal_error(self, where: str, exc: BaseException) -> None:
        """A failure inside tlwidgets: log it (with the traceback the first time), keep it, go on."""
        self._failures[where] += 1
        if self._failures[where] == 1:
            log.warning(
                "tlwidgets.watch: %s failed (%s: %s); your loop continues, tracking of it is degraded",
                where,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        else:
            log.debug("tlwidgets.watch: %s failed again: %s", where, exc)
        self.diagnostic_errors.append(f"watch {where}: {type(exc).__name__}: {exc}")
        del self.diagnostic_errors[:-_MAX_DIAGNOSTIC_ERRORS]

    def _hook(self, fn: Callable[..., Any], where: str) -> _Hook:
        return _Hook(fn, self, where)

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        opt = self.optimizer
        self._handles.append(
            opt.register_step_pre_hook(self._hook(self._on_pre_step, "optimizer pre-step hook"))
        )
        self._handles.append(
            opt.register_step_post_hook(self._hook(self._on_post_step, "optimizer post-step hook"))
        )
        self._handles.append(
            self.model.register_forward_pre_hook(self._hook(self._on_model_pre, "model forward pre-hook"))
        )
        self._handles.append(
            self.model.register_forward_hook(self._hook(self._on_model_post, "model forward hook"))
        )
        _protect(self.model)
        if self.loss_fn is not None:
            self._handles.append(self.loss_fn.register_forward_hook(self._hook(self._on_loss, "loss hook")))
            _protect(self.loss_fn)
        self._hook_params()
        self._clip_pre = [None] * len(self.named_params)
        try:
            self.distributed = attach(self) if self._sync_ranks_option else None
        except Exception as exc:  # a half-initialized process group: watch this rank alone
            self._internal_error("distributed setup", exc)
        if self.distributed is not None:
            inner = self.distributed.forward_module  # DDP's .module: its buffers as DDP broadcast them
            self._handles.append(
                inner.register_forward_pre_hook(self._hook(self.distributed.on_forward, "distributed hook"))
            )
            _protect(inner)
            self._extra_protected = inner

    def _hook_params(self) -> None:
        """Gradient hooks on a few trainable parameters the optimizer holds, spread over the model.

        Only parameters a step can consume tell whether the loop steps and
        zeroes; picked again when ``requires_grad`` changes (a frozen one no
        longer gets gradients, so its hooks would see nothing).
        """
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        params = self.tracker.params
        in_opt = optimizer_param_ids(self.optimizer)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        candidates = [i for i in trainable if id(params[i]) in in_opt] or trainable
        pick = (
            np.unique(np.linspace(0, len(candidates) - 1, min(_HOOKED_PARAMS, len(candidates))).astype(int))
            if candidates
            else []
        )
        self._hooked = [candidates[j] for j in pick]
        for i in self._hooked:
            p = params[i]
            self._grad_handles.append(
                p.register_hook(self._hook(functools.partial(self._on_param_grad, i), "gradient hook"))
            )
            self._grad_handles.append(
                p.register_post_accumulate_grad_hook(
                    self._hook(functools.partial(self._on_param_accumulated, i), "gradient hook")
                )
            )

    def _start_clip_measure(self) -> None:
        """Hook every trainable parameter's gradient for this pass (on a schedule: a hook per
        parameter costs a Python call per parameter and step, so they exist only when used)."""
        self._measure_clip = True
        if self._clip_handles:
            return
        self._clip_handles = [
            p.register_post_accumulate_grad_hook(
                self._hook(functools.partial(self._on_clip_grad, i), "clip-measurement hook")
            )
            for i, (_, p) in enumerate(self.named_params)
            if p.requires_grad
        ]

    def _stop_clip_measure(self) -> None:
        self._measure_clip = False
        for h in self._clip_handles:
            h.remove()
        self._clip_handles = []

    def _on_clip_grad(self, i: int, p: torch.Tensor) -> None:
        if self._measure_clip and p.grad is not None and not p.grad.is_sparse:
            view = self.tracker.stats.sampler.sample(i, p.grad)
            self._clip_pre[i] = torch.linalg.vector_norm(view.detach().float())

    # ------------------------------------------------------------------ backward passes
    def _on_param_grad(self, i: int, grad: torch.Tensor) -> None:
        """A hooked parameter is about to receive its gradient (before accumulation)."""
        p = self._pass
        if p is not None and i in p.seen:  # seen twice: a new pass (retain_graph, no forward between)
            self._finish_pass()
            p = None
        if p is None:
            p = self._pass = _Pass()
        if not p.confirmed:
            p.confirmed = True
            p.in_step = self._in_step
            self._begin_pass(i)
        p.seen.add(i)

    def _on_param_accumulated(self, i: int, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._last_fp[i] = (id(param.grad), param.grad._version)

    def _begin_pass(self, i: int) -> None:
        """A pass reaches the watched model: how did the loop treat the gradients since the last one?

        Looks at the first hooked parameter the pass reaches, before its
        gradient is accumulated: is it the very tensor, unmodified, that we
        last saw (after the previous accumulation or step)? If not, the
        gradients were reset (set to None, zeroed in place, overwritten).
        """
        loop = self.loop
        g = self.tracker.params[i].grad
        fp = self._last_fp.get(i)
        reset = g is None or fp is None or fp != (id(g), g._version)
        if not reset and self._win_steps and not self._in_step and g.layout == torch.strided:
            # About to count stale gradients: make sure they are not zeros written without a
            # version bump (p.grad.data.zero_(), an old idiom). One reduction, only in this case.
            reset = not bool(g.any())
        if reset:
            if self._win_passes and not self._in_step:
                # The reset discards this window: unconsumed if no step ran in it.
                loop.backwards_without_step = 0 if self._win_steps else loop.backwards_without_step + 1
            self._win_passes = self._win_steps = 0
            self._contaminated = False
            self._window_values.clear()
            loop.accumulating = False
        elif self._win_steps:
            # Adds onto gradients a step already applied; a reset before the next step makes
            # it harmless (a GAN's generator step through the discriminator), so this is only
            # counted when a step consumes it (_on_pre_step).
            self._contaminated = self._contaminated or not self._in_step
        else:
            loop.accumulating = True
        self._win_passes += 1
        self._passes_since_step += 1
        loop.backwards += 1
        if self.tracker.measuring(self.global_step) or loop.stale_steps or loop.backwards_without_step:
            self._diagnose_loop()

    def _on_term_grad(self, token: int, grad: torch.Tensor) -> None:
        """Backward reached a loss term: it belongs to the pass under way."""
        term = self._terms.get(token)
        if term is None:
            return
        term.backpropagated = True
        p = self._pass
        if p is not None and token in p.tokens:  # the same loss backpropagated again: a new pass
            self._finish_pass()
            p = None
        if p is None:
            p = self._pass = _Pass()
        p.terms.append((term, grad.detach() if isinstance(grad, torch.Tensor) else None))
        p.tokens.add(token)

    def _finish_pass(self) -> None:
        """The pass under way is over (a forward, a criterion call, a step, the loop's end): record it."""
        p, self._pass = self._pass, None
        forward, self._pending_forward = self._pending_forward, None
        if p is None or not p.confirmed:
            return  # it never reached the watched model (a probe, a detached branch, validation)
        try:
            value, main, reached = self._pass_loss(p)
        except Exception as exc:
            self._internal_error("loss value", exc)
            return
        if value is not None:
            (self._instep_values if p.in_step else self._window_values).append(value)
            self._loss_value = value
        if main is not None and not p.in_step:
            grad = next((g for t, g in p.terms if t is main), None)
            if isinstance(grad, torch.Tensor) and grad.numel() == 1:
                self._loss_grads.append(grad)
        if p.in_step:  # optimizer.step(closure): record the closure's first evaluation only
            if self._instep_recorded:
                return
            self._instep_recorded = True
        if value is not None and main is not None:
            try:  # the facts may fail (an odd batch); the loop bookkeeping above must not
                self._confirm_training_loss(value, main, reached, len(p.terms), forward)
            except Exception as exc:
                self._internal_error("loss and batch facts", exc)

    def _pass_loss(self, p: _Pass) -> tuple[float | None, _Term | None, list[str] | None]:
        """The pass's loss, the term whose inputs describe it (the largest weight), and what it reaches."""
        terms = [(t, g) for t, g in p.terms if t.explicit] or p.terms
        if not terms:
            return None, None, None
        reached_lists = [t.reached for t, _ in terms if t.reached is not None]
        reached = sorted(set().union(*reached_lists), key=self._param_order.get) if reached_lists else None
        if len(terms) == 1:
            return float(terms[0][0].value), terms[0][0], reached
        # Several terms: weigh each by the gradient that reached it (d objective / d term),
        # relative to the largest, so a factor common to all of them is left out.
        one = torch.ones((), device=terms[0][0].value.device)
        host = to_host(  # values and weights in one transfer
            [t.value.float().reshape(()) for t, _ in terms]
            + [g.float().reshape(()) if g is not None and g.numel() == 1 else one for _, g in terms]
        )
        values, weights = host[: len(terms)], host[len(terms) :]
        big = int(np.argmax(np.abs(np.where(np.isfinite(weights), weights, 0.0))))
        if not (math.isfinite(weights[big]) and weights[big] != 0.0 and np.isfinite(weights).all()):
            weights, big = np.ones(len(terms)), 0
        value = float(np.sum(values * (weights / weights[big])))
        return value, terms[big][0], reached

    @functools.cached_property
    def _param_order(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.param_names)}

    # ------------------------------------------------------------------ forward and loss
    def _on_model_pre(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            # Validation inputs, for the data audits (with the loss's targets).
            if "val" in self._tapped_splits:
                self._val_inputs = args[0] if len(args) == 1 else args
            return
        self._finish_pass()  # a new forward: the previous backward is over
        if self._step_depth and not self._step_closure:
            # The step under way raised (no post-step hook ran): it is over, and it applied nothing.
            self._step_depth = 0
            self._in_step = False
        if self.tracker.probe.active:  # left by a forward that raised: do not measure two at once
            self.tracker.probe.stop()
        params = self.tracker.params
        step = self.global_step
        # A hooked parameter frozen by hand (its flag changed since the last forward: the tracker
        # compares them all anyway, so a healthy step looks at the hooked ones only then), or none
        # hooked while some are trainable: hook again.
        changed = self.tracker.note_trainable(step)
        if (changed and any(not params[i].requires_grad for i in self._hooked)) or (
            not self._hooked and any(p.requires_grad for p in params)
        ):
            self._hook_params()  # frozen or unfrozen by hand
        self._last_inputs = args
        self._fwd_rng = torch.default_generator.get_state()  # (torch.get_rng_state, a frame less)
        if not self.tracker.measuring(step):
            return
        if self.tracker.activations_due(step):
            self.tracker.probe.start()
        if step < 5 or step % 10 == 0:
            self._start_clip_measure()

    def _on_model_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        # The outputs, weakly: a criterion called on one of them is the model's loss without a
        # walk of its graph (the common case; anything else is checked by reaches_any).
        self._outputs.extend([weakref.ref(t) for _, t in tensors_in(output)[:4]])
        acts = self.tracker.finish_activations(self.global_step) if self.tracker.probe.active else {}
        if not self.tracker.measuring(self.global_step):
            self._pending_forward = None
            return
        rec = self.recorder.new(Stage.FORWARD)
        self.recorder.forward(
            rec,
            output,
            training=module.training,
            eval_modules=self.recorder.eval_modules(module),
            activations=acts,
            summarize_output=bool(acts),  # on the activation schedule, as the Runner does
            exact=False,
        )
        # Only a forward whose loss is backpropagated is training (validation
        # under eval() without no_grad() is not): committed in _finish_pass.
        self._pending_forward = rec

    def _on_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.numel() != 1:
            return
        if not torch.is_grad_enabled() or not output.requires_grad:
            self.loop.val_losses.append(float(output.detach()))
            if self._val_inputs is not None and len(args) > 1 and "val" in self._tapped_splits:
                self._show_batch("val", self._val_inputs, args[1])
                self._val_inputs = None
            return
        if self._pass is not None and self._pass.confirmed:
            self._finish_pass()  # a new criterion call: the backward before it is over
        self._note_term(output, args, explicit=False)

    def loss_scales(self, n: int) -> list[float]:
        """The gradient that reached the training loss in each of the last ``n`` backward passes,
        oldest first (at most ``LOSS_GRADS_KEPT``).

        1.0 in a plain loop; under ``torch.amp.GradScaler`` it is the loss scale
        (``scaler.scale(loss).backward()``), which the scaler halves after every
        step it skips because the gradients overflowed.
        """
        kept = list(self._loss_grads)[-n:] if n > 0 else []
        if not kept:
            return []
        return [float(v) for v in torch.stack([g.detach().reshape(()).float() for g in kept]).cpu().tolist()]

    def record_loss(self, loss: torch.Tensor) -> None:
        """Tell the watcher the loss of this iteration (when ``loss_fn`` is a plain function).

        Call it with the scalar loss before (or right after) ``loss.backward()``.
        It replaces the criterion terms of its backward pass, so it also sets
        the recorded value when ``loss_fn`` is hooked too (e.g. a weighted sum
        of several losses).
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("record_loss() takes the scalar loss tensor")
        if self._closed:
            return
        try:
            if not loss.requires_grad:
                self.loop.val_losses.append(float(loss.detach()))
                return
            p = self._pass
            if p is not None and p.confirmed and not any(t.explicit for t, _ in p.terms):
                # Called after backward(): the pass under way is the one it belongs to.
                p.terms.append((_Term(loss.detach(), (), None, True), None))
                return
            self._note_term(loss, (), explicit=True)
        except Exception as exc:
            self._internal_error("record_loss", exc)

    def _from_model_output(self, args: Any) -> bool:
        """The criterion's first input is an output of a recent forward of the watched model."""
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        # (Newest first: the criterion is most often called on the forward just before it.)
        return (
            first is not None and first.requires_grad and any(r() is first for r in reversed(self._outputs))
        )

    def _note_term(self, output: torch.Tensor, args: Any, *, explicit: bool) -> None:
        """Remember a loss term of the watched model until its backward pass (hooked on the tensor)."""
        step = self.global_step
        reached = None
        if self.recorder.occasional(step):
            reached = reached_params(output, self.named_params)
            if not reached and not explicit:
                return  # its graph does not reach the model (a probe on detached features)
        elif not explicit and not self._from_model_output(args) and not reaches_any(output, self._param_ids):
            return
        token = next(self._tokens)
        detached = tuple([a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        self._terms[token] = _Term(output.detach(), detached, reached, explicit)
        while len(self._terms) > _MAX_PENDING_TERMS:
            self._terms.popitem(last=False)
        output.register_hook(self._hook(functools.partial(self._on_term_grad, token), "loss backward hook"))

    def _confirm_training_loss(
        self,
        value: float,
        main: _Term,
        reached: list[str] | None,
        terms: int,
        forward: StageRecord | None,
    ) -> None:
        """A pass backpropagated this loss into the model: it is a training loss; record LOSS and FETCH."""
        step = self.global_step
        if self._tapped_splits and self._last_inputs is not None:  # the data audits' sample
            batch = self._last_inputs[0] if len(self._last_inputs) == 1 else self._last_inputs
            self._show_batch("train", batch, main.args[1] if len(main.args) > 1 else None)
        if math.isfinite(value) and not self.tracker.measuring(step):
            return
        rec = self.recorder.new(Stage.LOSS)
        args = main.args
        out = args[0] if len(args) > 0 and isinstance(args[0], torch.Tensor) else None
        target = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        # reached: measured when the term was computed (the graph is not kept until now)
        self.recorder.loss(
            rec, value, out, target, loss_fn=self.loss_fn, measured=True, terms=terms, reached=reached
        )
        inputs = (
            self._last_inputs[0] if self._last_inputs and len(self._last_inputs) == 1 else self._last_inputs
        )
        finite = math.isfinite(value)
        fetch = self.recorder.new(Stage.FETCH)
        self.recorder.fetch(
            fetch, inputs, target, exact=False, stats=self.tracker.details_due(step) or not finite
        )
        if not finite:
            args_in = self._last_inputs
            rec.findings.extend(
                self.recorder.non_finite_loss_findings(
                    rec,
                    value,
                    fetch=fetch,
                    inputs=inputs,
                    targets=target,
                    forward=forward,
                    model=self.model if args_in is not None else None,
                    rerun=(lambda: self.model(*args_in)) if args_in is not None else None,
                    rng=self._fwd_rng,
                )
            )
        for r in (fetch, forward, rec):
            if r is not None:
                self.recorder.commit(r)

    # ------------------------------------------------------------------ optimizer steps
    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._step_depth += 1
        if self._step_depth > 1:
            return  # the inner call of a nested step(): one optimizer step
        # torch passes the step's own args (self first): step(closure) or step(closure=...)
        self._step_closure = (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None
        measuring = self._snapshot_taken = self.tracker.measuring(self.global_step)
        try:
            self._finish_pass()
            # The iteration's loss still waits for its backward and no gradient is there: the step
            # comes before loss.backward() (the gradients it computes are cleared unused).
            # (The gradients are looked at only when a loss waits: not on every step of a healthy loop.)
            params = self.tracker.params
            early = (
                any(not t.backpropagated for t in self._terms.values())
                and bool(self._hooked)
                and all(params[i].grad is None for i in self._hooked)
            )
            self.loop.steps_before_backward = self.loop.steps_before_backward + 1 if early else 0
            self._in_step = True
            self._instep_recorded = False
            self._instep_values.clear()
            self._step_values = list(self._window_values)
            loop = self.loop
            if self._passes_since_step:  # the step applies gradients produced since the last one
                stale_before = loop.stale_steps
                loop.stale_steps = loop.stale_steps + 1 if self._contaminated else 0
                self._contaminated = False
                if loop.stale_steps or stale_before:
                    self._diagnose_loop()
            if not measuring:
                self.tracker.skip_grads()
                return
            self._record_backward()
        finally:
            # On a measured step, snapshot even after a failure above, so the post-step hook can
            # measure the update; an unmeasured step needs none (its row holds no statistics).
            if measuring:
                self.tracker.stats.before_step(exact=False)

    def _record_backward(self) -> None:
        """The BACKWARD record at ``optimizer.step()``: the gradients the step is about to apply."""
        rec = self.recorder.new(Stage.BACKWARD)
        self.recorder.backward(rec, exact=None, loss=self._loss_value, when=" at optimizer.step()")
        if self._measure_clip:
            before = {i: t for i, t in enumerate(self._clip_pre) if t is not None}
            ratio = self.recorder.clip_ratio(rec, before)
            if ratio is not None and math.isfinite(ratio) and ratio > 0:
                self.loop.clip_ratio.append(ratio)
                del self.loop.clip_ratio[:-50]
            self._clip_pre = [None] * len(self._clip_pre)
            self._stop_clip_measure()
        self.recorder.commit(rec)

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._step_depth = max(0, self._step_depth - 1)
        if self._step_depth:
            return  # the inner call of a nested step() ended; the outer one is the step
        self._finish_pass()  # the last pass of a closure
        self._end_step()
        if self.distributed is not None:
            self._sync_ranks()
        # Only where the pre-step hook took the snapshot: a phase made dense in between (a rank
        # sync) starts at the next step, not with an update measured against an old snapshot.
        measured = self._snapshot_taken and self.tracker.measuring(self.global_step)
        self._snapshot_taken = False
        try:
            numbers = self.tracker.record_step(
                step=self.global_step + 1,
                epoch=self.epoch,
                loss=self._loss_value,
                exact=False,
                measured=measured,
            )
        finally:
            self.global_step += 1  # counted even when the statistics failed
        if self.loop.val_losses:
            self.loop.val_losses.clear()
        if not measured:
            self._emit_step(numbers["lr"])
            return
        rec = self.recorder.new(Stage.STEP, step=self.global_step - 1)
        self.recorder.step(rec, numbers, measured=True, update_exact=False)
        self.recorder.commit(rec)
        self._publish(self._diagnose("on_step"))
        self._emit_step(numbers["lr"])

    def _end_step(self) -> None:
        """Loop bookkeeping of a finished step: it consumed the window's gradients; its loss."""
        self._in_step = False
        self._win_steps += 1
        self._passes_since_step = 0
        self.loop.steps += 1
        self.loop.backwards_without_step = 0
        if self._step_values:
            self._loss_value = sum(self._step_values) / len(self._step_values)
        elif self._instep_values:
            self._loss_value = self._instep_values[0]  # what optimizer.step(closure) returns
        else:
            self._loss_value = math.nan  # no loss seen for this step
        self._step_values, self._window_values, self._instep_values = [], [], []
        self._terms.clear()
        params = self.tracker.params
        for i in self._hooked:
            g = params[i].grad
            if g is not None:
                self._last_fp[i] = (id(g), g._version)  # after the step (it may modify them in place)
            else:
                self._last_fp.pop(i, None)

    def _sync_ranks(self) -> None:
        """A distributed run's sync step: the loss averaged over the ranks, the other ranks' findings."""
        sync = self.distributed
        try:
            self._loss_value = sync.on_step(self.global_step, self._loss_value)
        except Exception as exc:  # the sync stopped itself (RankSync.stopped); this rank goes on
            self._internal_error("distributed sync", exc)
        FindingsMixin._publish(self, sync.take_remote())

    def _publish(self, findings: Iterable[Finding]) -> None:
        # Rank 0 names the other ranks that raised the same finding (DDP: see core/distributed.py).
        sync = getattr(self, "distributed", None)  # (a subclass may publish before __init__ sets it)
        super()._publish(sync.own(findings) if sync is not None else findings)

    def _emit_step(self, lrs: list[float]) -> None:
        self.recorder.announce_step(batch=0, loss=self._loss_value, lrs=lrs, exact=False, duration_s=0.0)

    def _diagnose_loop(self) -> None:
        self._publish(self._diagnose("on_stage", self.recorder.loop_event(self.loop)))

    # ------------------------------------------------------------------ findings
    def finish(self, *, interrupted: bool = False) -> None:
        """Final checks (the loop ended): e.g. backward passes that never led to a step.

        ``interrupted=True`` (an exception ended the ``with`` block): the loop
        did not run to its end, so a step that did not come yet is not missing.
        """
        self._finish_pass()
        if not interrupted and self.loop.backwards and not self.loop.steps:
            self.loop.backwards_without_step = max(self.loop.backwards_without_step, self.loop.backwards)
        on_end = getattr(self.diagnoser, "on_end", None)
        if not interrupted and callable(on_end):  # the data audits' samples are as complete as they get
            self._publish(self._diagnose("on_end"))
        self._diagnose_loop()
        sync = self.distributed
        if sync is not None and sync.stopped is None:
            if interrupted:  # never a collective after an exception: the other ranks may not come
                sync.leave("this rank's loop ended with an exception")
                return
            seen = sync.comparisons
            try:  # the findings of the loop's end reach rank 0; a last look at the replicas
                sync.on_finish(self.global_step, self._loss_value)
            except Exception as exc:
                self._internal_error("distributed sync", exc)
            FindingsMixin._publish(self, sync.take_remote())
            if sync.comparisons != seen:
                self._diagnose_loop()  # the rank-divergence loop rule reads the last comparison

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove every hook (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_clip_measure()
        for h in self._handles + self._grad_handles:
            h.remove()
        self._handles, self._grad_handles = [], []
        self._pass, self._pending_forward = None, None
        self._terms.clear()
        if self.distributed is not None and self.distributed.stopped is None:
            self.distributed.leave("the watcher was closed")
        for m in (self.model, self.loss_fn, getattr(self, "_extra_protected", None)):
            if m is not None:
                try:
                    _unprotect(m)
                except Exception as exc:
                    self._internal_error("close", exc)
        self.tracker.close()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Hooks do nothing inside: for tlwidgets' own forward/backward probes of the model (the data
        audits' batch-mixing and dropout probes), which are not steps of the user's loop."""
        was, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = was

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this watcher is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if not self._closed:
                self.finish(interrupted=exc_type is not None)
        except Exception as err:  # never replace the user's exception (or raise after a clean loop)
            self._internal_error("finish", err)
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "watching"
        return f"Watcher({state}, step={self.global_step}, findings={len(self._log)})"


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any = None, **options: Any) -> Watcher:
    """Track the user's own training loop; use as ``with tlw.watch(model, opt, loss_fn=crit) as w:``.

    The loop stays unchanged. Hooks: the optimizer's step pre/post hooks, the
    model's forward (pre-)hooks, a forward hook on ``loss_fn`` (an
    ``nn.Module``) and gradient hooks on the parameters. Validation under
    ``torch.no_grad()`` is not counted as training; a backward pass counts
    only when it reaches the model's parameters (see the module docstring for
    how loops are read). Findings are complete when the ``with`` block exits
    (or after :meth:`Watcher.finish`); ``close()`` removes the hooks. Nothing
    tlwidgets does inside the hooks raises into the loop, and the model
    pickles, deep-copies and ``torch.save``\\ s as it would unwatched. Options
    are those of :class:`Watcher`.
    """
    return Watcher(model, optimizer, loss_fn, **options)
