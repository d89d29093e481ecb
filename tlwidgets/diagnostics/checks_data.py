"""Explicit checks of the data alone: leakage, train/validation shift, channel order.

Each check takes the user's data as it is (a ``DataLoader``, any iterable of
``(inputs, targets)`` batches, a map-style ``Dataset``, an ``(X, y)`` pair of
tensors or a bare input tensor) and returns a :class:`~tlwidgets.core.findings.Finding`
or ``None``. Iterating a shuffling ``DataLoader`` draws from the global RNG, so
every check restores the global RNG states afterwards: running a check never
changes what training does next.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlwidgets.core.batches import default_unpack, tensors_in
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.checkpoint import capture_rng, restore_rng
from tlwidgets.core.findings import Finding

__all__ = [
    "as_batches",
    "check_channel_order",
    "check_data_leakage",
    "check_train_val_shift",
    "feature_view",
    "input_tensor",
    "rng_preserved",
]

Unpack = Callable[[Any], tuple[Any, Any]]

#: Batch size used to wrap a map-style ``Dataset`` or an ``(X, y)`` pair.
_WRAP_BATCH = 256


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore torch (CPU, CUDA), numpy and Python RNG states on exit."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].dim() > 0
        and data[1].dim() > 0
        and data[0].shape[0] == data[1].shape[0]
    )


def as_batches(data: Any, unpack: Unpack | None = None) -> Iterable[tuple[Any, Any]]:
    """Turn the accepted data layouts into an iterable of ``(inputs, targets)`` batches.

    Parameters
    ----------
    data
        A ``DataLoader`` or any iterable of batches; a map-style ``Dataset``
        (wrapped in an unshuffled ``DataLoader``); an ``(X, y)`` pair of tensors
        with the same first dimension (split into batches); or a bare tensor of
        inputs (targets ``None``).
    unpack
        ``unpack(batch) -> (inputs, targets)`` for other batch layouts.

    Returns
    -------
    Iterable of ``(inputs, targets)``
        Re-iterable when ``data`` is.
    """
    unpack = unpack or default_unpack
    if isinstance(data, torch.Tensor):
        return [(chunk, None) for chunk in data.split(_WRAP_BATCH)]
    if _is_pair(data):
        return list(zip(data[0].split(_WRAP_BATCH), data[1].split(_WRAP_BATCH)))
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        return _Unpacked(DataLoader(data, batch_size=_WRAP_BATCH, shuffle=False), unpack)
    try:
        iter(data)
    except TypeError:
        raise TypeError(
            f"data must be a DataLoader, an iterable of (inputs, targets) batches, a Dataset, "
            f"an (X, y) pair of tensors or a tensor; got {type(data).__name__}"
        ) from None
    return _Unpacked(data, unpack)


class _Unpacked:
    """Iterate ``data`` and split each batch with ``unpack``; re-iterable when ``data`` is."""

    def __init__(self, data: Iterable[Any], unpack: Unpack) -> None:
        self.data = data
        self.unpack = unpack

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.data:
            yield self.unpack(batch)


def input_tensor(inputs: Any) -> torch.Tensor | None:
    """The first floating-point tensor among the inputs (the one statistics are taken on)."""
    for _, t in tensors_in(inputs, "inputs"):
        if t.is_floating_point():
            return t
    leaves = tensors_in(inputs, "inputs")
    return leaves[0][1] if leaves else None


def _collect(data: Any, unpack: Unpack | None, limit: int | None) -> torch.Tensor | None:
    """Up to ``limit`` example rows of the first floating input tensor, on the CPU."""
    parts: list[torch.Tensor] = []
    n = 0
    with rng_preserved(), torch.no_grad():
        for inputs, _ in as_batches(data, unpack):
            t = input_tensor(inputs)
            if t is None or t.dim() == 0:
                continue
            t = t.detach().cpu()
            if limit is not None:
                t = t[: limit - n]
            parts.append(t)
            n += t.shape[0]
            if limit is not None and n >= limit:
                break
    if not parts:
        return None
    return torch.cat(parts)


# ---------------------------------------------------------------------- leakage
def _row_digests(data: Any, unpack: Unpack | None, limit: int | None) -> list[bytes]:
    """One digest per example over all of its input tensors (dtype and shape included)."""
    digests: list[bytes] = []
    with rng_preserved(), torch.no_grad():
        for inputs, _ in as_batches(data, unpack):
            leaves = [t for _, t in tensors_in(inputs, "inputs") if t.dim() > 0]
            if not leaves:
                continue
            n = leaves[0].shape[0]
            rows = []
            for t in leaves:
                a = t.detach().cpu()
                if a.is_floating_point():
                    a = a + 0.0  # -0.0 and 0.0 are the same value
                arr = a.contiguous().numpy().reshape(n, -1)
                head = f"{arr.dtype}{tuple(t.shape[1:])}".encode()
                rows.append((head, arr))
            for i in range(n):
                h = hashlib.blake2b(digest_size=16)
                for head, arr in rows:
                    h.update(head)
                    h.update(arr[i].tobytes())
                digests.append(h.digest())
                if limit is not None and len(digests) >= limit:
                    return digests
    return digests


def check_data_leakage(
    train_data: Any,
    val_data: Any,
    *,
    unpack: Unpack | None = None,
    min_fraction: float = 0.01,
    max_val_examples: int | None = None,
) -> Finding | None:
    """Find validation examples whose inputs also appear, byte for byte, in the training data.

    Every example's input tensors are hashed (values, dtype and shape); a
    validation example is *leaked* when the same digest occurs in training.
    Near-duplicates (augmented or re-encoded copies) are not detected.

    Parameters
    ----------
    train_data, val_data
        Any layout accepted by :func:`as_batches`.
    unpack
        ``unpack(batch) -> (inputs, targets)`` for other batch layouts.
    min_fraction
        Fraction of validation examples found in training from which the
        finding is an error (``data-leakage``); a smaller, non-zero overlap is
        reported with severity ``info`` (real datasets hold a few duplicates).
    max_val_examples
        Hash only the first this many validation examples (all by default).

    Returns
    -------
    Finding or None
        ``data-leakage`` with ``evidence`` ``leaked``, ``val_examples``,
        ``fraction`` and ``val_indices`` (the first leaked positions), or ``None``
        when no validation example occurs in training.
    """
    train = set(_row_digests(train_data, unpack, None))
    val = _row_digests(val_data, unpack, max_val_examples)
    if not val:
        raise ValueError("val_data holds no input tensors to compare")
    leaked = [i for i, d in enumerate(val) if d in train]
    if not leaked:
        return None
    fraction = len(leaked) / len(val)
    severe = fraction >= min_fraction
    return make_finding(
        "data-leakage",
        f"{len(leaked)} of {len(val)} validation examples ({fraction:.1%}) also appear in the training data",
        severity=None if severe else "info",
        evidence={
            "leaked": len(leaked),
            "val_examples": len(val),
            "train_examples": len(train),
            "fraction": fraction,
            "val_indices": leaked[:20],
        },
    )


# ---------------------------------------------------------------------- shift
def feature_view(x: torch.Tensor) -> torch.Tensor:
    """Examples x features: columns of a 2-D input, channels (dim 1) of a higher-dimensional one."""
    x = x.double()
    if x.dim() == 1:
        return x[:, None]
    if x.dim() == 2:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1).t()


def check_train_val_shift(
    train_data: Any,
    val_data: Any,
    *,
    unpack: Unpack | None = None,
    max_examples: int = 4096,
    smd_threshold: float = 1.0,
    min_fraction: float = 0.5,
    scale_ratio: float = 10.0,
) -> Finding | None:
    """Compare the input statistics of training and validation data.

    Features are the columns of 2-D inputs and the channels (dim 1) of image-
    or sequence-like inputs. For each feature the standardized mean difference
    ``|mean_t - mean_v| / sqrt((var_t + var_v) / 2)`` and the scale ratio
    ``max(std_t, std_v) / min(std_t, std_v)`` are computed; the data is flagged
    when at least ``min_fraction`` of the features have a standardized mean
    difference above ``smd_threshold``, or when the median scale ratio exceeds
    ``scale_ratio`` (e.g. one set scaled to [0, 1], the other raw 0-255).

    Parameters
    ----------
    train_data, val_data
        Any layout accepted by :func:`as_batches`; the first floating-point
        input tensor of each batch is used.
    unpack
        ``unpack(batch) -> (inputs, targets)`` for other batch layouts.
    max_examples
        Examples read from each set (the first ones).
    smd_threshold, min_fraction, scale_ratio
        The thresholds described above.

    Returns
    -------
    Finding or None
        ``train-val-shift`` (warning) with per-feature evidence, or ``None``.
    """
    xt = _collect(train_data, unpack, max_examples)
    xv = _collect(val_data, unpack, max_examples)
    if xt is None or xv is None:
        raise ValueError("both train_data and val_data must hold input tensors")
    if xt.shape[1:] != xv.shape[1:] and (xt.dim() < 2 or xt.shape[1] != xv.shape[1]):
        raise ValueError(
            f"training inputs {tuple(xt.shape[1:])} and validation inputs {tuple(xv.shape[1:])} "
            "have different feature layouts"
        )
    if xt.shape[0] < 2 or xv.shape[0] < 2:
        return None
    ft, fv = feature_view(xt), feature_view(xv)
    finite_t, finite_v = torch.isfinite(ft).all(0), torch.isfinite(fv).all(0)
    keep = finite_t & finite_v
    if not bool(keep.any()):
        return None
    ft, fv = ft[:, keep], fv[:, keep]
    mt, mv = ft.mean(0), fv.mean(0)
    st, sv = ft.std(0), fv.std(0)
    pooled = torch.sqrt((st**2 + sv**2) / 2)
    tiny = 1e-12
    differ = (mt - mv).abs() > tiny
    smd = torch.where(
        pooled > tiny, (mt - mv).abs() / pooled.clamp_min(tiny), torch.where(differ, np.inf, 0.0)
    )
    both = (st > tiny) & (sv > tiny)
    # Constant features in both sets with the same value say nothing; leave them out.
    informative = (pooled > tiny) | differ
    n_feat = int(informative.sum())
    if n_feat == 0:
        return None
    shifted = (smd > smd_threshold) & informative
    frac = int(shifted.sum()) / n_feat
    ratios = torch.where(
        both, torch.maximum(st, sv) / torch.minimum(st, sv).clamp_min(tiny), torch.ones_like(st)
    )
    ratios = ratios[informative & both] if bool((informative & both).any()) else torch.ones(1, dtype=st.dtype)
    median_ratio = float(ratios.median())
    if frac < min_fraction and median_ratio < scale_ratio:
        return None
    scale_v_over_t = float(torch.median(sv[both] / st[both])) if bool(both.any()) else float("nan")
    finite_smd = smd[informative & torch.isfinite(smd)]
    largest = float(finite_smd.max()) if finite_smd.numel() else float("inf")
    constant = int((informative & ~torch.isfinite(smd)).sum())
    parts = []
    if frac >= min_fraction:
        text = (
            f"the means differ by more than {smd_threshold:g} pooled standard deviation on "
            f"{int(shifted.sum())} of {n_feat} input features"
        )
        if finite_smd.numel():
            text += f" (up to {largest:.3g})"
        if constant:
            text += f", {constant} of them constant in both sets but at different values"
        parts.append(text)
    if median_ratio >= scale_ratio:
        parts.append(f"the validation inputs are on {scale_v_over_t:.3g}x the scale of the training inputs")
    return make_finding(
        "train-val-shift",
        "validation inputs are distributed unlike training inputs: " + "; ".join(parts),
        evidence={
            "features": n_feat,
            "shifted_features": int(shifted.sum()),
            "fraction_shifted": frac,
            "max_smd": largest,
            "constant_features_differing": constant,
            "median_scale_ratio": median_ratio,
            "val_over_train_scale": scale_v_over_t,
            "train_mean": mt.tolist()[:32],
            "val_mean": mv.tolist()[:32],
            "train_std": st.tolist()[:32],
            "val_std": sv.tolist()[:32],
            "train_examples": int(xt.shape[0]),
            "val_examples": int(xv.shape[0]),
        },
    )


# ---------------------------------------------------------------------- channel order
def _roughness(x: torch.Tensor) -> float:
    """Mean squared difference between vertically and horizontally adjacent pixels."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
    return float((dh + dw) / 2)


def check_channel_order(
    inputs: Any,
    *,
    channel_dim: int = 1,
    unpack: Unpack | None = None,
    max_examples: int = 256,
    ratio: float = 0.5,
) -> Finding | None:
    """Detect images stored channels-last that were reshaped (not permuted) to channels-first.

    What the bug is: an ``[N, H, W, C]`` array viewed as ``[N, C, H, W]`` keeps
    its memory order, so each "channel" holds a band of the image with the
    true channels interleaved along the width, and vertically adjacent
    "pixels" come from far-apart places. The check undoes the suspected bug
    (reads the same memory as ``[N, H, W, C]`` and permutes it to
    ``[N, C, H, W]``) and compares how smooth both readings are: images are
    smooth (neighbouring pixels are similar), so the correct reading has the
    smaller mean squared difference between neighbours. When the un-reshaped
    reading is much smoother (less than ``ratio`` times the roughness of the
    data as given), the data was reshaped. Correctly laid-out images give the
    opposite answer, and data without spatial structure (noise, tabular data)
    gives a ratio near 1, so neither is flagged.

    Parameters
    ----------
    inputs
        A batch of images ``[N, C, H, W]`` (channels at ``channel_dim``), or data
        in any layout accepted by :func:`as_batches` (its first batch is used).
    channel_dim
        Where the model expects the channels (1 for PyTorch's ``[N, C, H, W]``).
    unpack
        ``unpack(batch) -> (inputs, targets)`` for other batch layouts.
    max_examples
        Examples used.
    ratio
        Roughness ratio (reshaped reading / given) below which the data is flagged.

    Returns
    -------
    Finding or None
        ``channel-order`` (error) or ``None``; also ``None`` for inputs that are
        not 4-D or have a single channel (a reshape cannot interleave one channel).
    """
    if isinstance(inputs, torch.Tensor):
        x = inputs
    else:
        with rng_preserved():
            first = next(iter(as_batches(inputs, unpack)), None)
        if first is None:
            raise ValueError("the data holds no batch")
        x = input_tensor(first[0])
        if x is None:
            raise ValueError("the batch holds no input tensor")
    if x.dim() != 4 or (not x.is_floating_point() and x.dtype not in (torch.uint8, torch.int8, torch.int16)):
        return None
    with torch.no_grad():
        x = x.detach()[:max_examples].movedim(channel_dim, 1).double().cpu()
        n, c, h, w = x.shape
        if c < 2 or h < 2 or w < 2 or not bool(torch.isfinite(x).all()):
            return None
        given = _roughness(x)
        unreshaped = x.reshape(n, h, w, c).permute(0, 3, 1, 2)
        other = _roughness(unreshaped)
    if given <= 0 or other >= ratio * given:
        return None
    return make_finding(
        "channel-order",
        f"the {c}-channel images look like channels-last data reshaped to channels-first: read as "
        f"[N, H, W, C] and permuted, neighbouring pixels differ {given / max(other, 1e-300):.3g}x less "
        "than in the layout given to the model",
        evidence={
            "roughness_given": given,
            "roughness_permuted": other,
            "ratio": other / given,
            "shape": tuple(int(s) for s in (n, c, h, w)),
        },
    )
