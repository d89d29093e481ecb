"""Explicit checks: functions that run a small experiment on the model and return a result.

Rules (:mod:`tlwidgets.diagnostics.rules`) read what training recorded; the
checks here *do* something to find out: sweep the learning rate, overfit one
batch, train against a shuffled-input baseline, differentiate one output with
respect to the other examples of the batch, compare two data sets. Each model
check accepts either a :class:`~tlwidgets.core.runner.Runner` (it uses the
runner's model, loss, optimizer, training data, ``unpack``, ``forward`` and
device) or the parts themselves, and leaves everything as it found it:
weights, buffers (batch-norm statistics), gradients, ``requires_grad`` flags,
module train/eval modes, optimizer state and learning rates, and the global
RNG states are restored bit for bit (:func:`preserved_state`). A Runner's data
position is never touched: the checks iterate the data with their own
iterator and never call ``runner.step()``.

Data-only checks (:func:`check_data_leakage`, :func:`check_train_val_shift`,
:func:`check_channel_order`) live in :mod:`tlwidgets.diagnostics.checks_data`
and are re-exported here.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from tlwidgets.core.activations import first_tensor
from tlwidgets.core.batches import call_model, default_unpack, tensors_in, to_device
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.checkpoint import capture_rng, restore_rng
from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage
from tlwidgets.core.training import compute_loss, evaluate, restore_optimizer, snapshot_optimizer, train_step
from tlwidgets.diagnostics.checks_data import (
    as_batches,
    check_channel_order,
    check_data_leakage,
    check_train_val_shift,
    rng_preserved,
)

__all__ = [
    "LRRangeResult",
    "OverfitResult",
    "Parts",
    "StateSnapshot",
    "check_batch_independence",
    "check_channel_order",
    "check_data_leakage",
    "check_labels_decoupled",
    "check_train_val_shift",
    "gradcheck_function",
    "lr_range_test",
    "overfit_one_batch",
    "preserved_state",
    "resolve_parts",
    "rng_preserved",
]

Unpack = Callable[[Any], tuple[Any, Any]]
Forward = Callable[[nn.Module, Any], Any]


# ====================================================================== state
class StateSnapshot:
    """Everything a check may change, copied (not aliased) so it can be put back exactly.

    Parameters
    ----------
    model
        Its parameters and buffers (values), gradients, ``requires_grad``
        flags and every module's ``training`` flag are saved.
    optimizer
        Optional; its per-parameter state and every group's hyperparameters
        (learning rate included) are saved. Tensors the optimizer holds that
        are not in the model are saved too.
    rng
        Also save the global torch (CPU and CUDA), numpy and Python RNG states.

    Notes
    -----
    :meth:`restore` writes the saved values back *into the same tensor
    objects* (``copy_``), so references held elsewhere (an optimizer, hooks,
    a runner's tracker) stay valid.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, rng: bool = True):
        self.model = model
        self.optimizer = optimizer
        tensors: list[torch.Tensor] = []
        seen: set[int] = set()
        extra = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        for t in [*model.parameters(), *model.buffers(), *extra]:
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        self._values = [(t, t.detach().clone()) for t in tensors]
        params = [t for t in tensors if isinstance(t, nn.Parameter) or t.requires_grad or t.grad is not None]
        self._grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self._requires_grad = [(p, p.requires_grad) for p in params]
        self._modes = [(m, m.training) for m in model.modules()]
        self._opt = snapshot_optimizer(optimizer) if optimizer is not None else None
        self._rng = capture_rng() if rng else None

    def restore(self) -> None:
        """Put every saved value back (idempotent; the snapshot stays usable)."""
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        # A tensor that still holds its saved value is left alone: a copy would bump its version counter,
        # which a watcher reads as the user's loop writing to it (a gradient reset, say).
        with torch.no_grad():
            for t, saved in self._values:
                if t.shape == saved.shape and t.dtype == saved.dtype:
                    if not _same(t, saved):
                        t.copy_(saved)
                else:  # the check cannot resize; a user hook did: put the old tensor back
                    t.data = saved.clone()
            for p, saved in self._grads:
                if saved is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == saved.shape and p.grad.dtype == saved.dtype:
                    if not _same(p.grad, saved):
                        p.grad.copy_(saved)
                else:
                    p.grad = saved.clone()
        for m, mode in self._modes:
            m.training = mode
        if self._opt is not None and self.optimizer is not None:
            restore_optimizer(self.optimizer, self._opt)
        if self._rng is not None:
            restore_rng(self._rng)


class NotBatchFirst(ValueError):
    """The model's output is not one row per example (a sequence-first language model): the per-example
    probes do not apply."""


def _same(t: torch.Tensor, saved: torch.Tensor) -> bool:
    """Bitwise the saved value (NaN included), without writing to ``t``."""
    if t.is_sparse or saved.is_sparse:
        return False
    return (
        bool(torch.equal(t, saved))
        or bool(
            torch.equal(t.isnan(), saved.isnan())
            and torch.equal(torch.nan_to_num(t), torch.nan_to_num(saved))
        )
        if t.is_floating_point()
        else bool(torch.equal(t, saved))
    )


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, rng: bool = True
) -> Iterator[StateSnapshot]:
    """Run a block and then restore the model, optimizer and RNG states exactly.

    Examples
    --------
    >>> with preserved_state(model, optimizer):          # doctest: +SKIP
    ...     optimizer.step()                              # undone on exit
    """
    snap = StateSnapshot(model, optimizer, rng=rng)
    try:
        yield snap
    finally:
        snap.restore()


# ====================================================================== parts
@dataclasses.dataclass
class Parts:
    """What a check trains and how: resolved from a Runner or given explicitly."""

    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    optimizer: torch.optim.Optimizer | None
    data: Any
    unpack: Unpack
    forward: Forward
    device: torch.device | None
    session: Any = None

    @property
    def step(self) -> int | None:
        """The session's global step (for findings), if there is a session."""
        return getattr(self.session, "global_step", None)


def resolve_parts(
    runner_or_model: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: Any = None,
    *,
    need: Sequence[str] = ("loss_fn", "optimizer", "data"),
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> Parts:
    """The model, loss, optimizer and data a check works on.

    Parameters
    ----------
    runner_or_model
        A ``Runner`` (or anything with ``model`` and ``optimizer`` attributes,
        such as a watcher) or an ``nn.Module``.
    loss_fn, optimizer, data
        Explicit parts; they override the session's.
    need
        Which of ``loss_fn``, ``optimizer`` and ``data`` must be present.
    unpack, forward
        Override the session's (or the default) batch splitting and model call.

    Raises
    ------
    TypeError
        When ``runner_or_model`` is neither a module nor a session.
    ValueError
        When a needed part is missing, or the session's data is a one-shot
        iterator that a check would consume.
    RuntimeError
        When the runner is running, or mid-step between FORWARD and STEP (its
        pending autograd graph would be invalidated): finish the step first.
    """
    session = None
    if isinstance(runner_or_model, nn.Module):
        model = runner_or_model
    elif isinstance(getattr(runner_or_model, "model", None), nn.Module):
        session = runner_or_model
        model = session.model
        loss_fn = loss_fn if loss_fn is not None else getattr(session, "loss_fn", None)
        optimizer = optimizer if optimizer is not None else getattr(session, "optimizer", None)
        if data is None:
            data = getattr(session, "train_data", None)
            if isinstance(data, collections.abc.Iterator):  # iter() on a DataLoader would draw from the RNG
                raise ValueError(
                    "the runner's train_data is a one-shot iterator that a check would consume; "
                    "pass data= explicitly (a list of batches or a DataLoader)"
                )
        if getattr(session, "running", False):
            raise RuntimeError("pause the run before running a check (runner.pause())")
        if getattr(session, "kind", None) == "runner" and session.stage in (Stage.LOSS, Stage.BACKWARD):
            raise RuntimeError(
                f"the runner is mid-step (next stage: {session.stage.value}) and holds an autograd graph "
                "that a check would invalidate; finish the batch with runner.step() first"
            )
        if unpack is None and getattr(session, "kind", None) == "runner":
            unpack = session.unpack
        if forward is None and getattr(session, "kind", None) == "runner":
            forward = session.forward
    else:
        raise TypeError(
            f"expected a tlwidgets Runner or a torch.nn.Module, got {type(runner_or_model).__name__}"
        )
    missing = [
        name
        for name, v in (("loss_fn", loss_fn), ("optimizer", optimizer), ("data", data))
        if name in need and v is None
    ]
    if missing:
        raise ValueError(f"this check needs {', '.join(missing)}: pass a Runner or give them as arguments")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    device = getattr(session, "device", None)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else None
    return Parts(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        data=data,
        unpack=unpack or default_unpack,
        forward=forward or call_model,
        device=device,
        session=session,
    )


class _Stream:
    """Endless ``(inputs, targets)`` on the device, re-iterating the data at its end."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.batches = as_batches(parts.data, parts.unpack)
        self._it: Iterator[tuple[Any, Any]] | None = None

    def next(self) -> tuple[Any, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.batches)
            try:
                inputs, targets = next(self._it)
            except StopIteration:
                self._it = None
                continue
            dev = self.parts.device
            return to_device(inputs, dev), to_device(targets, dev)
        raise ValueError("the data produced no batches (empty, or a one-shot iterator already used)")

    def take(self, n: int) -> list[tuple[Any, Any]]:
        """Up to ``n`` batches of one pass over the data (fewer if it ends first)."""
        out = []
        for batch in self.batches:
            out.append(tuple(to_device(b, self.parts.device) for b in batch))
            if len(out) >= n:
                break
        return out


def _loss(parts: Parts, inputs: Any, targets: Any) -> torch.Tensor:
    return compute_loss(parts.model, parts.loss_fn, inputs, targets, parts.forward)


def _train_step(parts: Parts, inputs: Any, targets: Any) -> float:
    """One step of :func:`~tlwidgets.core.training.train_step`; skipped when the loss is not finite."""
    model, opt = parts.model, parts.optimizer
    return train_step(model, parts.loss_fn, opt, inputs, targets, forward=parts.forward, skip_non_finite=True)


def _set_lr(optimizer: torch.optim.Optimizer, groups: Iterable[int], lr: float) -> None:
    for i in groups:
        g = optimizer.param_groups[i]
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def _evaluate(parts: Parts, batches: Sequence[tuple[Any, Any]]) -> float:
    """Mean loss per example over ``(inputs, targets)`` batches (:func:`tlwidgets.core.training.evaluate`)."""
    return evaluate(parts.model, parts.loss_fn, batches, forward=parts.forward)["loss"]


# ====================================================================== LR range test
@dataclasses.dataclass
class LRRangeResult:
    """The curve of an LR range test and the learning rate it suggests.

    Attributes
    ----------
    lrs
        Learning rate of each step (exponentially spaced), as far as the sweep went.
    losses
        Training loss of each step's batch, measured before that step's update.
    smoothed
        ``losses`` smoothed with a bias-corrected exponential moving average (the
        running value the sweep stops on; NaN after a non-finite loss).
    suggestion
        Found on the part of the sweep up to the lowest ``smoothed`` value (the
        divergent tail is left out), smoothed again forwards and backwards so the
        curve does not lag: the smaller of ``steepest_lr`` (where that curve
        descends most steeply per decade of LR) and ``min_loss_lr / 10`` (a tenth
        of the LR at its minimum). Both are common rules; the smaller one is the
        safer choice, because the loss often starts to fall late in a sweep,
        which pushes the steepest point to too high a learning rate. ``None`` when
        no finite loss was recorded.
    per_group
        Optimizer group index -> suggested LR for the groups that were swept.
    min_loss_lr
        The LR where the lag-free smoothed loss is lowest.
    steepest_lr
        The LR at the steepest descent of the lag-free curve (``None`` when it never descends).
    stopped_by
        ``"end"`` (reached ``end_lr``), ``"diverged"`` (the running smoothed loss
        rose above ``diverge_factor`` times its best) or ``"non-finite"``.
    groups
        The swept groups.
    curves
        With ``group="each"``: one result per group (this result is the first group's).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float | None
    per_group: dict[int, float | None]
    min_loss_lr: float | None = None
    steepest_lr: float | None = None
    stopped_by: str = "end"
    groups: tuple[int, ...] = ()
    curves: dict[int, LRRangeResult] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        if self.suggestion is None:
            return f"LR range test: no finite loss in {len(self.lrs)} steps (stopped by {self.stopped_by})"
        per = ""
        if len(self.per_group) > 1 and len(set(self.per_group.values())) > 1:
            per = "; per group: " + ", ".join(f"{g}: {v:.3g}" for g, v in self.per_group.items() if v)
        return (
            f"LR range test over {self.lrs[0]:.3g}..{self.lrs[-1]:.3g} ({len(self.lrs)} steps, stopped by "
            f"{self.stopped_by}): suggested lr {self.suggestion:.3g}{per}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (for JSON or a plot)."""
        return {
            "lrs": self.lrs.tolist(),
            "losses": self.losses.tolist(),
            "smoothed": self.smoothed.tolist(),
            "suggestion": self.suggestion,
            "per_group": dict(self.per_group),
            "min_loss_lr": self.min_loss_lr,
            "steepest_lr": self.steepest_lr,
            "stopped_by": self.stopped_by,
            "groups": list(self.groups),
        }


def _ema(x: np.ndarray, beta: float) -> np.ndarray:
    out = np.empty_like(x)
    avg = 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _zero_lag(x: np.ndarray, beta: float) -> np.ndarray:
    """Forward then backward EMA: smooth without shifting the curve toward higher LRs."""
    if len(x) == 0:
        return x.copy()
    return _ema(_ema(x, beta)[::-1], beta)[::-1].copy()


def _suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(suggestion, min_loss_lr, steepest_lr) from a smoothed curve."""
    n = len(smoothed)
    if n == 0:
        return None, None, None
    i_min = int(np.argmin(smoothed))
    min_lr = float(lrs[i_min])
    skip = min(max(1, n // 20), i_min)  # the first points of a sweep are noisy
    steep = None
    if i_min - skip + 1 >= 3:
        seg = smoothed[skip : i_min + 1]
        slope = np.gradient(seg, np.log10(lrs[skip : i_min + 1]))
        if slope.min() < 0:
            steep = float(lrs[skip + int(np.argmin(slope))])
    # Both classic rules, the cautious one wins: in a sweep, learning often starts late (a GRU,
    # a cold Adam), which pushes the steepest point to too high a learning rate.
    suggestion = min(steep, min_lr / 10) if steep is not None else min_lr / 10
    return suggestion, min_lr, steep


def _group_indices(optimizer: torch.optim.Optimizer, group: int | Sequence[int] | None) -> tuple[int, ...]:
    n = len(optimizer.param_groups)
    if group is None:
        return tuple(range(n))
    idx = (group,) if isinstance(group, int) else tuple(group)
    for i in idx:
        if not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"group must be an index in 0..{n - 1}, None or 'each', got {group!r}")
    return idx


def _sweep(
    parts: Parts,
    groups: tuple[int, ...],
    start_lr: float,
    end_lr: float,
    num_steps: int,
    smooth: float,
    diverge_factor: float,
) -> LRRangeResult:
    beta = 1.0 - smooth
    plan = start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))
    stream = _Stream(parts)
    lrs: list[float] = []
    losses: list[float] = []
    avg, best, stopped = 0.0, math.inf, "end"
    for i, lr in enumerate(plan):
        _set_lr(parts.optimizer, groups, float(lr))
        inputs, targets = stream.next()
        value = _train_step(parts, inputs, targets)
        lrs.append(float(lr))
        losses.append(value)
        if not math.isfinite(value):
            stopped = "non-finite"
            break
        avg = beta * avg + (1 - beta) * value
        running = avg / (1 - beta ** (i + 1))
        best = min(best, running)
        if i > 0 and running > diverge_factor * best:
            stopped = "diverged"
            break
    lr_arr, loss_arr = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = int(np.argmin(np.isfinite(loss_arr))) if not np.isfinite(loss_arr).all() else len(loss_arr)
    smoothed = np.full(len(loss_arr), np.nan)
    smoothed[:finite] = _ema(loss_arr[:finite], beta)
    # The causal EMA lags behind the raw curve, and a divergent tail would leak into any
    # two-sided smoothing: look for the suggestion only up to the lowest running loss, on
    # a lag-free (forward-backward) smoothing of that part.
    # The first points are noisy and carry no information (the LR is still tiny): a lucky low
    # first batch must not be taken as the lowest loss (that would suggest start_lr / 10).
    head = min(max(1, finite // 20), finite - 1) if finite else 0
    cut = head + int(np.argmin(smoothed[head:finite])) + 1 if finite else 0
    suggestion, min_lr, steep = _suggest(lr_arr[:cut], _zero_lag(loss_arr[:cut], beta))
    return LRRangeResult(
        lrs=lr_arr,
        losses=loss_arr,
        smoothed=smoothed,
        suggestion=suggestion,
        per_group={g: suggestion for g in groups},
        min_loss_lr=min_lr,
        steepest_lr=steep,
        stopped_by=stopped,
        groups=groups,
    )


def lr_range_test(
    runner_or_model: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: Any = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.05,
    diverge_factor: float = 4.0,
    group: int | Sequence[int] | str | None = None,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> LRRangeResult:
    """Sweep the learning rate exponentially and record the loss (Smith's LR range test).

    Each step trains on the next batch of ``data`` (cycling) with the LR raised
    geometrically from ``start_lr`` to ``end_lr``; the sweep stops early when
    the running smoothed loss exceeds ``diverge_factor`` times its lowest value
    or the loss is not finite. It uses the user's own optimizer (its kind,
    momentum and weight decay matter for which LR works) and then restores
    weights, buffers, gradients, optimizer state, learning rates, module modes
    and the global RNG states exactly. With a Runner, the runner's data
    position, step count and history are left alone.

    Parameters
    ----------
    runner_or_model
        A ``Runner`` or an ``nn.Module`` (then give ``loss_fn``, ``optimizer``, ``data``).
    loss_fn, optimizer, data
        Explicit parts (override the runner's). ``data``: a ``DataLoader``, any
        iterable of batches, a ``Dataset`` or an ``(X, y)`` pair of tensors.
    start_lr, end_lr
        The LR range, ``0 < start_lr < end_lr``.
    num_steps
        Steps of the sweep (at most; fewer when it diverges).
    smooth
        Weight of the newest loss in the exponential moving average (0..1].
    diverge_factor
        Stop when the smoothed loss exceeds this multiple of its minimum.
    group
        ``None``: every group gets the same swept LR. An index or a sequence of
        indices: only those groups are swept, the others keep their LR.
        ``"each"``: one sweep per group (the others at their LR), with the
        suggestions in ``per_group`` and the curves in ``curves``.
    unpack, forward
        Override how batches are split and the model is called (default: the runner's, or
        ``(inputs, targets)`` batches and ``model(inputs)``).

    Returns
    -------
    LRRangeResult
        ``suggestion`` is the smaller of the steepest-descent LR and a tenth of
        the minimum-loss LR (see :class:`LRRangeResult`); ``steepest_lr`` and
        ``min_loss_lr`` are there too.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 < smooth <= 1:
        raise ValueError(f"smooth must be in (0, 1], got {smooth}")
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}")
    parts = resolve_parts(runner_or_model, loss_fn, optimizer, data, unpack=unpack, forward=forward)
    args = (start_lr, end_lr, num_steps, smooth, diverge_factor)
    if group == "each":
        curves: dict[int, LRRangeResult] = {}
        for g in range(len(parts.optimizer.param_groups)):
            with preserved_state(parts.model, parts.optimizer):
                curves[g] = _sweep(parts, (g,), *args)
        first = curves[0]
        return dataclasses.replace(
            first,
            per_group={g: c.suggestion for g, c in curves.items()},
            groups=tuple(curves),
            curves=curves,
        )
    if isinstance(group, str):
        raise ValueError(f"group must be None, an index, a sequence of indices or 'each', got {group!r}")
    groups = _group_indices(parts.optimizer, group)
    with preserved_state(parts.model, parts.optimizer):
        return _sweep(parts, groups, *args)


# ====================================================================== overfit one batch
@dataclasses.dataclass
class OverfitResult:
    """What :func:`overfit_one_batch` saw.

    Attributes
    ----------
    losses
        Loss on the batch before each step, and after the last one (``steps + 1`` values,
        fewer when the loss became non-finite).
    final_loss, initial_loss
        Last and first of ``losses``.
    passed
        ``final_loss <= target_loss``.
    finding
        Why it failed: ``None`` when it passed, and also when it did not reach the target but the
        loss was still falling clearly (``still_falling``): that is not a bug, only too few steps
        or a cautious learning rate.
    target_loss
        The loss the batch had to reach.
    still_falling
        The loss dropped by more than 10% over the last quarter of the steps.
    """

    losses: np.ndarray
    final_loss: float
    initial_loss: float
    passed: bool
    finding: Finding | None
    target_loss: float = math.nan
    still_falling: bool = False

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        text = (
            f"overfit one batch {verdict}: loss {self.initial_loss:.4g} -> {self.final_loss:.4g} in "
            f"{max(len(self.losses) - 1, 0)} steps (target {self.target_loss:.4g})"
        )
        if not self.passed and self.finding is None and self.still_falling:
            text += "; still falling: give it more steps or a larger lr"
        return text


def _first_batch(parts: Parts, batch: Any) -> tuple[Any, Any]:
    if batch is not None:
        inputs, targets = parts.unpack(batch)
        return to_device(inputs, parts.device), to_device(targets, parts.device)
    return _Stream(parts).next()


def overfit_one_batch(
    runner_or_model: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: Any = None,
    *,
    batch: Any = None,
    steps: int = 100,
    lr: float | None = None,
    target_loss: float | None = None,
    target_ratio: float = 0.1,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> OverfitResult:
    """Train repeatedly on one batch: a model that can learn at all drives its loss toward zero.

    Parameters
    ----------
    runner_or_model
        A ``Runner`` or an ``nn.Module`` (then give ``loss_fn`` and ``optimizer``).
    loss_fn, optimizer, data
        Explicit parts; ``data`` supplies the batch (its first one) unless ``batch`` is given.
    batch
        The batch to overfit, in the layout the data yields (e.g. ``(inputs, targets)``).
    steps
        Optimizer steps on the batch.
    lr
        Learning rate for every group during the check (default: the optimizer's own).
    target_loss
        Loss the batch must reach; default: ``target_ratio`` times the initial loss.
    target_ratio
        Used when ``target_loss`` is not given (default: a tenth of the initial loss).
    unpack, forward
        Override how batches are split and the model is called.

    Returns
    -------
    OverfitResult
        With a finding when it fails (unless the loss is still falling clearly, see
        :class:`OverfitResult`): ``non-finite-loss`` when the loss became
        NaN/Inf, ``lr-too-high`` when it ended above where it started,
        ``lr-too-low`` when the weights barely moved, else ``loss-plateau``
        (the model cannot fit even one batch: a bug in the model or the loss
        wiring is likely). Model, optimizer and RNG states are restored.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    parts = resolve_parts(
        runner_or_model,
        loss_fn,
        optimizer,
        data,
        need=("loss_fn", "optimizer"),
        unpack=unpack,
        forward=forward,
    )
    if batch is None and parts.data is None:
        raise ValueError("give batch= or data= (or a Runner) so there is a batch to overfit")
    with preserved_state(parts.model, parts.optimizer):
        inputs, targets = _first_batch(parts, batch)
        if lr is not None:
            _set_lr(parts.optimizer, range(len(parts.optimizer.param_groups)), lr)
        trainable = [p for p in parts.model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in trainable]
        losses: list[float] = []
        for _ in range(steps):
            value = _train_step(parts, inputs, targets)
            losses.append(value)
            if not math.isfinite(value):
                break
        if math.isfinite(losses[-1]):
            with torch.no_grad():
                losses.append(float(_loss(parts, inputs, targets)))
        moved = math.sqrt(sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(trainable, start)))
        norm = math.sqrt(sum(float(s.pow(2).sum()) for s in start))
    initial, final = losses[0], losses[-1]
    target = target_loss if target_loss is not None else target_ratio * abs(initial)
    passed = math.isfinite(final) and final <= target
    quarter = losses[-1 - max(1, (len(losses) - 1) // 4)]
    still_falling = math.isfinite(final) and final < 0.9 * quarter
    finding = None
    if not passed and not still_falling:
        finding = _overfit_finding(parts, losses, initial, final, target, moved, norm)
    return OverfitResult(
        losses=np.asarray(losses, dtype=float),
        final_loss=final,
        initial_loss=initial,
        passed=passed,
        finding=finding,
        target_loss=target,
        still_falling=still_falling,
    )


def _overfit_finding(
    parts: Parts, losses: list[float], initial: float, final: float, target: float, moved: float, norm: float
) -> Finding:
    n = len(losses) - 1
    per_step = moved / max(norm, 1e-12) / max(n, 1)
    evidence = {
        "initial_loss": initial,
        "final_loss": final,
        "target_loss": target,
        "steps": n,
        "relative_change_per_step": per_step,
    }
    head = f"could not overfit a single batch: loss {initial:.4g} -> {final:.4g} in {n} steps"
    if not math.isfinite(final):
        return make_finding(
            "non-finite-loss",
            f"{head}; the loss became {final} at step {n}",
            step=parts.step,
            evidence=evidence,
        )
    peak = max(losses)
    if final > 1.1 * initial or peak > 2 * initial:
        return make_finding(
            "lr-too-high",
            f"{head}; the loss rose (peak {peak:.4g}) instead of falling",
            step=parts.step,
            evidence=evidence,
        )
    if 0 < per_step < 2e-5 and norm > 0:
        return make_finding(
            "lr-too-low",
            f"{head}; the weights moved only {per_step:.2g} of their norm per step",
            step=parts.step,
            evidence=evidence,
        )
    return make_finding(
        "loss-plateau",
        f"{head} (target {target:.4g})" + ("; the weights did not change at all" if moved == 0 else ""),
        step=parts.step,
        evidence=evidence,
        cause="The model cannot fit even one batch, which points to a bug in the model or the loss wiring "
        "(wrong output for the loss, a detached path, inputs that do not reach the output) rather than to "
        "too little training.",
        fix="Check the output shape and activation against what the loss expects and that the gradient "
        "reaches every layer, then retry with a larger learning rate; a correct model drives one batch's "
        "loss near zero.",
    )


# ====================================================================== labels decoupled
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)({k: _map_tensors(v, fn) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _batch_size(inputs: Any) -> int:
    leaves = [t for _, t in tensors_in(inputs) if t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 0


def _shuffle_inputs(batches: Sequence[tuple[Any, Any]], seed: int) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for inputs, targets in batches:
        n = _batch_size(inputs)
        perm = torch.randperm(n, generator=gen)
        out.append(
            (
                _map_tensors(
                    inputs, lambda t, p=perm, n=n: t[p.to(t.device)] if t.dim() and t.shape[0] == n else t
                ),
                targets,
            )
        )
    return out


def _train_on(parts: Parts, batches: Sequence[tuple[Any, Any]], steps: int) -> float:
    """Train ``steps`` steps cycling over ``batches``; return the last loss."""
    value = math.nan
    for i in range(steps):
        inputs, targets = batches[i % len(batches)]
        value = _train_step(parts, inputs, targets)
        if not math.isfinite(value):
            break
    return value


def check_labels_decoupled(
    runner_or_model: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: Any = None,
    *,
    val_data: Any = None,
    steps: int = 100,
    holdout: int = 4,
    min_gain: float = 0.05,
    max_batches: int = 200,
    seed: int = 0,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> Finding | None:
    """Can the model beat a baseline that ignores the inputs?

    Trains the model twice for ``steps`` steps from the same starting state:
    once on the data as it is, once with the inputs shuffled across the
    examples of each batch (an input-independent baseline: it can only learn
    the label distribution). Both are then scored on held-out batches of real
    ``(input, label)`` pairs. When the real run is not at least ``min_gain``
    (relative) better than the baseline, the labels carry no usable
    information about the inputs (``labels-decoupled``). State is restored
    after each run.

    Parameters
    ----------
    runner_or_model, loss_fn, optimizer, data
        As in :func:`lr_range_test`.
    val_data
        Held-out data to score on; default: the last ``holdout`` batches of one
        pass over ``data`` (not trained on).
    steps
        Optimizer steps of each run.
    holdout
        Batches held out when ``val_data`` is not given.
    min_gain
        Required relative improvement ``(baseline - real) / baseline``.
    max_batches
        Batches read from ``data`` (one pass at most).
    seed
        Seed of the input shuffle.
    unpack, forward
        Override how batches are split and the model is called.

    Returns
    -------
    Finding or None
        ``labels-decoupled`` (error), or ``None`` (also when a loss is not
        finite: then other findings explain why training fails).
    """
    parts = resolve_parts(runner_or_model, loss_fn, optimizer, data, unpack=unpack, forward=forward)
    with preserved_state(parts.model, parts.optimizer) as snap:
        batches = _Stream(parts).take(max_batches)
        if val_data is not None:
            val_parts = dataclasses.replace(parts, data=val_data)
            held = _Stream(val_parts).take(max_batches)
            train = batches
        else:
            if len(batches) < 2:
                raise ValueError("need at least 2 batches (some are held out); pass val_data= or more data")
            k = min(holdout, max(1, len(batches) // 4))
            train, held = batches[:-k], batches[-k:]
        if any(_batch_size(x) < 2 for x, _ in train):
            raise ValueError(
                "the baseline shuffles inputs within each batch: batches need at least 2 examples"
            )
        _train_on(parts, train, steps)
        real = _evaluate(parts, held)
        snap.restore()
        _train_on(parts, _shuffle_inputs(train, seed), steps)
        baseline = _evaluate(parts, held)
    if not (math.isfinite(real) and math.isfinite(baseline)) or baseline == 0:
        return None
    gain = (baseline - real) / abs(baseline)
    if gain >= min_gain:
        return None
    return make_finding(
        "labels-decoupled",
        f"after {steps} steps the model reaches a held-out loss of {real:.4g}, no better than the same model "
        f"trained with its inputs shuffled across examples ({baseline:.4g}, gain {gain:+.1%})",
        step=parts.step,
        evidence={
            "loss": real,
            "baseline_loss": baseline,
            "gain": gain,
            "steps": steps,
            "min_gain": min_gain,
        },
    )


# ====================================================================== batch independence
def check_batch_independence(
    model: nn.Module,
    inputs: Any,
    *,
    index: int = 0,
    forward: Forward | None = None,
    rtol: float = 1e-5,
) -> Finding | None:
    """Does output ``index`` depend on the *other* examples of the batch?

    The model runs in eval mode (so batch norm's legitimate batch coupling in
    train mode is not counted; modes are restored). For floating-point inputs,
    the gradient of a random projection of ``output[index]`` with respect to
    the whole input batch must be zero outside row ``index``; when it is not,
    the modules' outputs are checked in execution order to name the first one
    where the examples are mixed. Non-floating inputs (token ids) are checked by
    reordering the other rows and comparing ``output[index]``.

    Parameters
    ----------
    model
        The model (its weights, buffers, grads and the RNG states are restored).
    inputs
        One batch of inputs (a tensor, or a tuple/dict of tensors with the batch first).
    index
        The example whose output is examined.
    forward
        ``forward(model, inputs) -> output``; default: ``model(inputs)``.
    rtol
        Gradient norm on other rows, relative to the total, below which they count as zero.

    Returns
    -------
    Finding or None
        ``batch-mixing`` (error) naming the first mixing module, or ``None``.
        Mixing that starts at a batch-norm layer that uses batch statistics in
        eval mode (``track_running_stats=False``) is by design and not flagged.
    """
    forward = forward or call_model
    leaves = [t for _, t in tensors_in(inputs) if t.dim() > 0]
    if not leaves:
        raise ValueError("inputs hold no tensor with a batch dimension")
    n = int(leaves[0].shape[0])
    if n < 2:
        raise ValueError("need a batch of at least 2 examples to test independence")
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for a batch of {n}")
    index %= n
    gen = torch.Generator().manual_seed(0)
    with preserved_state(model):
        model.eval()
        if any(t.is_floating_point() for t in leaves):
            return _independence_by_grad(model, inputs, forward, n, index, gen, rtol)
        return _independence_by_reorder(model, inputs, forward, n, index, rtol)


def _row_split(g: torch.Tensor, index: int) -> tuple[float, float, int]:
    """(norm on row ``index``, norm elsewhere, number of other rows with a non-zero gradient)."""
    rows = g.detach().reshape(g.shape[0], -1).double().norm(dim=1)
    own = float(rows[index])
    rows[index] = 0
    return own, float(rows.norm()), int((rows > 0).sum())


def _independence_by_grad(model, inputs, forward, n, index, gen, rtol) -> Finding | None:
    xs: list[torch.Tensor] = []

    def lift(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dim() and t.shape[0] == n:
            x = t.detach().clone().requires_grad_(True)
            xs.append(x)
            return x
        return t

    x_inputs = _map_tensors(inputs, lift)
    captured: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None or not t.requires_grad or t.dim() == 0:
                return
            if t.shape[0] == n:
                captured.append((name, t))
            elif t.dim() >= 2 and t.shape[1] == n:  # time-major output (nn.RNN/GRU/LSTM, batch_first=False)
                captured.append((name, t.transpose(0, 1)))

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.enable_grad():
            out = first_tensor(forward(model, x_inputs))
    finally:
        for h in handles:
            h.remove()
    if out is None or out.dim() == 0 or out.shape[0] != n:
        raise NotBatchFirst("the model's output must be a tensor whose first dimension is the batch")

    def mixing(t: torch.Tensor) -> tuple[bool, float, float, int]:
        r = torch.randn(t[index].shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
        grads = torch.autograd.grad((t[index] * r).sum(), xs, retain_graph=True, allow_unused=True)
        own = other = 0.0
        count = 0
        for g in grads:
            if g is None:
                continue
            o, e, c = _row_split(g, index)
            own, other, count = math.hypot(own, o), math.hypot(other, e), max(count, c)
        return other > rtol * (own + other) and other > 0, own, other, count

    if not out.requires_grad:
        return None
    mixed, own, other, count = mixing(out)
    if not mixed:
        return None
    first = None
    for name, t in captured:
        if mixing(t)[0]:
            first = (name, model.get_submodule(name))
            break
    if first is not None and isinstance(first[1], nn.modules.batchnorm._BatchNorm):
        return None  # batch statistics in eval mode (track_running_stats=False) couple examples by design
    where = f"; the examples are first mixed at the output of {first[0]!r}" if first else ""
    return make_finding(
        "batch-mixing",
        f"output {index} of the batch depends on {count} other example(s) of the batch (gradient norm "
        f"{other:.3g} on the other inputs vs {own:.3g} on its own){where}",
        params=(first[0],) if first else (),
        evidence={
            "index": index,
            "batch_size": n,
            "own_grad": own,
            "other_grad": other,
            "dependent_rows": count,
            "module": first[0] if first else None,
        },
    )


def _independence_by_reorder(model, inputs, forward, n, index, rtol) -> Finding | None:
    if n < 3:
        raise ValueError(
            "non-float inputs are tested by reordering the other examples: need a batch of 3 or more"
        )
    others = [i for i in range(n) if i != index]
    perm = list(range(n))
    for a, b in zip(others, others[1:] + others[:1]):
        perm[a] = b
    perm_t = torch.tensor(perm)
    with torch.no_grad():
        out1 = first_tensor(forward(model, inputs))
        moved = _map_tensors(inputs, lambda t: t[perm_t.to(t.device)] if t.dim() and t.shape[0] == n else t)
        out2 = first_tensor(forward(model, moved))
    if out1 is None or out1.dim() == 0 or out1.shape[0] != n:
        raise NotBatchFirst("the model's output must be a tensor whose first dimension is the batch")
    a, b = out1[index].double(), out2[index].double()
    diff = float((a - b).norm())
    if diff <= rtol * float(a.norm()) + 1e-12:
        return None
    return make_finding(
        "batch-mixing",
        f"output {index} of the batch changed (by {diff:.3g}) when only the other examples were reordered",
        evidence={"index": index, "batch_size": n, "change": diff},
    )


# ====================================================================== gradcheck
def gradcheck_function(
    fn: Callable[..., Any],
    *inputs: Any,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    **kwargs: Any,
) -> Finding | None:
    """Compare a function's backward with finite differences, in double precision.

    Floating-point tensor inputs are copied to float64 with
    ``requires_grad=True`` (the originals are untouched); an ``nn.Module`` is
    deep-copied to float64. Wraps :func:`torch.autograd.gradcheck`.

    Parameters
    ----------
    fn
        A custom ``torch.autograd.Function``'s ``apply``, a function or a module.
    *inputs
        Its arguments (non-tensors are passed as they are).
    eps, atol, rtol
        Finite-difference step and tolerances.
    **kwargs
        Passed to :func:`torch.autograd.gradcheck` (e.g. ``nondet_tol``).

    Returns
    -------
    Finding or None
        ``None`` when the gradients match; a ``stage-error`` finding saying which
        input's gradient is wrong, or that the function raised.
    """
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    if isinstance(fn, nn.Module):
        fn = copy.deepcopy(fn).double()
        name = type(fn).__name__
    elif getattr(fn, "__name__", "") == "apply" and getattr(fn, "__self__", None) is not None:
        name = f"{fn.__self__.__name__}.apply"
    args = tuple(
        x.detach().to(torch.float64).clone().requires_grad_(True)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else x
        for x in inputs
    )
    if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in args):
        raise ValueError("gradcheck needs at least one floating-point tensor input")
    try:
        with rng_preserved():
            torch.autograd.gradcheck(fn, args, eps=eps, atol=atol, rtol=rtol, raise_exception=True, **kwargs)
    except GradcheckError as exc:
        text = str(exc)
        m = re.search(r"with respect to input (\d+)", text)
        which = f"input {m.group(1)}" if m else "an input"
        return make_finding(
            "stage-error",
            f"gradcheck failed for {name}: the gradient its backward computes for {which} differs from "
            f"the finite-difference gradient ({text.strip().splitlines()[0][:200]})",
            evidence={"function": name, "input": int(m.group(1)) if m else None, "message": text[:2000]},
            cause=f"The backward of {name} does not compute the derivative of its forward for {which}: "
            "a wrong formula, a missing transpose or factor, or a sign error.",
            fix="Re-derive backward() for that input and compare it term by term with forward(); return one "
            "gradient per forward input, in order, and save what backward needs with ctx.save_for_backward.",
        )
    except Exception as exc:
        return make_finding(
            "stage-error",
            f"gradcheck could not run {name}: {type(exc).__name__}: {str(exc)[:300]}",
            evidence={"function": name, "exception": type(exc).__name__, "message": str(exc)[:2000]},
        )
    return None
