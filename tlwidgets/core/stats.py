"""Per-parameter statistics computed on the tensors' own device, batched.

Two modes:

* **exact**: norms of whole tensors; the update norm needs a full snapshot of
  the weights before the optimizer step (about seven passes over the weights,
  roughly 20-40% of a CPU training step). Used when a stage is stepped alone.
* **sampled** (the default during ``step()``/``run()``): every tensor larger
  than ``sample_size`` gets a fixed subset of ``sample_size`` elements: 32
  blocks of consecutive elements spread evenly over the tensor, at a random
  offset, with a block period that shares no factor with the row length (so
  the blocks land on different columns of a matrix or filter). Consecutive
  elements keep the reads cache friendly: a subset of single elements far
  apart costs one cache miss per element, several times the price of the
  same number of elements in blocks. ``numel / count`` times the subset's
  sum of squares estimates the tensor's sum of squares (relative error
  roughly ``1/sqrt(2 * count)`` for homogeneous tensors); the update/weight
  ratio is taken on the same subset. Smaller tensors are taken whole (exact).
  Snapshot, difference and norms of all tensors together are a handful of
  ops on one ``(rows, tensors, sample_size)`` buffer.

Grad norms are exact whenever the pass fits the time budget (see
:class:`GradNormSchedule`): they are cheap compared to updates (one read of the
gradients) and they also detect NaN/Inf anywhere in a gradient.

Nothing here calls ``.item()`` per parameter: every per-step quantity is stacked
on its device and moved to the host once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GradNormSchedule", "ParamSampler", "ParamStats", "to_host", "total_norm", "update_ratio"]


def to_host(values: Sequence[torch.Tensor]) -> np.ndarray:
    """Stack 0-d tensors (possibly on several devices) and copy them to the host once per device."""
    if not values:
        return np.zeros(0, dtype=np.float64)
    try:  # the common case: one device (torch.stack promotes mixed float dtypes)
        stacked = torch.stack(list(values))
    except RuntimeError:
        pass
    else:  # the float64 conversion on the host: one torch op less
        if stacked.dtype is torch.bfloat16:  # (numpy has no bfloat16)
            stacked = stacked.float()
        return _numpy(stacked).astype(np.float64)
    devices = {v.device for v in values}
    # A model split over devices: one transfer per device, then reassemble.
    out = np.empty(len(values), dtype=np.float64)
    for dev in devices:
        idx = [i for i, v in enumerate(values) if v.device == dev]
        out[idx] = torch.stack([values[i].float() for i in idx]).cpu().double().numpy()
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    """``t.cpu().numpy()``, without the ``cpu()`` call for a tensor on the CPU already."""
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # on a device (or anything else numpy() refuses: as before)
        return t.cpu().numpy()


def total_norm(norms: np.ndarray) -> float:
    """Norm of several tensors together from their norms (NaN entries left out)."""
    vals = np.asarray(norms, dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    return float(np.sqrt(vals.dot(vals)))


def update_ratio(update_norm: np.ndarray, weight_norm: np.ndarray) -> np.ndarray:
    """``update_norm / weight_norm``; a zero update of a zero tensor is 0, not NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(update_norm, dtype=np.float64) / np.asarray(weight_norm, dtype=np.float64)
    ratio[(np.asarray(update_norm) == 0) & (np.asarray(weight_norm) == 0)] = 0.0
    return ratio


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view sharing ``t``'s storage, or None when no such view exists."""
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return None


class ParamSampler:
    """Fixed block subsets of each parameter (and of its gradient).

    Parameters
    ----------
    params
        The tensors to sample, in a fixed order.
    sample_size
        Elements taken per tensor. Tensors no larger than this are taken whole
        (their statistics are exact).
    seed
        Seed of the private generator choosing the offsets (the global RNG is
        never touched, so training stays bit-for-bit reproducible).
    """

    #: Blocks per sampled tensor (the block length is ``sample_size // BLOCKS``).
    BLOCKS = 32

    def __init__(self, params: Sequence[torch.Tensor], sample_size: int = 1024, seed: int = 0) -> None:
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        gen = np.random.default_rng(seed)
        self.params = list(params)
        self.sample_size = sample_size
        #: Per tensor ``(blocks, block length, period, offset)``, or None when taken whole.
        self.layouts: list[tuple[int, int, int, int] | None] = []
        counts: list[int] = []
        for p in self.params:
            n = p.numel()
            # A weight we cannot view as 1-D (odd strides) is taken whole: its
            # live view must see in-place updates, which a reshaped copy would not.
            layout = _block_layout(p, sample_size, gen) if _flat_view(p) is not None else None
            self.layouts.append(layout)
            counts.append(layout[0] * layout[1] if layout else max(1, n))
        numels = np.array([max(1, p.numel()) for p in self.params], dtype=np.float64)
        #: sqrt(numel / count): turns a subset norm into a whole-tensor estimate.
        self.scale = np.sqrt(numels / np.array(counts, dtype=np.float64))
        self._views: list[torch.Tensor] | None = None
        self._ptrs: list[int] = []
        # One device for all parameters: every sample gets a fixed slot of one (rows, P, K)
        # buffer, so snapshot, difference and all norms are a few ops whatever P is (a
        # per-tensor op on a strided view costs ~2-10 us).
        self.fused = bool(self.params) and len({p.device for p in self.params}) == 1
        self._buffer: torch.Tensor | None = None
        #: Views of the buffer's rows used every measured step: (before, after, both), made once.
        self.rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._slots: list[list[torch.Tensor]] = []
        self._slots_for: list[torch.Tensor] | None = None

    def sample(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """The sampled elements of parameter ``i``'s layout in ``t`` (its weight or its gradient)."""
        layout = self.layouts[i]
        if layout is None:
            return t.detach()
        flat = _flat_view(t)
        if flat is None:  # e.g. a gradient laid out differently from its weight: sample a flat copy
            flat = t.detach().reshape(-1)
        blocks, length, period, offset = layout
        return flat.as_strided((blocks, length), (period, 1), flat.storage_offset() + offset)

    def weight_views(self) -> list[torch.Tensor]:
        """Views of the sampled weight elements (live: they see in-place updates)."""
        ptrs = [p.data_ptr() for p in self.params]
        if self._views is None or ptrs != self._ptrs:  # storage replaced (p.data = ...)
            self._views = [self.sample(i, p) for i, p in enumerate(self.params)]
            self._ptrs = ptrs
        return self._views

    def slots(self, views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """The ``(3, P, K)`` buffer (rows: weights before, weights after, gradients; zero
        padded) and, per row, the slot of each parameter's sample (flat, contiguous).

        ``views``: :meth:`weight_views` when the caller has just asked for them (each call checks
        every weight's storage).
        """
        if views is None:
            views = self.weight_views()
        if self._buffer is None or self._slots_for is not views:
            ref = views[0]
            dtype = torch.float64 if any(v.dtype == torch.float64 for v in views) else torch.float32
            width = max(1, max(v.numel() for v in views))
            self._buffer = torch.zeros((3, len(views), width), dtype=dtype, device=ref.device)
            self._slots = [
                [self._buffer[r, i, : v.numel()].view(v.shape) for i, v in enumerate(views)] for r in range(3)
            ]
            self.rows = (self._buffer[0], self._buffer[1], self._buffer[:2])
            self._slots_for = views
        return self._buffer, self._slots

    def grad_views(self) -> list[torch.Tensor | None]:
        """Views of the sampled gradient elements (None where there is no grad, or a sparse one)."""
        return [
            None if p.grad is None or p.grad.is_sparse else self.sample(i, p.grad)
            for i, p in enumerate(self.params)
        ]


class GradNormSchedule:
    """Decide when the exact grad-norm pass fits the time budget.

    Keeps an exponential average of the exact pass's cost and of the step time
    and runs the pass every ``k`` steps, with ``k`` the smallest interval that
    keeps the average cost below ``budget`` x step time. ``budget=None`` (the
    default) means every step: the exact pass is also the only complete check
    for NaN/Inf in the gradients, which is what stops a run *before* STEP.
    """

    def __init__(self, budget: float | None = None) -> None:
        self.budget = budget
        self.cost_s: float | None = None
        self.step_s: float | None = None
        self._since = 0

    @property
    def interval(self) -> int:
        if self.budget is None or self.cost_s is None or not self.step_s or self.budget <= 0:
            return 1
        return max(1, math.ceil(self.cost_s / (self.budget * self.step_s)))

    def due(self) -> bool:
        return self._since + 1 >= self.interval

    def record_pass(self, seconds: float) -> None:
        self.cost_s = seconds if self.cost_s is None else 0.8 * self.cost_s + 0.2 * seconds
        self._since = 0

    def skipped(self) -> None:
        self._since += 1

    def record_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else 0.9 * self.step_s + 0.1 * seconds


class ParamStats:
    """Grad, weight and update norms around one optimizer step.

    Call :meth:`before_step` once gradients are final (after backward, after
    any clipping) and :meth:`after_step` once the optimizer has stepped.

    Parameters
    ----------
    params
        The tracked parameters, in history column order.
    sample_size
        Elements per tensor for the sampled mode (see module docstring).
    grad_budget
        Fraction of step time the exact grad-norm pass may take.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        sample_size: int = 1024,
        grad_budget: float | None = None,
        seed: int = 0,
    ) -> None:
        self.params = list(params)
        self.sampler = ParamSampler(self.params, sample_size=sample_size, seed=seed)
        self.schedule = GradNormSchedule(grad_budget)
        self._snap: list[torch.Tensor] = []
        self._snap_bufs: list[torch.Tensor] | None = None
        self._snap_for: list[torch.Tensor] | None = None  # the views the buffers were made for
        self._exact = False
        self._grad: np.ndarray | None = None
        self._grad_exact = False
        self._weight_before: list[torch.Tensor] = []

    # -- gradients ---------------------------------------------------------
    def grad_norms(self, exact: bool | None = None) -> tuple[np.ndarray, bool]:
        """Per-parameter grad norms (NaN where grad is None) and whether they are exact.

        ``exact=None`` lets the time-budget schedule decide.
        """
        schedule = self.schedule
        if exact is None:
            exact = schedule.budget is None or schedule.due()
        grads = [p.grad for p in self.params]
        if exact:
            # The common case (every parameter has a dense gradient): one fused norm pass and one
            # transfer, without the index bookkeeping below (this runs on every measured step). A
            # missing (None) or sparse gradient makes the fused op raise: the general path below.
            # Timed only when a budget needs the pass's cost.
            t0 = time.perf_counter() if schedule.budget is not None else 0.0
            try:
                out = to_host(torch._foreach_norm(grads))
            except (TypeError, RuntimeError):
                out = None
            if out is not None:
                if schedule.budget is not None:
                    schedule.record_pass(time.perf_counter() - t0)
                return out, exact
        idx = [i for i, g in enumerate(grads) if g is not None]
        out = np.full(len(self.params), np.nan)
        if not idx:
            return out, exact
        if exact:
            t0 = time.perf_counter()
            norms = _foreach_norm([grads[i] for i in idx])
            out[idx] = to_host(norms)
            self.schedule.record_pass(time.perf_counter() - t0)
        else:
            self.schedule.skipped()
            views = self.sampler.grad_views()
            # Sparse gradients (an embedding with sparse=True) hold few rows: their exact norm is cheap.
            sparse = [i for i in idx if views[i] is None]
            dense = [i for i in idx if views[i] is not None]
            if sparse:
                out[sparse] = to_host(_foreach_norm([self.params[i].grad for i in sparse]))
            if dense and self.sampler.fused:
                buf, slots = self.sampler.slots()
                with torch.no_grad():
                    buf[2].zero_()  # a parameter without grad keeps a zero slot (reported as NaN)
                    torch._foreach_copy_([slots[2][i] for i in dense], [views[i] for i in dense])
                    norms = torch.linalg.vector_norm(buf[2], dim=1).cpu().numpy().astype(np.float64)
                out[dense] = norms[dense] * self.sampler.scale[dense]
            elif dense:
                norms = _foreach_norm([views[i] for i in dense])
                out[dense] = to_host(norms) * self.sampler.scale[dense]
        return out, exact

    # -- weights and updates -------------------------------------------------
    def before_step(self, exact: bool = False) -> None:
        """Snapshot the weights (all of them when ``exact``, else the sampled subset)."""
        self._exact = exact
        if not exact and self.sampler.fused:  # every measured step: no no_grad() (the views are detached)
            views = self.sampler.weight_views()
            _, slots = self.sampler.slots(views)
            torch._foreach_copy_(slots[0], views)
            self._snap = []
            return
        with torch.no_grad():
            if exact:
                self._snap = [p.detach().clone() for p in self.params]
            else:
                views = self.sampler.weight_views()
                if self._snap_bufs is None or self._snap_for is not views:
                    # New views (first step, or a weight's storage was replaced): new buffers.
                    self._snap_bufs = [torch.empty_like(v) for v in views]
                    self._snap_for = views
                torch._foreach_copy_(self._snap_bufs, views)
                self._snap = self._snap_bufs

    def restore(self) -> bool:
        """Put the exact snapshot back into the weights (a failed step). Returns False without one."""
        if not self._exact or not self._snap:
            return False
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self._snap)
        return True

    def after_step(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Weight norms (before the step) and update norms; and whether exact."""
        n = len(self.params)
        # (No torch.no_grad(): every tensor here is detached already, and each context costs a
        # couple of Python calls on every measured step.)
        if not self._exact and self.sampler.fused:
            sampler = self.sampler
            views = sampler.weight_views()
            _, slots = sampler.slots(views)
            torch._foreach_copy_(slots[1], views)
            before, after, both = sampler.rows
            after.sub_(before)
            rows = _numpy(torch.linalg.vector_norm(both, dim=2)).astype(np.float64)
            rows *= sampler.scale  # subset norms -> whole-tensor estimates (both rows at once)
            return rows[0], rows[1], False
        with torch.no_grad():
            current = [p.detach() for p in self.params] if self._exact else self.sampler.weight_views()
            diff = torch._foreach_sub(current, self._snap)
            vals = to_host(_foreach_norm([*self._snap, *diff]))
        weight, update = vals[:n], vals[n:]
        if not self._exact:
            weight = weight * self.sampler.scale
            update = update * self.sampler.scale
        exact = self._exact
        if exact:
            self._snap = []  # free the full copy
        return weight, update, exact

    def weight_norms(self) -> np.ndarray:
        """Exact weight norms, now."""
        with torch.no_grad():
            return to_host(_foreach_norm([p.detach() for p in self.params]))


def _block_layout(
    p: torch.Tensor, sample_size: int, gen: np.random.Generator
) -> tuple[int, int, int, int] | None:
    """``(blocks, length, period, offset)`` of ``p``'s subset, or None to take it whole.

    The period shares no factor with the row length (the elements after the
    first dimension: a matrix row, a conv filter) when that is possible:
    otherwise the blocks would start on the same few columns of every row
    (784 inputs and a period of 392: two columns).
    """
    n = p.numel()
    if n <= sample_size:
        return None
    blocks = min(ParamSampler.BLOCKS, sample_size)
    length = sample_size // blocks
    # One block per period of n // blocks elements; the offset ranges over (about) a whole period, so
    # every element is about equally likely to be in the subset: the estimate is nearly unbiased.
    period = n // blocks
    if p.dim() >= 2 and p.shape[0]:
        row = n // p.shape[0]
        candidate = period
        while candidate > length and math.gcd(candidate, row) != 1:
            candidate -= 1
        if math.gcd(candidate, row) == 1:
            period = candidate
    span = (blocks - 1) * period + length
    offset = int(gen.integers(n - span + 1))
    return blocks, length, period, offset


def _foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``torch._foreach_norm`` with a fallback for dtypes/layouts it rejects."""
    if not tensors:
        return []
    try:
        return list(torch._foreach_norm(list(tensors)))
    except (RuntimeError, TypeError):
        return [
            torch.linalg.vector_norm(t.float()) if not t.is_sparse else t.coalesce().values().norm()
            for t in tensors
        ]
