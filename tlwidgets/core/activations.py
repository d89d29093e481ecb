"""Forward hooks that summarise each leaf module's output.

The hooks are registered once and are nearly free while inactive (one Python
call that checks a flag); when active they queue a few reductions on the
output's device, collected with one host transfer by :meth:`collect`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.stats import to_host

__all__ = ["ActivationProbe", "first_tensor", "leaf_modules"]

#: Statistics per module, in this order.
FIELDS = ("mean", "std", "frac_zero", "dead_frac", "non_finite")


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules without children (the layers that compute), root excluded unless it is a leaf."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    return leaves or [("", model)]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module's output (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for v in obj.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def summarize(out: torch.Tensor) -> torch.Tensor:
    """``[mean, std, frac_zero, dead_frac, non_finite]`` of an activation, on its device.

    ``dead_frac`` is the fraction of units (channel dimension 1, or the last
    dimension of a 2-D output) that are never positive anywhere in the batch.
    """
    x = out.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    finite = torch.isfinite(x)
    non_finite = (~finite).sum().to(x.dtype)
    if x.dim() >= 2 and x.shape[0] > 0:
        dims = [d for d in range(x.dim()) if d != 1]
        alive = x.amax(dim=dims) > 0
        dead = 1.0 - alive.to(x.dtype).mean()
    else:
        dead = torch.zeros((), dtype=x.dtype, device=x.device)
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.stack([x.mean(), std, (x == 0).to(x.dtype).mean(), dead, non_finite])


class ActivationProbe:
    """Per-module activation statistics for the next forward pass(es).

    Parameters
    ----------
    model
        The model; hooks go on its leaf modules.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = leaf_modules(model)
        self.kinds = {name: type(m).__name__ for name, m in self.modules}
        self.active = False
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._order: list[str] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active:
                return
            t = first_tensor(output)
            if t is not None and t.numel():
                self._pending.append((name, summarize(t)))

        return hook

    def start(self) -> None:
        """Measure the following forward pass(es)."""
        self._pending.clear()
        self.active = True

    def collect(self) -> dict[str, dict[str, float]]:
        """Stop measuring; return ``{module: {mean, std, frac_zero, dead_frac, non_finite}}``.

        A module called several times in one pass keeps its last call. The dict
        keeps execution order.
        """
        self.active = False
        if not self._pending:
            return {}
        names = [n for n, _ in self._pending]
        flat = to_host([v for _, s in self._pending for v in s.unbind()])
        rows = flat.reshape(len(names), len(FIELDS))
        out: dict[str, dict[str, float]] = {}
        for name, row in zip(names, rows):
            out.pop(name, None)
            out[name] = {k: float(v) for k, v in zip(FIELDS, row)}
        self._pending.clear()
        return out

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False


def as_table(stats: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, float, float]]:
    """Compact tuples ``(mean, std, frac_zero, dead_frac)`` for the history."""
    return {k: (v["mean"], v["std"], v["frac_zero"], v["dead_frac"]) for k, v in stats.items()}


def non_finite_origin(stats: dict[str, dict[str, float]]) -> str | None:
    """The first module (execution order) whose output held NaN/Inf."""
    return next(
        (name for name, v in stats.items() if v["non_finite"] > 0 and np.isfinite(v["non_finite"])), None
    )
