"""Forward hooks that summarise each leaf module's output.

The hooks exist only while a pass is measured (:meth:`ActivationProbe.start`
to :meth:`ActivationProbe.collect`): a module with a forward hook takes
PyTorch's slower call path, which would cost every unmeasured step too. While
measuring they queue four reductions per module on the output's device,
collected with one host transfer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.stats import to_host

__all__ = ["ActivationProbe", "finish", "first_tensor", "leaf_modules", "summarize"]


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules without children (the layers that compute), root excluded unless it is a leaf."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    return leaves or [("", model)]


def first_tensor(obj: Any, _depth: int = 0) -> torch.Tensor | None:
    """The first floating-point tensor in a module's output.

    Looks through tuples, lists, mappings, dataclasses (Hugging Face's
    ``ModelOutput`` is one) and plain objects with attributes (a
    ``SimpleNamespace``), a few levels deep.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if _depth > 4 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return None
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = (getattr(obj, f.name, None) for f in dataclasses.fields(obj))
    elif isinstance(getattr(obj, "__dict__", None), dict) and not isinstance(obj, nn.Module):
        values = vars(obj).values()
    else:
        return None
    for v in values:
        t = first_tensor(v, _depth + 1)
        if t is not None:
            return t
    return None


def summarize(out: torch.Tensor) -> list[torch.Tensor]:
    """``[sum, sum of squares, nonzero, alive]`` of an activation, on its device (6 small ops).

    ``nonzero`` counts non-zero elements; ``alive`` counts units (channel
    dimension 1, or the last dimension of a 2-D output) positive somewhere in
    the batch. :func:`finish` turns them into mean, std and fractions on the
    host. Each torch op costs several microseconds on a CPU whatever its size,
    so this takes the fewest: a dot product for the sum of squares (torch.std
    takes a slow two-pass path) and no per-module stacking.
    """
    x = out.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    flat = x.reshape(-1)
    total = flat.sum()
    squares = flat.dot(flat)
    nonzero = torch.count_nonzero(flat)
    if x.dim() >= 2 and x.shape[0] > 0:
        dims = 0 if x.dim() == 2 else [d for d in range(x.dim()) if d != 1]
        alive = (x.amax(dim=dims) > 0).sum()
    else:
        alive = nonzero
    return [total, squares, nonzero, alive]


def finish(row: np.ndarray, out: torch.Tensor) -> dict[str, float]:
    """Host-side statistics from :func:`summarize`'s values; NaN/Inf counted only when the sum shows some."""
    total, squares, nonzero, alive = (float(v) for v in row)
    n = out.numel()
    mean = total / n
    # Variance from the raw moments, in float64 on the host (clipped at 0 against rounding).
    var = max(0.0, (squares - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    units = out.shape[1] if out.dim() >= 2 and out.shape[0] > 0 else 0
    # A NaN/Inf anywhere makes the sum NaN/Inf: count them exactly only then (rare).
    finite = math.isfinite(total) and math.isfinite(squares)
    non_finite = 0.0 if finite else float((~torch.isfinite(out.detach())).sum())
    return {
        "mean": mean,
        "std": math.sqrt(var) if finite else math.nan,
        "frac_zero": 1.0 - nonzero / n,
        "dead_frac": 1.0 - alive / units if units else 0.0,
        "non_finite": non_finite,
    }


class ActivationProbe:
    """Per-module activation statistics for the next forward pass(es).

    Parameters
    ----------
    model
        The model; hooks go on its leaf modules while measuring.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = leaf_modules(model)
        self.kinds = {name: type(m).__name__ for name, m in self.modules}
        self._pending: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []
        self._handles: list[Any] = []
        self._closed = False
        #: Failures of the statistics hooks (kept, never raised into the model's forward).
        self.errors: list[str] = []

    @property
    def active(self) -> bool:
        """True while a pass is being measured (hooks installed)."""
        return bool(self._handles)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Runs inside the user's forward: a failure here must not become theirs.
            try:
                t = first_tensor(output)
                if t is not None and t.numel() and not t.is_sparse:
                    self._pending.append((name, summarize(t), t))
            except Exception as exc:
                where = name or "<model>"
                self.errors.append(f"activation statistics of {where}: {type(exc).__name__}: {exc}")
                del self.errors[:-20]

        return hook

    def start(self) -> None:
        """Measure the following forward pass(es): install the hooks."""
        self._pending.clear()
        if self._closed or self._handles:
            return
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def stop(self) -> None:
        """Remove the hooks and drop what was queued (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending.clear()

    def collect(self) -> dict[str, dict[str, float]]:
        """Stop measuring; return ``{module: {mean, std, frac_zero, dead_frac, non_finite}}``.

        A module called several times in one pass keeps its last call. The dict
        keeps execution order.
        """
        pending = list(self._pending)
        self.stop()
        if not pending:
            return {}
        flat = to_host([v for _, s, _ in pending for v in s])
        rows = flat.reshape(len(pending), 4)
        out: dict[str, dict[str, float]] = {}
        for (name, _, t), row in zip(pending, rows):
            out.pop(name, None)
            out[name] = finish(row, t)
        return out

    def close(self) -> None:
        """Remove the hooks for good (idempotent)."""
        self.stop()
        self._closed = True


def as_table(stats: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, float, float]]:
    """Compact tuples ``(mean, std, frac_zero, dead_frac)`` for the history."""
    return {k: (v["mean"], v["std"], v["frac_zero"], v["dead_frac"]) for k, v in stats.items()}


def non_finite_origin(stats: dict[str, dict[str, float]]) -> str | None:
    """The first module (execution order) whose output held NaN/Inf."""
    return next(
        (name for name, v in stats.items() if v["non_finite"] > 0 and np.isfinite(v["non_finite"])), None
    )
