"""Batches: split into inputs and targets, move to a device, describe."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["TARGET_KEYS", "call_model", "default_unpack", "describe", "tensors_in", "to_device"]

#: Dict keys taken as the target when a batch is a mapping.
TARGET_KEYS = ("target", "targets", "label", "labels", "y")

Unpack = Callable[[Any], tuple[Any, Any]]


def default_unpack(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch.

    Accepts a 2-sequence ``(inputs, targets)``, or a mapping with one of
    :data:`TARGET_KEYS` (the remaining entries are the inputs: one value, or a
    dict passed to the model as keyword arguments).

    Raises
    ------
    ValueError
        For layouts it cannot split; pass ``unpack=`` to the runner.
    """
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"batch is a dict with keys {sorted(batch)} and none of {TARGET_KEYS}; "
                "pass unpack=lambda b: (inputs, targets) to the Runner"
            )
        rest = {k: v for k, v in batch.items() if k != key}
        inputs = next(iter(rest.values())) if len(rest) == 1 else rest
        return inputs, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = (
        f"{type(batch).__name__} of length {len(batch)}"
        if isinstance(batch, (tuple, list))
        else type(batch).__name__
    )
    raise ValueError(
        f"a batch must be (inputs, targets) by default, got a {kind}; "
        "pass unpack=lambda b: (inputs, targets) to the Runner"
    )


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """Call the model the way the inputs ask: ``**dict``, ``*tuple`` or one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor in a nested tuple/list/dict structure to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return (
            type(obj)({k: to_device(v, device) for k, v in obj.items()})
            if isinstance(obj, dict)
            else {k: to_device(v, device) for k, v in obj.items()}
        )
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def tensors_in(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for each tensor in a nested structure."""
    if isinstance(obj, torch.Tensor):
        return [(prefix or "tensor", obj)]
    if isinstance(obj, Mapping):
        return [t for k, v in obj.items() for t in tensors_in(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (tuple, list)):
        return [t for i, v in enumerate(obj) for t in tensors_in(v, f"{prefix}[{i}]")]
    return []


def _structure(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return "Tensor"
    if isinstance(obj, Mapping):
        return {k: _structure(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_structure(v) for v in obj) if not hasattr(obj, "_fields") else type(obj).__name__
    return type(obj).__name__


def describe(inputs: Any, targets: Any, *, max_classes: int = 1000) -> dict[str, Any]:
    """What a batch holds: structure, shapes, dtypes, devices, value ranges and label counts.

    All numbers of all tensors are stacked and copied to the host once.

    Returns
    -------
    dict
        ``structure``, ``batch_size``, ``tensors`` (path -> shape, dtype,
        device, bytes, min, max, mean, std, non_finite), ``label_counts``
        (numpy int array, class index -> count) when targets are integer class
        indices, else None.
    """
    leaves = tensors_in(inputs, "inputs") + tensors_in(targets, "targets")
    info: dict[str, dict[str, Any]] = {}
    stat_tensors: list[torch.Tensor] = []
    stat_keys: list[str] = []
    with torch.no_grad():
        for path, t in leaves:
            info[path] = {
                "shape": tuple(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "device": str(t.device),
                "bytes": t.numel() * t.element_size(),
            }
            if t.numel() == 0 or t.is_complex() or t.dtype == torch.bool:
                continue
            f = t.detach().float()
            finite = torch.isfinite(f)
            n_bad = (~finite).sum()
            clean = torch.where(finite, f, torch.zeros((), dtype=f.dtype, device=f.device))
            stat_tensors.append(
                torch.stack(
                    [
                        torch.where(finite, f, torch.full((), float("inf"), device=f.device)).min(),
                        torch.where(finite, f, torch.full((), float("-inf"), device=f.device)).max(),
                        clean.mean(),
                        clean.std() if clean.numel() > 1 else torch.zeros((), device=f.device),
                        n_bad.float(),
                    ]
                ).cpu()
            )
            stat_keys.append(path)
    for path, row in zip(stat_keys, stat_tensors):
        lo, hi, mean, std, bad = (float(v) for v in row)
        info[path].update(min=lo, max=hi, mean=mean, std=std, non_finite=int(bad))
    batch_size = None
    for _, t in leaves:
        if t.dim() > 0:
            batch_size = int(t.shape[0])
            break
    label_counts = None
    if (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and targets.dim() == 1
        and targets.numel()
    ):
        t = targets.detach()
        if int(t.min()) >= 0 and int(t.max()) < max_classes:
            label_counts = torch.bincount(t.long()).cpu().numpy()
    return {
        "structure": _structure(inputs) if not isinstance(inputs, torch.Tensor) else "Tensor",
        "batch_size": batch_size,
        "tensors": info,
        "label_counts": label_counts,
        "non_finite": int(sum(v.get("non_finite", 0) for v in info.values())),
        "input_std": _overall(info, "inputs", "std"),
        "input_absmax": max(
            (
                max(abs(v.get("min", 0.0)), abs(v.get("max", 0.0)))
                for k, v in info.items()
                if k.startswith("inputs")
            ),
            default=None,
        ),
    }


def _overall(info: dict[str, dict[str, Any]], prefix: str, key: str) -> float | None:
    vals = [v[key] for k, v in info.items() if k.startswith(prefix) and key in v and "float" in v["dtype"]]
    return float(np.mean(vals)) if vals else None
