"""Freeze, unfreeze and learning-rate changes that keep optimizer and scheduler consistent."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "optimizer_param_ids",
    "params_missing_from_optimizer",
    "iter_schedulers",
    "rescale_scheduler_group",
    "extend_scheduler",
    "is_norm_layer",
    "effective_lrs",
]

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalization layers (batch, group, layer, instance norm, RMSNorm)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__ in ("RMSNorm",)


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """Identities of every tensor held by any param group."""
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def params_missing_from_optimizer(
    named_params: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> list[str]:
    """Trainable parameters (``requires_grad``) that no optimizer group holds (by identity)."""
    held = optimizer_param_ids(optimizer)
    return [n for n, p in named_params if p.requires_grad and id(p) not in held]


def effective_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The LR each group uses right now (a tensor LR is converted to float)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def iter_schedulers(scheduler: Any) -> Iterable[Any]:
    """The scheduler and, for SequentialLR/ChainedScheduler, the ones it wraps."""
    if scheduler is None:
        return
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", []) or []:
        yield from iter_schedulers(inner)


# Per-group keys that closed-form schedules read from the optimizer's group dicts.
_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr")


def rescale_scheduler_group(scheduler: Any, optimizer: torch.optim.Optimizer, group: int, factor: float) -> None:
    """Multiply every base value of ``group``'s schedule by ``factor``.

    Schedules that compute the LR from stored bases (LambdaLR, OneCycleLR,
    CosineAnnealingLR's closed form, CyclicLR ...) then keep their shape at the
    new level; recursive ones (StepLR, ExponentialLR, ReduceLROnPlateau) work
    from the group's current LR and need nothing.
    """
    if not math.isfinite(factor) or factor <= 0:
        return
    g = optimizer.param_groups[group]
    for key in _GROUP_KEYS:
        if key in g and isinstance(g[key], (int, float)):
            g[key] = g[key] * factor
    for sched in iter_schedulers(scheduler):
        for attr in ("base_lrs", "max_lrs"):
            values = getattr(sched, attr, None)
            if isinstance(values, list) and group < len(values):
                values[group] = values[group] * factor
        last = getattr(sched, "_last_lr", None)
        if isinstance(last, list) and group < len(last):
            last[group] = float(g["lr"]) * factor


def extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Teach the scheduler about a param group just added to the optimizer.

    Appends a base LR (and for LambdaLR/MultiplicativeLR a copy of the first
    group's lambda) so the new group follows the same schedule, and sets the
    group's LR to ``base_lr`` times the schedule's current factor.
    """
    g = optimizer.param_groups[-1]
    factor = 1.0
    for sched in iter_schedulers(scheduler):
        bases = getattr(sched, "base_lrs", None)
        if isinstance(bases, list) and bases:
            first_base = float(bases[0])
            if first_base > 0:
                factor = float(optimizer.param_groups[0]["lr"]) / first_base
            bases.append(base_lr)
        if isinstance(getattr(sched, "max_lrs", None), list) and sched.max_lrs:
            ratio = sched.max_lrs[0] / max(float(sched.base_lrs[0]) if sched.base_lrs else 1.0, 1e-30)
            sched.max_lrs.append(base_lr * ratio)
        lambdas = getattr(sched, "lr_lambdas", None)
        if isinstance(lambdas, list) and lambdas:
            lambdas.append(lambdas[0])
        last = getattr(sched, "_last_lr", None)
        if isinstance(last, list):
            last.append(base_lr * factor)
        min_lrs = getattr(sched, "min_lrs", None)  # ReduceLROnPlateau
        if isinstance(min_lrs, list) and min_lrs:
            min_lrs.append(min_lrs[0])
    first = optimizer.param_groups[0]
    g.setdefault("initial_lr", base_lr)
    for key in ("max_lr", "min_lr"):
        if key in first and "initial_lr" in first and first["initial_lr"]:
            g[key] = first[key] / first["initial_lr"] * base_lr
    for key in ("max_momentum", "base_momentum"):
        if key in first:
            g[key] = first[key]
    g["lr"] = base_lr * factor
