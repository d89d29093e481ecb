"""The training primitives the Runner, the checks and :mod:`tlwidgets.testing` share.

One implementation each of: an optimizer snapshot and its exact restore, one
training step (with a closure for optimizers such as ``LBFGS`` whose ``step``
needs one), and an evaluation averaged per example. Core module: torch and
numpy only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tlwidgets.core.activations import first_tensor
from tlwidgets.core.batches import call_model, default_unpack, tensors_in, to_device

__all__ = [
    "LossShapeError",
    "OptimizerSnapshot",
    "batch_examples",
    "compute_loss",
    "evaluate",
    "loss_closure",
    "needs_closure",
    "restore_optimizer",
    "snapshot_optimizer",
    "train_step",
]

LossFn = Callable[[Any, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], Any]
Unpack = Callable[[Any], tuple[Any, Any]]

_IMMUTABLE = (int, float, bool, str, bytes, complex, type(None))


# ====================================================================== optimizer snapshot
def _copy(value: Any) -> Any:
    """A copy that shares nothing mutable with ``value`` (tensors cloned, scalars as they are).

    Scalars and tuples of scalars (``betas``) are immutable and returned as they
    are: a group holds a dozen of them and a snapshot is taken before every
    guarded STEP, where ``copy.deepcopy`` of each would cost more than the step
    of a small model.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value):
        return value
    return copy.deepcopy(value)


def _put(current: Any, saved: Any) -> Any:
    """``saved`` written into ``current`` if it is a tensor of the same kind (keeping it), else a copy."""
    if (
        isinstance(saved, torch.Tensor)
        and isinstance(current, torch.Tensor)
        and current.shape == saved.shape
        and current.dtype == saved.dtype
        and current.device == saved.device
    ):
        with torch.no_grad():
            current.copy_(saved)
        return current
    return _copy(saved)


@dataclasses.dataclass(frozen=True)
class OptimizerSnapshot:
    """An optimizer's groups (parameters and hyperparameters) and per-parameter state, copied.

    Made by :func:`snapshot_optimizer`, put back by :func:`restore_optimizer`;
    it can be restored any number of times.
    """

    groups: tuple[tuple[tuple[torch.Tensor, ...], dict[str, Any]], ...]
    state: dict[torch.Tensor, dict[str, Any]] | None


def snapshot_optimizer(optimizer: torch.optim.Optimizer, *, state: bool = True) -> OptimizerSnapshot:
    """Copy (never alias) everything ``optimizer.step()`` and the controls can change.

    Parameters
    ----------
    optimizer
        Any ``torch.optim.Optimizer``: its groups' parameter lists and
        hyperparameters (learning rates included, tensor ones too) and its
        per-parameter state (momentum buffers, Adam moments and step counts,
        LBFGS's lists of tensors) are copied.
    state
        ``False``: the groups only (what a scheduler writes); :func:`restore_optimizer`
        then leaves the per-parameter state alone.

    Returns
    -------
    OptimizerSnapshot
    """
    groups = tuple(
        (tuple(g["params"]), {k: _copy(v) for k, v in g.items() if k != "params"})
        for g in optimizer.param_groups
    )
    saved = {p: {k: _copy(v) for k, v in s.items()} for p, s in optimizer.state.items()} if state else None
    return OptimizerSnapshot(groups, saved)


def restore_optimizer(optimizer: torch.optim.Optimizer, snap: OptimizerSnapshot) -> None:
    """Put ``snap`` back into ``optimizer`` exactly.

    In place wherever possible: the group dicts keep their identity (sliders
    and schedulers hold them), and state tensors of the same shape are
    overwritten rather than replaced.
    Groups added since the snapshot (``unfreeze``) are removed, and state of
    parameters the snapshot did not hold is dropped.
    """
    groups = optimizer.param_groups
    del groups[len(snap.groups) :]
    for i, (params, rest) in enumerate(snap.groups):
        if i == len(groups):
            groups.append({"params": list(params), **{k: _copy(v) for k, v in rest.items()}})
            continue
        g = groups[i]
        current = dict(g)
        g.clear()
        g["params"] = list(params)
        for k, v in rest.items():
            g[k] = _put(current.get(k), v)
    if snap.state is None:
        return
    state = optimizer.state
    for p in [p for p in state if p not in snap.state]:
        del state[p]
    for p, saved in snap.state.items():
        current = state.get(p)
        if current is None:
            state[p] = {k: _copy(v) for k, v in saved.items()}
            continue
        for k in [k for k in current if k not in saved]:
            del current[k]
        for k, v in saved.items():
            current[k] = _put(current.get(k), v)


# ====================================================================== one training step
class LossShapeError(ValueError):
    """``loss_fn`` returned something other than a one-element tensor."""


def compute_loss(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, forward: Forward | None = None
) -> torch.Tensor:
    """``loss_fn(forward(model, inputs), targets)``, checked to be a scalar tensor.

    Raises
    ------
    LossShapeError
        When the loss is not a one-element tensor (``reduction='none'``).
    """
    return _scalar(loss_fn((forward or call_model)(model, inputs), targets))


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossShapeError(
            f"loss_fn must return a scalar tensor, got {shape}; use reduction='mean' or call .mean()"
        )
    return loss


@functools.lru_cache(maxsize=128)
def _step_needs_closure(cls: type) -> bool:
    try:
        sig = inspect.signature(cls.step)
    except (TypeError, ValueError):
        return False
    param = sig.parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step`` requires a closure (``LBFGS``: it re-evaluates the loss itself)."""
    return _step_needs_closure(type(optimizer))


def loss_closure(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    forward: Forward | None = None,
    *,
    set_to_none: bool | None = True,
) -> Callable[[], torch.Tensor]:
    """The closure ``optimizer.step(closure)`` calls: zero the gradients, forward, loss, backward.

    Each call recomputes the loss on the same batch (an ``LBFGS`` step calls
    it once and then again in its inner iterations and line search) and
    returns it. Runs with gradients enabled: ``LBFGS.step`` runs under ``no_grad``.
    """

    def closure() -> torch.Tensor:
        _zero_grad(optimizer, set_to_none)
        with torch.enable_grad():
            loss = compute_loss(model, loss_fn, inputs, targets, forward)
            if loss.requires_grad:
                loss.backward()
        return loss

    return closure


def _zero_grad(optimizer: torch.optim.Optimizer, set_to_none: bool | None) -> None:
    if set_to_none is None:
        optimizer.zero_grad()  # the optimizer's own default, as a plain training loop calls it
    else:
        optimizer.zero_grad(set_to_none=set_to_none)


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    *,
    forward: Forward | None = None,
    set_to_none: bool | None = True,
    skip_non_finite: bool = False,
) -> float:
    """One plain training step: zero_grad, forward, loss, backward, ``optimizer.step()``.

    Parameters
    ----------
    model, loss_fn, optimizer
        What is trained.
    inputs, targets
        One batch, already on the model's device.
    forward
        ``forward(model, inputs) -> output``; default: ``model(inputs)`` (``**dict``, ``*tuple``).
    set_to_none
        Passed to ``optimizer.zero_grad``; ``None`` calls ``optimizer.zero_grad()`` as it is.
    skip_non_finite
        Do not step when the loss is NaN/Inf (the weights stay as they were).

    Returns
    -------
    float
        The loss of the batch before the step (for a closure optimizer, its first evaluation).

    Raises
    ------
    LossShapeError
        When the loss is not a scalar tensor.
    """
    closure = loss_closure(model, loss_fn, optimizer, inputs, targets, forward, set_to_none=set_to_none)
    if needs_closure(optimizer):
        if skip_non_finite:  # look before the optimizer evaluates (and steps on) the loss itself
            first = float(closure().detach())
            if not math.isfinite(first):
                return first
        loss = optimizer.step(closure)
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else math.nan
    _zero_grad(optimizer, set_to_none)
    loss = compute_loss(model, loss_fn, inputs, targets, forward)
    value = float(loss.detach())
    if skip_non_finite and not math.isfinite(value):
        return value
    if loss.requires_grad:
        loss.backward()
    optimizer.step()
    return value


# ====================================================================== evaluation
def batch_examples(inputs: Any, targets: Any, output: Any = None) -> int:
    """How many examples a batch holds: the leading size of the targets, else of the inputs or output.

    The targets come first because the loss averages over them; the output may
    be a structure (a namespace, a dataclass) without a tensor to find.
    """
    for obj in (targets, inputs, output):
        for _, t in tensors_in(obj):
            if t.dim() > 0:
                return int(t.shape[0])
    return 1


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> dict[str, float]:
    """Mean loss per example (and accuracy, for class targets) over ``batches``.

    Runs under ``model.eval()`` and ``torch.no_grad()`` and restores every
    module's own ``training`` flag afterwards. Each batch's mean loss is
    weighted by its number of examples (:func:`batch_examples`), so a short
    last batch counts for what it holds, not as much as a full one.

    Parameters
    ----------
    model, loss_fn
        What is evaluated; ``loss_fn`` returns the batch's mean loss.
    batches
        Any iterable of batches.
    unpack
        ``unpack(batch) -> (inputs, targets)``; default: ``(inputs, targets)`` pairs and dicts.
    device
        Where batches go (``None``: left where they are).
    forward
        ``forward(model, inputs) -> output``; default: ``model(inputs)``.

    Returns
    -------
    dict
        ``{"loss": ...}`` (NaN without batches), plus ``"accuracy"`` (correct
        examples / examples) when the output is 2-D logits and the targets are
        integer class indices.
    """
    unpack = unpack or default_unpack
    forward = forward or call_model
    modes = [(m, m.training) for m in model.modules()]
    total, count, correct, labelled = 0.0, 0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, targets = unpack(batch)
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                out = forward(model, inputs)
                loss = _scalar(loss_fn(out, targets))
                n = batch_examples(inputs, targets, out)
                total += float(loss) * n
                count += n
                logits = first_tensor(out)
                if (
                    logits is not None
                    and isinstance(targets, torch.Tensor)
                    and logits.dim() == 2
                    and targets.dim() == 1
                    and not targets.is_floating_point()
                    and logits.shape[0] == targets.shape[0]
                ):
                    correct += int((logits.argmax(1) == targets).sum())
                    labelled += targets.numel()
    finally:
        for m, mode in modes:
            m.training = mode
    result = {"loss": total / count if count else math.nan}
    if labelled:
        result["accuracy"] = correct / labelled
    return result
