"""Batches: split into inputs and targets, move to a device, describe."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from tlwidgets.core.stats import to_host

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
    if type(batch) is tuple or type(batch) is list:  # the common case first (a Mapping check is slow)
        if len(batch) == 2:
            return batch[0], batch[1]
    elif isinstance(batch, Mapping):
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
    if type(inputs) is torch.Tensor:  # the common case first (a Mapping check is slow)
        return model(inputs)
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


def tensor_stats(tensors: list[torch.Tensor], *, exact: bool = False, sample: int = 4096) -> np.ndarray:
    """``[min, max, mean, std, non_finite]`` per tensor, moved to the host in one transfer.

    With ``exact=False`` only one pass touches every element (a sum, which is
    NaN/Inf exactly when the tensor holds a NaN/Inf); min, max, mean and std
    come from a strided sample of at most ``sample`` elements. The exact
    count of non-finite values is computed only when the sum says there are
    some (rare). ``exact=True`` computes everything over all elements,
    ignoring NaN/Inf for the moments. Integer tensors get ``[min, max, 0, 0,
    0]``.

    Never raises on what a batch may hold: a sparse tensor is described as
    the dense tensor it stands for, from its stored values (see
    :func:`sparse_stats`); an empty tensor, or one whose statistics fail
    (a layout torch cannot reduce), gets NaN statistics and 0 non-finite.
    """
    out = np.full((len(tensors), 5), np.nan)
    if not tensors:
        return out
    out[:, 4] = 0.0
    dense = [i for i, t in enumerate(tensors) if t.layout == torch.strided and t.numel() and not t.is_meta]
    for i, t in enumerate(tensors):
        if t.layout != torch.strided and t.numel() and not t.is_meta:
            with contextlib.suppress(Exception):  # an exotic layout: statistics unknown (NaN)
                out[i] = sparse_stats(t)
    if dense:
        try:
            out[dense] = _dense_stats([tensors[i] for i in dense], exact=exact, sample=sample)
        except Exception:  # one odd tensor must not cost the others their statistics
            for i in dense:
                with contextlib.suppress(Exception):
                    out[i] = _dense_stats([tensors[i]], exact=exact, sample=sample)[0]
    return out


def _dense_stats(tensors: list[torch.Tensor], *, exact: bool, sample: int) -> np.ndarray:
    """:func:`tensor_stats` of strided, non-empty tensors."""
    if exact:
        return np.stack([_exact_stats(t) for t in tensors])
    # Sampled: the fewest torch ops (each costs microseconds on a CPU whatever its size), all
    # values gathered into one transfer; moments are finished on the host.
    values: list[torch.Tensor] = []
    kinds: list[tuple[str, int]] = []
    with torch.no_grad():
        for t in tensors:
            x = t.detach()
            if not x.is_floating_point():  # integers hold no NaN/Inf: range only
                lo, hi = torch.aminmax(x.reshape(-1))
                values += [lo, hi]
                kinds.append(("int", 0))
                continue
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            flat = x.reshape(-1)
            part = flat[:: max(1, flat.numel() // sample)]
            values += [part.amin(), part.amax(), part.sum(), part.dot(part), flat.sum()]
            kinds.append(("float", part.numel()))
    flat_values = to_host(values)
    out = np.zeros((len(tensors), 5))
    i = 0
    for row, (t, (kind, count)) in enumerate(zip(tensors, kinds)):
        if kind == "int":
            out[row, :2] = flat_values[i : i + 2]
            i += 2
            continue
        lo, hi, total, squares, full = (float(v) for v in flat_values[i : i + 5])
        i += 5
        mean = total / count
        var = max(0.0, (squares - count * mean * mean) / (count - 1)) if count > 1 else 0.0
        out[row] = (lo, hi, mean, math.sqrt(var) if math.isfinite(var) else math.nan, 0.0)
        if not math.isfinite(full):  # the sum saw a NaN/Inf: count them exactly (rare)
            out[row, 4] = float((~torch.isfinite(t.detach())).sum())
            if not np.isfinite(out[row, :4]).all():
                out[row] = _exact_stats(t)
    return out


def sparse_values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor (COO coalesced first: duplicates add up)."""
    if t.layout == torch.sparse_coo:
        return (t if t.is_coalesced() else t.coalesce()).values()
    return t.values()  # CSR, CSC, BSR, BSC


def sparse_stats(t: torch.Tensor) -> np.ndarray:
    """``[min, max, mean, std, non_finite]`` of the dense tensor a sparse tensor stands for.

    Exact, from the stored values alone (a sparse input is small where it is
    stored): the implicit zeros count in the range and the moments, NaN/Inf
    are left out of them (as in :func:`tensor_stats` with ``exact=True``).
    Integer values get ``[min, max, 0, 0, 0]``.
    """
    n = t.numel()
    with torch.no_grad():
        v = sparse_values(t.detach()).reshape(-1)
        implicit_zeros = v.numel() < n
        if v.numel() == 0:
            return np.array([0.0, 0.0, 0.0, 0.0, 0.0])
        if not v.is_floating_point():
            lo, hi = (float(a) for a in torch.aminmax(v))
            if implicit_zeros:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            return np.array([lo, hi, 0.0, 0.0, 0.0])
        x = v.double()
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, torch.zeros_like(x))
        inf = torch.full_like(x, math.inf)
        row = to_host(
            [
                torch.where(finite, x, inf).amin(),
                torch.where(finite, x, -inf).amax(),
                clean.sum(),
                clean.dot(clean),
                (~finite).sum().double(),
            ]
        )
    lo, hi, total, squares, bad = (float(a) for a in row)
    if implicit_zeros:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not math.isfinite(lo):  # every stored value is NaN/Inf
        lo = hi = math.nan
    mean = total / n
    var = max(0.0, (squares - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    return np.array([lo, hi, mean, math.sqrt(var), bad])


def _nbytes(t: torch.Tensor) -> int:
    """Bytes the tensor holds: its elements, or for a sparse tensor its indices and values."""
    if t.layout == torch.strided:
        return t.numel() * t.element_size()
    if t.layout == torch.sparse_coo:
        parts = [t._indices(), t._values()]  # defined on an uncoalesced tensor too
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
    else:
        return 0
    return sum(p.numel() * p.element_size() for p in parts)


def _exact_stats(t: torch.Tensor) -> np.ndarray:
    """``[min, max, mean, std, non_finite]`` over every element (NaN/Inf left out of the moments)."""
    with torch.no_grad():
        x = t.detach()
        if not x.is_floating_point():
            lo, hi = torch.aminmax(x.reshape(-1))
            return np.array([float(lo), float(hi), 0.0, 0.0, 0.0])
        flat = x.float().reshape(-1) if x.dtype not in (torch.float32, torch.float64) else x.reshape(-1)
        finite = torch.isfinite(flat)
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        clean = torch.where(finite, flat, zero)
        row = torch.stack(
            [
                torch.where(finite, flat, torch.full_like(zero, float("inf"))).amin(),
                torch.where(finite, flat, torch.full_like(zero, float("-inf"))).amax(),
                clean.mean(),
                clean.std() if clean.numel() > 1 else zero,
                (~finite).sum().to(flat.dtype),
            ]
        )
        return row.cpu().double().numpy()


def _per_token(targets: torch.Tensor, leaves: list[tuple[str, torch.Tensor]]) -> bool:
    """The targets are one per token of an integer input of 2+ dims (a sequence of token ids):
    next-token prediction (a language model's ``(seq, batch)`` input and its flattened targets),
    tagging, a seq2seq decoder's input. Their classes are the words of a language, whose
    frequencies are skewed by nature (Zipf), not the labels of examples."""
    n = targets.numel()
    return any(
        path.startswith("inputs")
        and t.layout == torch.strided
        and t.dim() >= 2
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype != torch.bool
        and t.numel() == n
        for path, t in leaves
    )


def describe(
    inputs: Any, targets: Any, *, exact: bool = True, stats: bool = True, max_classes: int = 100_000
) -> dict[str, Any]:
    """What a batch holds: structure, shapes, dtypes, devices, value ranges and label counts.

    Parameters
    ----------
    inputs, targets
        The unpacked batch.
    exact
        Exact ranges over every element; else ranges from a sample and one
        full pass for NaN/Inf detection (see :func:`tensor_stats`).
    stats
        False: structure, shapes, dtypes and devices only (no pass over the
        data; ``non_finite`` and ``label_counts`` are None).

    Returns
    -------
    dict
        ``structure``, ``batch_size``, ``tensors`` (path -> shape, dtype,
        device, bytes, min, max, mean, std, non_finite), ``label_counts``
        (numpy int array, class index -> count) when targets are integer class
        indices (not one per token of an integer input: see :func:`_per_token`),
        else None, ``non_finite`` (total), ``input_std``,
        ``input_absmax``, ``exact``.
    """
    leaves = tensors_in(inputs, "inputs") + tensors_in(targets, "targets")
    info: dict[str, dict[str, Any]] = {}
    numeric = []
    sparse: set[str] = set()
    for path, t in leaves:
        try:
            entry: dict[str, Any] = {
                "shape": tuple(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "device": str(t.device),
                "bytes": _nbytes(t),
            }
        except Exception:  # a tensor subclass or layout without a plain shape (nested tensors)
            info[path] = {"shape": None, "dtype": str(t.dtype).replace("torch.", ""), "device": str(t.device)}
            continue
        if t.layout != torch.strided:
            entry["layout"] = str(t.layout).replace("torch.", "")
            sparse.add(path)
        info[path] = entry
        if stats and not t.is_complex() and t.dtype != torch.bool:
            numeric.append((path, t))  # an empty tensor too: NaN statistics say "nothing there"
    values = tensor_stats([t for _, t in numeric], exact=exact)
    for (path, _), row in zip(numeric, values.tolist()):
        info[path].update(min=row[0], max=row[1], non_finite=int(row[4]))
        if info[path]["dtype"].startswith(("float", "bfloat")):
            info[path].update(mean=row[2], std=row[3])
    batch_size = next((int(v["shape"][0]) for v in info.values() if v["shape"]), None)
    structure = _structure(inputs) if not isinstance(inputs, torch.Tensor) else "Tensor"
    if not stats:  # no values read: no label counts, scale or NaN count (what follows derives them)
        return {
            "structure": structure,
            "batch_size": batch_size,
            "tensors": info,
            "label_counts": None,
            "non_finite": None,
            "input_std": None,
            "input_absmax": None,
            "exact": exact,
            "measured": stats,
        }
    label_counts = None
    if (
        stats
        and isinstance(targets, torch.Tensor)
        and targets.layout == torch.strided
        and not targets.is_floating_point()
        and targets.dim() == 1
        and targets.numel()
        and targets.dtype != torch.bool
    ):
        lo, hi = info["targets"]["min"], info["targets"]["max"]
        if lo >= 0 and hi < max_classes and not _per_token(targets, leaves):  # NaN: False
            label_counts = torch.bincount(targets.detach().long()).cpu().numpy()
    # The scale of the dense floating inputs (a sparse input, e.g. an adjacency matrix, is structure).
    float_inputs = [
        v
        for k, v in info.items()
        if k.startswith("inputs")
        and k not in sparse
        and "float" in v["dtype"]
        and math.isfinite(v.get("std", math.nan))
    ]
    ranged = [v for v in float_inputs if math.isfinite(v["min"]) and math.isfinite(v["max"])]
    return {
        "structure": structure,
        "batch_size": batch_size,
        "tensors": info,
        "label_counts": label_counts,
        "non_finite": int(sum(v.get("non_finite", 0) for v in info.values())) if stats else None,
        "input_std": float(np.mean([v["std"] for v in float_inputs])) if float_inputs else None,
        "input_absmax": max((max(abs(v["min"]), abs(v["max"])) for v in ranged), default=None),
        "exact": exact,
        "measured": stats,
    }
