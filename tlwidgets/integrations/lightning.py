"""``DebugCallback`` for PyTorch Lightning (``lightning.pytorch`` and ``pytorch_lightning``).

>>> from tlwidgets.integrations.lightning import DebugCallback          # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[cb := DebugCallback()])              # doctest: +SKIP
>>> trainer.fit(module, train_loader, val_loader); cb.findings          # doctest: +SKIP

The callback class derives from the ``Callback`` of every Lightning package
that is installed (``lightning.pytorch`` and/or ``pytorch_lightning``), so one
``DebugCallback`` passes either Trainer's ``isinstance`` check. Importing
this module imports Lightning; ``import tlwidgets`` does not.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from typing import Any

import torch

from tlwidgets.integrations._base import CallbackAdapter, missing_extra

__all__ = ["DebugCallback"]

#: Keys of ``trainer.callback_metrics`` read as the validation loss, in this order, when the
#: validation steps return no loss (``val_loss_key=`` chooses another).
VAL_LOSS_KEYS = ("val_loss", "val/loss", "validation_loss", "valid_loss", "loss/val", "val_loss_epoch")
#: ... and as the validation accuracy (stored as ``accuracy`` in the epoch record).
VAL_ACC_KEYS = ("val_acc", "val_accuracy", "val/acc", "val/accuracy", "valid_acc", "validation_accuracy")


def _callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of each installed Lightning package (new name first)."""
    bases: list[type] = []
    errors: list[ImportError] = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError as exc:
            errors.append(exc)
    if not bases:
        raise missing_extra("lightning (or pytorch_lightning)", "lightning", errors[0])
    return tuple(dict.fromkeys(bases))  # one class if a package re-exports the other's


def _scalar(value: Any) -> float | None:
    """A finite-or-not float from a scalar tensor or number; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class _LightningHooks(CallbackAdapter):
    """The Lightning hooks of :class:`DebugCallback` (the Callback bases come after it)."""

    def __init__(self, *, val_loss_key: str | None = None, **watch_options: Any) -> None:
        super().__init__()
        self._init_adapter(watch_options)
        self.val_loss_key = val_loss_key
        self._val_losses: list[tuple[float, int]] = []

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if not optimizers:  # configure_optimizers returned none: nothing trains, nothing to watch
            warnings.warn(
                "DebugCallback: the Trainer has no optimizer at fit start (configure_optimizers returned "
                "none); this fit is not watched",
                stacklevel=2,
            )
            return
        optimizer = optimizers[0]
        # Lightning keeps torch optimizers in trainer.optimizers; unwrap a LightningOptimizer anyway.
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        scheduler = None
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                scheduler = config.scheduler
                break
        if len(optimizers) > 1:
            warnings.warn(
                f"DebugCallback watches the first of the {len(optimizers)} optimizers "
                "(configure_optimizers); the others' steps are not followed",
                stacklevel=2,
            )
        self._val_losses.clear()
        self._start(pl_module, optimizer, scheduler)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        w = self.session
        if w is None or w.closed:
            return
        w.epoch = int(trainer.current_epoch)
        w.apply_pending()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        w = self.session
        if w is None or w.closed or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # Automatic optimization backpropagates loss / accumulate_grad_batches: record the step's loss.
        scale = 1.0
        if getattr(pl_module, "automatic_optimization", True):
            scale = float(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        w.record_loss(loss, scale=scale)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop(interrupted=False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop(interrupted=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # after on_fit_end/on_exception; closes what an early failure left open
            self._stop(interrupted=True)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_losses.clear()

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.val_loss_key is not None:
            return
        value = outputs.get("val_loss", outputs.get("loss")) if isinstance(outputs, dict) else outputs
        loss = _scalar(value)
        if loss is not None:
            self._val_losses.append((loss, _batch_size(batch)))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        w = self.session
        if w is None or w.closed or getattr(trainer, "sanity_checking", False):
            return
        metrics = dict(getattr(trainer, "callback_metrics", None) or {})
        val: float | None = None
        if self._val_losses:  # per-example mean of what validation_step returned
            total = sum(n for _, n in self._val_losses)
            val = sum(v * n for v, n in self._val_losses) / total if total else None
        keys = (self.val_loss_key,) if self.val_loss_key is not None else VAL_LOSS_KEYS
        if val is None:
            val = next((v for k in keys if (v := _scalar(metrics.get(k))) is not None), None)
        extra = {}
        acc = next((v for k in VAL_ACC_KEYS if (v := _scalar(metrics.get(k))) is not None), None)
        if acc is not None and math.isfinite(acc):
            extra["accuracy"] = acc
        if val is None and not extra:
            return  # validation reported nothing we can read as a loss
        w.record_validation(val, epoch=int(trainer.current_epoch), metrics=extra)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # Lightning binds the module's log/log_dict onto every callback at fit (and again at the next).
        for key in ("log", "log_dict"):
            if inspect.ismethod(state.get(key)):
                del state[key]
        return state


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(first, dict):
        first = next(iter(first.values()), None)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _make_class() -> type:
    bases = _callback_bases()
    doc = (
        "Watch a Lightning ``trainer.fit``: findings, history and ``tlw.Dashboard(cb)``.\n\n"
        "A ``Callback`` of every installed Lightning package ("
        + ", ".join(f"``{b.__module__.split('.')[0]}``" for b in bases)
        + "). At fit start it creates a watcher (``tlw.watch``'s tracking) on the LightningModule, the "
        "first optimizer of ``configure_optimizers`` and its scheduler; the loss comes from "
        "``on_before_backward``, validation from the validation loop (the loss ``validation_step`` "
        "returns, else ``trainer.callback_metrics['val_loss']``, see ``val_loss_key``). Controls "
        "(``cb.freeze``, ``cb.set_lr``, a dashboard's toggles) act at the next batch start. Each fit "
        "gets a new watcher (``cb.watchers``), finished and closed at fit end or when the fit raises.\n\n"
        "Parameters\n----------\nval_loss_key\n    The ``callback_metrics`` key of the validation loss.\n"
        "**watch_options\n    Options of :class:`~tlwidgets.Watcher` (``measure_every``, ...)."
    )
    return type("DebugCallback", (_LightningHooks, *bases), {"__doc__": doc, "__module__": __name__})


try:
    DebugCallback = _make_class()
except ImportError as _exc:  # neither package: say which extra to install, on import
    raise missing_extra("lightning (or pytorch_lightning)", "lightning", _exc) from _exc
