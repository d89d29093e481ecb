"""Export a :class:`~tlwidgets.core.history.History` to pandas or TensorBoard (both optional)."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np

from tlwidgets.core.stats import update_ratio

__all__ = ["TensorBoardLogger", "history_to_dataframe", "history_to_tensorboard"]

_STATS = ("grad_norm", "weight_norm", "update_norm", "update_ratio")


def history_to_dataframe(history: Any, wide: bool = True) -> Any:
    """The per-step history as a ``pandas.DataFrame``.

    Parameters
    ----------
    history
        A :class:`~tlwidgets.core.history.History`.
    wide
        One row per step with columns ``step``, ``epoch``, ``exact``, ``loss``,
        ``lr/<group>`` and ``<stat>/<param>`` (True), or a long table with one
        row per step and parameter (False).

    Raises
    ------
    ImportError
        When pandas is not installed (``pip install pandas``).
    """
    try:
        import pandas as pd
    except ImportError as exc:  # optional dependency
        raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
    steps = history.step
    base = {"step": steps, "epoch": history.epoch, "exact": history.exact, "loss": history.loss}
    lr = history.lr
    if wide:
        cols: dict[str, Any] = dict(base)
        for g in range(lr.shape[1] if lr.ndim == 2 else 0):
            cols[f"lr/{g}"] = lr[:, g]
        for stat in _STATS:
            values = getattr(history, stat)
            for j, name in enumerate(history.param_names):
                cols[f"{stat}/{name}"] = values[:, j]
        return pd.DataFrame(cols)
    n, p = len(steps), len(history.param_names)
    long = {
        "step": np.repeat(steps, p),
        "param": np.tile(np.array(history.param_names, dtype=object), n),
    }
    for stat in _STATS:
        long[stat] = getattr(history, stat).reshape(-1)
    return pd.DataFrame(long)


def history_to_tensorboard(
    history: Any,
    log_dir: str | os.PathLike[str] | None = None,
    *,
    writer: Any = None,
    histogram_every: int = 0,
    model: Any = None,
) -> str:
    """Write the history as TensorBoard scalars (and optional weight histograms).

    Scalars: ``loss``, ``lr/<group>``, ``val_loss`` and, per parameter,
    ``grad_norm/<param>``, ``update_ratio/<param>``. With ``histogram_every``
    > 0 and a ``model``, also writes histograms of the model's *current*
    weights (the history keeps numbers, not tensors, so histograms of past
    steps are not available).

    Parameters
    ----------
    history
        The history to write.
    log_dir
        Folder for the event file (default: a new temporary folder).
    writer
        An existing ``torch.utils.tensorboard.SummaryWriter`` to use instead.
    histogram_every, model
        See above.

    Returns
    -------
    str
        The log directory written to.

    Raises
    ------
    ImportError
        When the ``tensorboard`` package is missing (``pip install tensorboard``).
    """
    own = writer is None
    if own:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # optional dependency
            raise ImportError("to_tensorboard() needs tensorboard: pip install tensorboard") from exc
        log_dir = str(log_dir) if log_dir is not None else tempfile.mkdtemp(prefix="tlwidgets-tb-")
        writer = SummaryWriter(log_dir=log_dir)
    try:
        steps = history.step
        loss, lr = history.loss, history.lr
        grad, ratio = history.grad_norm, history.update_ratio
        for i, step in enumerate(steps):
            s = int(step)
            if math.isfinite(loss[i]):
                writer.add_scalar("loss", loss[i], s)
            for g in range(lr.shape[1]):
                if math.isfinite(lr[i, g]):
                    writer.add_scalar(f"lr/{g}", lr[i, g], s)
            for j, name in enumerate(history.param_names):
                if math.isfinite(grad[i, j]):
                    writer.add_scalar(f"grad_norm/{name}", grad[i, j], s)
                if math.isfinite(ratio[i, j]):
                    writer.add_scalar(f"update_ratio/{name}", ratio[i, j], s)
        for s, v in history.val_loss:
            writer.add_scalar("val_loss", v, int(s))
        if histogram_every > 0 and model is not None and len(steps):
            for name, p in model.named_parameters():
                writer.add_histogram(f"weights/{name}", p.detach().cpu(), int(steps[-1]))
        writer.flush()
        return str(getattr(writer, "log_dir", log_dir))
    finally:
        if own:
            writer.close()


class TensorBoardLogger:
    """Stream a Runner's or watcher's steps to TensorBoard while it trains.

    Subscribes to ``Event.STEP``/``Event.EPOCH``: writes the loss, LRs and
    per-parameter grad norm and update ratio every step, and histograms of
    every parameter (weights, and gradients when present) every
    ``histogram_every`` steps. Histograms read every weight, so keep the
    interval large (it is the expensive part: see DESIGN section 7).

    Use as a context manager or call :meth:`close`.

    Parameters
    ----------
    session
        A :class:`~tlwidgets.core.runner.Runner` or :class:`~tlwidgets.core.watch.Watcher`.
    log_dir
        Event-file folder (default: a new temporary folder).
    histogram_every
        Steps between histograms; 0 disables them.
    """

    def __init__(
        self, session: Any, log_dir: str | os.PathLike[str] | None = None, *, histogram_every: int = 100
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # optional dependency
            raise ImportError("TensorBoardLogger needs tensorboard: pip install tensorboard") from exc
        from tlwidgets.core.events import Event

        self.session = session
        self.histogram_every = histogram_every
        self.log_dir = str(log_dir) if log_dir is not None else tempfile.mkdtemp(prefix="tlwidgets-tb-")
        self.writer = SummaryWriter(log_dir=self.log_dir)
        self._off = [
            session.events.on(Event.STEP, self._on_step),
            session.events.on(Event.EPOCH, self._on_epoch),
        ]

    def _on_step(self, summary: Any) -> None:
        s, w, h = summary.step, self.writer, self.session.history
        if math.isfinite(summary.loss):
            w.add_scalar("loss", summary.loss, s)
        for g, lr in enumerate(summary.lr):
            w.add_scalar(f"lr/{g}", lr, s)
        row = h.last()
        if row is not None:
            ratio = update_ratio(row["update_norm"], row["weight_norm"])  # NaN on an unmeasured row
            for j, name in enumerate(h.param_names):
                if math.isfinite(row["grad_norm"][j]):
                    w.add_scalar(f"grad_norm/{name}", row["grad_norm"][j], s)
                if math.isfinite(ratio[j]):
                    w.add_scalar(f"update_ratio/{name}", ratio[j], s)
        if self.histogram_every > 0 and s % self.histogram_every == 0:
            for name, p in self.session.named_params:
                w.add_histogram(f"weights/{name}", p.detach().float().cpu(), s)
                if p.grad is not None:
                    w.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), s)

    def _on_epoch(self, record: Any) -> None:
        self.writer.add_scalar("train_loss_epoch", record.train_loss, record.step)
        if record.val_loss is not None:
            self.writer.add_scalar("val_loss", record.val_loss, record.step)

    def close(self) -> None:
        """Unsubscribe and close the event file (idempotent)."""
        for off in self._off:
            off()
        self._off = []
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
