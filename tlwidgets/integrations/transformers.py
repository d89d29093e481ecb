"""``DebugCallback`` for the Hugging Face ``Trainer`` (a ``transformers.TrainerCallback``).

>>> from tlwidgets.integrations.transformers import DebugCallback        # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb := DebugCallback()])
>>> trainer.train(); cb.findings                                         # doctest: +SKIP

Importing this module imports ``transformers``; ``import tlwidgets`` does not.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
from typing import Any

import torch
from torch import nn

from tlwidgets.integrations._base import CallbackAdapter, missing_extra

try:
    from transformers import TrainerCallback
except ImportError as _exc:
    raise missing_extra("transformers", "transformers", _exc) from _exc

__all__ = ["DebugCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (any wrapper with ``.optimizer``)."""
    # AcceleratedOptimizer subclasses torch.optim.Optimizer without running its __init__ (no hook
    # dicts): the steps to hook are the inner optimizer's.
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _torch_scheduler(scheduler: Any) -> Any:
    """The torch scheduler under accelerate's ``AcceleratedScheduler``."""
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "optimizer") else scheduler


def _output_loss(output: Any) -> torch.Tensor | None:
    """``output.loss`` / ``output["loss"]`` / ``output[0]`` of a model that computed its loss."""
    loss = None
    if isinstance(output, dict):  # ModelOutput is a dict subclass
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
        return loss
    return None


class DebugCallback(CallbackAdapter, TrainerCallback):
    """Watch a Hugging Face ``Trainer.train()``: findings, history and ``tlw.Dashboard(cb)``.

    At ``on_train_begin`` it creates a watcher (``tlw.watch``'s tracking) on
    the Trainer's model, its optimizer (the torch optimizer inside
    accelerate's ``AcceleratedOptimizer``) and LR scheduler. The loss of each
    micro-batch is the model's own ``outputs.loss`` (what the Trainer's
    ``compute_loss`` backpropagates), read by a forward hook while gradients
    are enabled; ``history.loss`` has one entry per optimizer step (the mean
    over the accumulated micro-batches). Each ``on_evaluate`` is recorded as
    an epoch record with ``eval_loss``. Controls (``cb.freeze``,
    ``cb.set_lr``, a dashboard's toggles) act at the next ``on_step_begin``.

    Each ``train()`` gets a new watcher (``cb.watchers``), finished and
    closed at ``on_train_end``. The Trainer calls no callback when training
    raises: an exception in the model's forward closes the watcher at once
    (a forward hook that runs even when the forward raises); for one raised
    elsewhere (backward, data, Ctrl-C) the hooks are removed when the
    IPython cell ends with the error, at the next ``train()``, or by
    ``cb.close()``.

    Parameters
    ----------
    **watch_options
        Options of :class:`~tlwidgets.Watcher` (``measure_every``, ...).

    Notes
    -----
    A ``compute_loss`` override, ``compute_loss_func`` or label smoothing
    computes a loss the model does not return: call ``cb.record_loss(loss)``
    in the override (before ``backward``), or the history's loss stays NaN.
    """

    def __init__(self, **watch_options: Any) -> None:
        super().__init__()
        self._init_adapter(watch_options)
        self._hf_handles: list[Any] = []
        self._ga_steps = 1
        self._train_thread: int | None = None
        self._ipython_off: Any = None

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        optimizer = kwargs.get("optimizer")
        if not isinstance(model, nn.Module) or optimizer is None:
            warnings.warn(
                "DebugCallback: the Trainer passed no model or optimizer to on_train_begin; "
                "this train() is not watched",
                stacklevel=2,
            )
            return
        scheduler = kwargs.get("lr_scheduler")
        self._stop_hf(interrupted=True)
        self._ga_steps = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        sched = _torch_scheduler(scheduler) if scheduler is not None else None
        w = self._start(model, _torch_optimizer(optimizer), sched)
        w.epoch = int(state.epoch or 0)
        self._hf_handles = [
            model.register_forward_hook(self._on_forward, with_kwargs=True, always_call=True),
        ]
        self._train_thread = threading.get_ident()
        self._watch_cell()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        w = self.session
        if w is None or w.closed:
            return
        w.epoch = int(state.epoch or 0)
        w.apply_pending()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        w = self.session
        if w is None or w.closed or not metrics:
            return
        loss = metrics.get("eval_loss")
        extra = {}
        for key in ("eval_accuracy", "eval_acc"):
            v = metrics.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                extra["accuracy"] = float(v)
                break
        if loss is None and not extra:
            return
        value = float(loss) if loss is not None else None
        w.record_validation(value, epoch=int(state.epoch or 0), metrics=extra)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stop_hf(interrupted=False)

    def close(self) -> None:
        """Remove every hook of the current ``train()``'s watcher (also done when it ends)."""
        self._stop_hf(interrupted=True)

    def record_loss(self, loss: torch.Tensor) -> None:
        """The loss of this micro-batch, for a ``compute_loss`` that does not return ``outputs.loss``."""
        w = self.session
        if w is not None and not w.closed:
            w.record_loss(loss)

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        w = self.session
        if w is None or w.closed:
            return
        if sys.exc_info()[1] is not None:  # always_call: the forward raised, train() is over
            self._stop_hf(interrupted=True)
            return
        if not torch.is_grad_enabled():
            return  # evaluation
        loss = _output_loss(output)
        if loss is None:
            return
        # A loss normalized by num_items_in_batch is already divided over the accumulated micro-batches
        # (each is its share of the step's loss): scale back, so the step's mean is the step's loss.
        scale = float(self._ga_steps) if kwargs.get("num_items_in_batch") is not None else 1.0
        try:
            w.record_loss(loss, scale=scale)
        except Exception as exc:  # never into the Trainer's loop
            w._internal_error("hf loss hook", exc)

    def _stop_hf(self, *, interrupted: bool) -> None:
        for h in self._hf_handles:
            h.remove()
        self._hf_handles = []
        if self._ipython_off is not None:
            off, self._ipython_off = self._ipython_off, None
            with contextlib.suppress(Exception):  # IPython already gone
                off()
        self._stop(interrupted=interrupted)

    def _watch_cell(self) -> None:
        """In IPython: close the watcher when the cell running ``train()`` ends with an error."""
        ip = _ipython()
        if ip is None or self._train_thread != threading.main_thread().ident:
            return  # a fit in a background thread: another cell's error says nothing about it

        def post_run_cell(result: Any) -> None:
            if result.error_in_exec is not None or result.error_before_exec is not None:
                self._stop_hf(interrupted=True)

        ip.events.register("post_run_cell", post_run_cell)
        self._ipython_off = lambda: ip.events.unregister("post_run_cell", post_run_cell)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_hf_handles"] = []
        state["_ipython_off"] = None
        return state


def _ipython() -> Any:
    mod = sys.modules.get("IPython")
    get = getattr(mod, "get_ipython", None) if mod is not None else None
    return get() if get is not None else None
