"""Freeze, unfreeze and learning-rate changes that keep optimizer and scheduler consistent."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.events import Event
from tlwidgets.core.naming import resolve_names
from tlwidgets.core.records import ControlChange

__all__ = [
    "ControlsMixin",
    "effective_lrs",
    "extend_scheduler",
    "is_norm_layer",
    "iter_schedulers",
    "optimizer_param_ids",
    "params_missing_from_optimizer",
    "rescale_scheduler_group",
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


def rescale_scheduler_group(
    scheduler: Any, optimizer: torch.optim.Optimizer, group: int, factor: float
) -> None:
    """Multiply every base value of ``group``'s schedule by ``factor``.

    Schedules that compute the LR from stored bases (LambdaLR, OneCycleLR,
    CosineAnnealingLR's closed form, CyclicLR ...) then keep their shape at the
    new level; recursive ones (StepLR, ExponentialLR, ReduceLROnPlateau) work
    from the group's current LR and need nothing.
    """
    if not math.isfinite(factor) or factor < 0:
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


def group_bases(scheduler: Any, optimizer: torch.optim.Optimizer, group: int) -> dict[Any, Any]:
    """The per-group schedule bases that :func:`rescale_scheduler_group` scales."""
    g = optimizer.param_groups[group]
    out: dict[Any, Any] = {("group", k): g[k] for k in _GROUP_KEYS if k in g}
    for i, sched in enumerate(iter_schedulers(scheduler)):
        for attr in ("base_lrs", "max_lrs"):
            values = getattr(sched, attr, None)
            if isinstance(values, list) and group < len(values):
                out[(i, attr)] = values[group]
    return out


def set_group_bases(
    scheduler: Any, optimizer: torch.optim.Optimizer, group: int, bases: dict[Any, Any]
) -> None:
    """Put back what :func:`group_bases` returned."""
    g = optimizer.param_groups[group]
    for i, sched in enumerate(iter_schedulers(scheduler)):
        for attr in ("base_lrs", "max_lrs"):
            values = getattr(sched, attr, None)
            if (i, attr) in bases and isinstance(values, list) and group < len(values):
                values[group] = bases[(i, attr)]
    for (kind, key), value in bases.items():
        if kind == "group":
            g[key] = value


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


class ControlsMixin:
    """``freeze``, ``unfreeze``, ``set_lr``, ``set_weight_decay``, ``set_bn_eval``, ``set_train_mode``,
    ``set_dropout``, ``set_scheduler_interval``.

    For a Runner or a Watcher.

    Every control is applied at a stage boundary (deferred when called from
    inside a stage), recorded as a :class:`~tlwidgets.core.records.ControlChange`
    in ``history.controls`` and announced as an ``Event.CONTROL``; a UI changes
    training state through these methods only.

    The host provides ``model``, ``optimizer``, ``scheduler``, ``named_params``,
    ``param_names``, ``history``, ``events``, ``global_step``,
    ``freeze_bn_stats``, ``_bn_eval`` (dict), ``_in_stage``, ``_pending``
    (deque), ``_check_open()`` and ``_refresh_audit()``.
    """

    def frozen(self) -> list[str]:
        """Names of the parameters with ``requires_grad=False``."""
        return [n for n, p in self.named_params if not p.requires_grad]

    @property
    def bn_eval(self) -> tuple[str, ...]:
        """Batch-norm layers held in eval mode because they are frozen (module names, read-only).

        Set by ``freeze(..., bn_eval=True)`` (or the ``freeze_bn_stats`` option)
        and by :meth:`set_bn_eval`; released by :meth:`set_bn_eval` with
        ``on=False`` and by unfreezing the layer.
        """
        return tuple(self._bn_eval)

    def param_group_of(self) -> dict[str, int | None]:
        """Optimizer group index of each parameter (None when not in the optimizer)."""
        where = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        return {n: where.get(id(p)) for n, p in self.named_params}

    def freeze(self, *names: str, bn_eval: bool | None = None, reset_state: bool = False) -> list[str]:
        """Stop training the named modules/parameters (a name matches its dotted subtree).

        Sets ``requires_grad=False`` and clears their gradients so no optimizer
        (momentum, weight decay) moves them. With ``bn_eval`` (default: the
        runner's ``freeze_bn_stats``) batch-norm layers whose parameters are all
        frozen go to eval mode so their running statistics stay put too.
        With ``reset_state`` their optimizer state (momentum buffers, Adam moments) is dropped too, so
        a later ``unfreeze`` starts them afresh instead of replaying stale momentum.
        Returns the parameter names frozen.
        """
        if not names:
            raise ValueError(
                "freeze() needs at least one module or parameter name ('' means the whole model)"
            )
        chosen = resolve_names(names, self.param_names)
        return self._control(lambda: self._apply_freeze(chosen, names, bn_eval, reset_state), chosen)

    def unfreeze(self, *names: str, lr: float | None = None) -> list[str]:
        """Train the named modules/parameters again.

        Parameters the optimizer does not hold are added as a new param group
        with base LR ``lr`` (default: the first group's base LR), and the
        scheduler is extended so the new group follows the same schedule.
        Returns the parameter names unfrozen.
        """
        if not names:
            raise ValueError(
                "unfreeze() needs at least one module or parameter name ('' means the whole model)"
            )
        if lr is not None:
            _check_lr(lr)
        chosen = resolve_names(names, self.param_names)
        return self._control(lambda: self._apply_unfreeze(chosen, names, lr), chosen)

    def set_lr(self, lr: float, group: int = 0) -> None:
        """Set the effective LR of ``group``.

        The scheduler's base values are rescaled by the same factor, so the
        schedule keeps its shape at the new level.

        Parameters
        ----------
        lr
            A real number >= 0: a Python or numpy scalar, or a 0-d tensor or
            array (stored as a plain ``float``).
        group
            Index of the optimizer's param group (an int, numpy ints too;
            negative counts from the end).

        Raises
        ------
        TypeError
            ``lr`` is not a real number, or ``group`` is not an int.
        ValueError
            ``lr`` is a bool, NaN, infinite or negative.
        IndexError
            ``group`` is out of range (the message lists the valid groups).
        """
        value = _check_lr(lr)
        index = _check_group(group, len(self.optimizer.param_groups))
        self._control(lambda: self._apply_set_lr(value, index), None)

    def set_bn_eval(self, on: bool, *names: str) -> list[str]:
        """Hold frozen batch-norm layers in eval mode (``on=True``) or release them (``on=False``).

        A batch-norm layer held in eval mode keeps its running mean and
        variance while training goes on (the runner puts it back in eval mode
        before every forward, whatever ``model.train()`` did). Only layers
        whose own parameters are all frozen are held; releasing puts a layer
        back in the model's mode.

        Parameters
        ----------
        on
            Hold (True) or release (False).
        *names
            Module or parameter names (dotted subtrees, as for :meth:`freeze`);
            none means every batch-norm layer, and then ``on`` also becomes the
            ``freeze_bn_stats`` option that later :meth:`freeze` calls follow.

        Returns
        -------
        list[str]
            The module names whose mode this changes (possibly empty; the
            change is recorded either way).
        """
        if not isinstance(on, (bool, np.bool_)):
            raise TypeError(f"on must be True or False, got {on!r}")
        on = bool(on)
        params = dict(self.named_params)
        chosen = set(resolve_names(names, self.param_names)) if names else None
        layers = self._frozen_bn_layers(params) if on else list(self._bn_eval.items())
        modules = [m for m, layer in layers if chosen is None or _owns_any(m, layer, chosen)]
        return self._control(lambda: self._apply_bn_eval(on, modules, list(names)), modules)

    def set_weight_decay(self, weight_decay: float, group: int = 0) -> None:
        """Set the ``weight_decay`` of optimizer group ``group`` (recorded; undone by a rewind).

        Parameters
        ----------
        weight_decay
            A real number >= 0 (checked like an LR).
        group
            Index of the optimizer's param group (negative counts from the end).

        Raises
        ------
        KeyError
            The optimizer has no ``weight_decay`` hyperparameter.
        """
        value = _check_lr(weight_decay)
        index = _check_group(group, len(self.optimizer.param_groups))
        if "weight_decay" not in self.optimizer.param_groups[index]:
            raise KeyError(f"{type(self.optimizer).__name__} has no weight_decay hyperparameter")
        self._control(lambda: self._apply_weight_decay(value, index), None)

    def _apply_weight_decay(self, value: float, group: int) -> None:
        g = self.optimizer.param_groups[group]
        old = float(g["weight_decay"])
        g["weight_decay"] = value
        detail = {"group": group, "weight_decay": value, "old": old}
        self._after_control(ControlChange("set_weight_decay", self.global_step, detail))

    def set_scheduler_interval(self, interval: str) -> None:
        """Step the scheduler after every ``"epoch"`` or every ``"step"`` (a Runner's; recorded, undone by
        a rewind).

        The schedule is moved to the position it would have with that interval from the start: its
        step count becomes the epochs (or steps) done so far and the groups' LRs are set from it (the
        closed form of the torch schedulers that have one, ``LambdaLR``'s and ``OneCycleLR``'s own
        formula; other schedulers start over from their base LRs).

        Raises
        ------
        ValueError
            ``interval`` is not ``"epoch"`` or ``"step"``, or the session does not step a scheduler.
        """
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        if getattr(self, "scheduler", None) is None or not hasattr(self, "scheduler_interval"):
            raise ValueError("this session steps no scheduler (a Runner with a scheduler does)")
        self._control(lambda: self._apply_scheduler_interval(interval), None)

    def _apply_scheduler_interval(self, interval: str) -> None:
        old = self.scheduler_interval
        self.scheduler_interval = interval
        position = int(self.epoch if interval == "epoch" else self.global_step)
        for sched in iter_schedulers(self.scheduler):
            _reposition_scheduler(sched, self.optimizer, position)
        detail = {"interval": interval, "old": old, "position": position}
        self._after_control(ControlChange("scheduler_interval", self.global_step, detail))

    def set_dropout(self, p: float, *names: str) -> list[str]:
        """Set the drop probability ``p`` of dropout modules (recorded; undone by a rewind).

        Parameters
        ----------
        p
            A probability in ``[0, 1)``.
        *names
            Names of dropout modules (or of modules holding them); none: every dropout module.

        Returns
        -------
        list[str]
            The dropout modules changed.

        Raises
        ------
        ValueError
            ``p`` is not in ``[0, 1)``, or the names hold no dropout module.
        KeyError
            A name is not a module of the model.
        """
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
            raise TypeError(f"p must be a number in [0, 1), got {p!r}")
        value = float(p)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        modules = dict(self.model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise KeyError(f"no module named {', '.join(map(repr, unknown))} in the model")
        chosen = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.modules.dropout._DropoutNd)
            and (not names or any(n == k or n.startswith(f"{k}.") or not k for k in names))
        ]
        if not chosen:
            raise ValueError(f"no dropout module in {', '.join(map(repr, names)) or 'the model'}")
        return self._control(lambda: self._apply_dropout(value, chosen), chosen)

    def _apply_dropout(self, p: float, chosen: Sequence[str]) -> None:
        modules = dict(self.model.named_modules())
        old = {n: float(modules[n].p) for n in chosen}
        for n in chosen:
            modules[n].p = p
        detail = {"p": p, "modules": list(chosen), "old": old}
        self._after_control(ControlChange("set_dropout", self.global_step, detail))

    def set_train_mode(self, *names: str, on: bool = True) -> list[str]:
        """Put modules in train mode (``on=True``) or eval mode, as a recorded control.

        Parameters
        ----------
        *names
            Module names (``"<model>"`` or none: the whole model, like ``model.train()``).
            A named module is switched with its submodules, and the model itself is put in
            the same mode without touching its other children (parts frozen in eval mode on
            purpose stay so). Batch-norm layers held in eval mode (:attr:`bn_eval`) stay held.
        on
            Train mode (True) or eval mode (False).

        Returns
        -------
        list[str]
            The module names switched (``"<model>"`` for the whole model).
        """
        if not isinstance(on, (bool, np.bool_)):
            raise TypeError(f"on must be True or False, got {on!r}")
        modules = dict(self.model.named_modules())
        chosen = [n for n in names if n not in ("", "<model>")]
        unknown = [n for n in chosen if n not in modules]
        if unknown:
            raise KeyError(f"no module named {', '.join(map(repr, unknown))} in the model")
        whole = not chosen
        return self._control(
            lambda: self._apply_train_mode(bool(on), chosen, whole), ["<model>"] if whole else chosen
        )

    def _apply_train_mode(self, on: bool, chosen: Sequence[str], whole: bool) -> None:
        modules = dict(self.model.named_modules())
        if whole:
            self.model.train(on)
        else:
            for n in chosen:
                modules[n].train(on)
            self.model.training = on  # the model's own flag (forward code may read it), not its children
        for m in self._bn_eval.values():  # frozen batch-norm layers keep their statistics
            m.eval()
        detail = {"on": on, "modules": ["<model>"] if whole else list(chosen)}
        self._after_control(ControlChange("train_mode", self.global_step, detail))

    def _control(self, apply: Callable[[], Any], result: Any) -> Any:
        self._check_open()
        if self._in_stage:  # called from a callback/thread during a stage: act at the boundary
            self._pending.append(apply)
        else:
            apply()
        return result

    def _drain_pending(self) -> None:
        while self._pending:
            self._pending.popleft()()

    def _apply_freeze(
        self, chosen: Sequence[str], names: Sequence[str], bn_eval: bool | None, reset_state: bool = False
    ) -> None:
        params = dict(self.named_params)
        for n in chosen:
            params[n].requires_grad_(False)
            params[n].grad = None
            if reset_state:
                self.optimizer.state.pop(params[n], None)
        if self.freeze_bn_stats if bn_eval is None else bn_eval:
            for mname, m in self._frozen_bn_layers(params):
                self._bn_eval[mname] = m
                m.eval()
        detail: dict[str, Any] = {"names": list(names), "params": list(chosen)}
        if reset_state:
            detail["reset_state"] = True
        self._after_control(ControlChange("freeze", self.global_step, detail))

    def _frozen_bn_layers(self, params: dict[str, torch.Tensor]) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of the batch-norm layers whose own parameters are all frozen."""
        out = []
        for mname, m in self.model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            own = [o for o in _own_param_names(mname, m) if o in params]
            if own and all(not params[o].requires_grad for o in own):
                out.append((mname, m))
        return out

    def _apply_bn_eval(self, on: bool, modules: Sequence[str], names: Sequence[str]) -> None:
        layers = dict(self.model.named_modules())
        for mname in modules:
            if on:
                self._bn_eval[mname] = layers[mname]
                layers[mname].eval()
            elif mname in self._bn_eval:
                self._bn_eval.pop(mname).train(self.model.training)
        if not names:
            self.freeze_bn_stats = on
        detail: dict[str, Any] = {"on": on, "modules": list(modules)}
        if names:
            detail["names"] = list(names)
        self._after_control(ControlChange("bn_eval", self.global_step, detail))

    def _apply_unfreeze(self, chosen: Sequence[str], names: Sequence[str], lr: float | None) -> None:
        params = dict(self.named_params)
        held = optimizer_param_ids(self.optimizer)
        new = []
        for n in chosen:
            params[n].requires_grad_(True)
            if id(params[n]) not in held:
                new.append(params[n])
        for mname in list(self._bn_eval):
            m = self._bn_eval[mname]
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train(self.model.training)
                del self._bn_eval[mname]
        detail: dict[str, Any] = {"names": list(names), "params": list(chosen)}
        if new:
            base = _check_lr(lr) if lr is not None else _base_lr(self.optimizer, self.scheduler, 0)
            self.optimizer.add_param_group({"params": new, "lr": base})
            extend_scheduler(self.scheduler, self.optimizer, base)
            detail.update(
                new_group=len(self.optimizer.param_groups) - 1,
                lr=float(self.optimizer.param_groups[-1]["lr"]),
            )
        self._after_control(ControlChange("unfreeze", self.global_step, detail))

    def _apply_set_lr(self, lr: float, group: int) -> None:
        g = self.optimizer.param_groups[group]
        old = float(g["lr"])
        if self.scheduler is not None:
            # Bases saved when the LR was set to 0, so a later non-zero LR resumes the same shape.
            zeroed: dict[int, tuple[dict[Any, Any], float]] = self.__dict__.setdefault("_zeroed_bases", {})
            if old > 0:
                if lr == 0:
                    zeroed[group] = (group_bases(self.scheduler, self.optimizer, group), old)
                rescale_scheduler_group(self.scheduler, self.optimizer, group, lr / old)
            elif group in zeroed and lr > 0:
                bases, before = zeroed.pop(group)
                set_group_bases(self.scheduler, self.optimizer, group, bases)
                rescale_scheduler_group(self.scheduler, self.optimizer, group, lr / before)
            elif lr > 0:
                _reset_scheduler_base(self.scheduler, self.optimizer, group, lr)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr
        for sched in iter_schedulers(self.scheduler):  # get_last_lr() reports the new LR too
            last = getattr(sched, "_last_lr", None)
            if isinstance(last, list) and group < len(last):
                last[group] = lr
        self._after_control(ControlChange("set_lr", self.global_step, {"group": group, "lr": lr, "old": old}))

    def _after_control(self, change: ControlChange) -> None:
        self.tracker.densify(self.global_step)  # watch what the change does, step by step
        self.history.add_control(change)
        self._refresh_audit()
        self.events.emit(Event.CONTROL, change)


def _reposition_scheduler(sched: Any, optimizer: torch.optim.Optimizer, position: int) -> None:
    """Put ``sched`` at step ``position`` and set the groups' LRs to what it gives there."""
    import warnings

    lr_sched = torch.optim.lr_scheduler
    bases = getattr(sched, "base_lrs", None)
    if not isinstance(bases, list):
        return
    sched.last_epoch = position
    if hasattr(sched, "_step_count"):
        sched._step_count = position + 1
    with warnings.catch_warnings():  # get_lr() outside step() warns; here it is what we want
        warnings.simplefilter("ignore")
        if hasattr(sched, "_get_closed_form_lr"):
            lrs = list(sched._get_closed_form_lr())
        elif isinstance(sched, lr_sched.LambdaLR):
            lrs = [base * fn(position) for base, fn in zip(bases, sched.lr_lambdas)]
        elif isinstance(sched, lr_sched.OneCycleLR):
            lrs = list(sched.get_lr())
        else:
            lrs = list(bases)
    for g, lr in zip(optimizer.param_groups, lrs):
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(float(lr))
        else:
            g["lr"] = float(lr)
    sched._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


def _check_lr(lr: Any) -> float:
    """``lr`` as a float: a real number >= 0 (Python/numpy scalar, 0-d tensor or array).

    Raises TypeError for what is not a real number and ValueError for a bool,
    NaN, an infinity or a negative value.
    """
    value = lr
    if isinstance(value, (torch.Tensor, np.ndarray)):  # 0-d only; .item() gives a Python scalar
        if value.ndim != 0:
            raise TypeError(
                f"lr must be a real number (a scalar), got a {type(value).__name__} "
                f"of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"lr must be a number, not a bool, got {lr!r}")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"lr must be a real number >= 0, got {type(lr).__name__} {lr!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return out


def _check_group(group: Any, n: int) -> int:
    """``group`` as an index in ``range(n)`` (negative counts from the end)."""
    try:
        if isinstance(group, (bool, np.bool_)):
            raise TypeError
        index = operator.index(group)  # int, numpy ints, 0-d integer tensors; not str/float/bool
    except TypeError:
        raise TypeError(
            f"group must be an int (a param group index), got {type(group).__name__} {group!r}"
        ) from None
    if not -n <= index < n:
        valid = ", ".join(map(str, range(n)))
        back = ", ".join(map(str, range(-n, 0)))
        raise IndexError(
            f"group {index} is out of range: the optimizer has {n} param group{'s' if n != 1 else ''}; "
            f"valid groups are {valid} (or {back} from the end)"
        )
    return index % n


def _own_param_names(mname: str, module: nn.Module) -> list[str]:
    return [f"{mname}.{k}" if mname else k for k, _ in module.named_parameters(recurse=False)]


def _owns_any(mname: str, module: nn.Module, chosen: set[str]) -> bool:
    """Does the layer ``mname`` hold one of the ``chosen`` parameter names?"""
    return any(o in chosen for o in _own_param_names(mname, module))


def _base_lr(optimizer: torch.optim.Optimizer, scheduler: Any, group: int) -> float:
    bases = getattr(scheduler, "base_lrs", None)
    if isinstance(bases, list) and len(bases) > group:
        return float(bases[group])
    return float(optimizer.param_groups[group].get("initial_lr", optimizer.param_groups[group]["lr"]))


def _reset_scheduler_base(scheduler: Any, optimizer: torch.optim.Optimizer, group: int, lr: float) -> None:
    for s in iter_schedulers(scheduler):
        bases = getattr(s, "base_lrs", None)
        if isinstance(bases, list) and group < len(bases):
            bases[group] = lr
    optimizer.param_groups[group]["initial_lr"] = lr
