"""Per-parameter statistics computed on the tensors' own device, batched.

Two modes:

* **exact**: norms of whole tensors; the update norm needs a full snapshot of
  the weights before the optimizer step (about seven passes over the weights,
  roughly 20-40% of a CPU training step). Used when a stage is stepped alone.
* **sampled** (the default during ``step()``/``run()``): every tensor gets a
  fixed strided subset of at most ``sample_size`` elements with a random
  offset. ``numel / count`` times the subset's sum of squares is an unbiased
  estimate of the tensor's sum of squares, so the norms are estimated with a
  relative error of roughly ``1/sqrt(2 * count)`` for homogeneous tensors; the
  update/weight ratio is taken on the same subset. Snapshot, difference and
  norms then touch ``sample_size`` elements per tensor, not all of them.

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

__all__ = ["GradNormSchedule", "ParamSampler", "ParamStats", "to_host", "update_ratio"]


def to_host(values: Sequence[torch.Tensor]) -> np.ndarray:
    """Stack 0-d tensors (possibly on several devices) and copy them to the host once per device."""
    if not values:
        return np.zeros(0, dtype=np.float64)
    try:  # the common case: one device (torch.stack promotes mixed float dtypes)
        return torch.stack(list(values)).cpu().double().numpy()
    except RuntimeError:
        pass
    devices = {v.device for v in values}
    # A model split over devices: one transfer per device, then reassemble.
    out = np.empty(len(values), dtype=np.float64)
    for dev in devices:
        idx = [i for i, v in enumerate(values) if v.device == dev]
        out[idx] = torch.stack([values[i].float() for i in idx]).cpu().double().numpy()
    return out


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
    """Fixed strided subsets of each parameter (and of its gradient).

    Parameters
    ----------
    params
        The tensors to sample, in a fixed order.
    sample_size
        Upper bound on the elements taken per tensor. Tensors no larger than
        this are taken whole (their statistics are exact).
    seed
        Seed of the private generator choosing the offsets (the global RNG is
        never touched, so training stays bit-for-bit reproducible).
    """

    def __init__(self, params: Sequence[torch.Tensor], sample_size: int = 1024, seed: int = 0) -> None:
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        gen = np.random.default_rng(seed)
        self.params = list(params)
        self.sample_size = sample_size
        self.strides: list[int] = []
        self.offsets: list[int] = []
        counts: list[int] = []
        for p in self.params:
            n = p.numel()
            # A weight we cannot view as 1-D (odd strides) is taken whole: its
            # live view must see in-place updates, which a reshaped copy would not.
            stride = _coprime_stride(p, sample_size) if _flat_view(p) is not None else 1
            offset = int(gen.integers(stride)) if stride > 1 else 0
            self.strides.append(stride)
            self.offsets.append(offset)
            counts.append(max(1, len(range(offset, n, stride))) if n else 1)
        numels = np.array([max(1, p.numel()) for p in self.params], dtype=np.float64)
        #: sqrt(numel / count): turns a subset norm into a whole-tensor estimate.
        self.scale = np.sqrt(numels / np.array(counts, dtype=np.float64))
        self._views: list[torch.Tensor] | None = None
        self._ptrs: list[int] = []
        self._segments: torch.Tensor | None = None
        # One device for all parameters: the samples can be gathered into one flat tensor.
        self.fused = len({p.device for p in self.params}) == 1 and bool(self.params)

    def _sample(self, i: int, t: torch.Tensor) -> torch.Tensor:
        if self.strides[i] == 1:
            return t.detach()
        flat = _flat_view(t)
        if flat is None:  # e.g. a gradient laid out differently from its weight: sample a flat copy
            flat = t.detach().reshape(-1)
        return flat[self.offsets[i] :: self.strides[i]]

    def weight_views(self) -> list[torch.Tensor]:
        """Views of the sampled weight elements (live: they see in-place updates)."""
        ptrs = [p.data_ptr() for p in self.params]
        if self._views is None or ptrs != self._ptrs:  # storage replaced (p.data = ...)
            self._views = [self._sample(i, p) for i, p in enumerate(self.params)]
            self._ptrs = ptrs
            self._segments = None
        return self._views

    def gather_weights(self) -> torch.Tensor:
        """The sampled weight elements of every parameter, concatenated (a copy, float32 or wider)."""
        flat = torch.cat([v.reshape(-1) for v in self.weight_views()])
        return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()

    def segments(self) -> torch.Tensor:
        """Parameter index of each element of :meth:`gather_weights` (on the parameters' device)."""
        views = self.weight_views()
        if self._segments is None:
            lengths = torch.tensor([v.numel() for v in views], device=views[0].device)
            self._segments = torch.repeat_interleave(torch.arange(len(views), device=lengths.device), lengths)
        return self._segments

    def grad_views(self) -> list[torch.Tensor | None]:
        """Views of the sampled gradient elements (None where there is no grad)."""
        return [None if p.grad is None else self._sample(i, p.grad) for i, p in enumerate(self.params)]


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
        if exact is None:
            exact = self.schedule.due()
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        out = np.full(len(self.params), np.nan)
        if not idx:
            return out, exact
        if exact:
            t0 = time.perf_counter()
            grads = [self.params[i].grad for i in idx]
            norms = _foreach_norm(grads)
            out[idx] = to_host(norms)
            self.schedule.record_pass(time.perf_counter() - t0)
        else:
            self.schedule.skipped()
            views = self.sampler.grad_views()
            norms = _foreach_norm([views[i] for i in idx])
            out[idx] = to_host(norms) * self.sampler.scale[idx]
        return out, exact

    # -- weights and updates -------------------------------------------------
    def before_step(self, exact: bool = False) -> None:
        """Snapshot the weights (all of them when ``exact``, else the sampled subset)."""
        self._exact = exact
        with torch.no_grad():
            if exact:
                self._snap = [p.detach().clone() for p in self.params]
            elif self.sampler.fused:
                # One gather of every sampled element: a handful of ops whatever the number of
                # parameters (per-tensor ops on strided views cost ~10 us each).
                self._snap = [self.sampler.gather_weights()]
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
        with torch.no_grad():
            if not self._exact and self.sampler.fused and len(self._snap) == 1:
                before = self._snap[0]
                both = torch.stack([before, self.sampler.gather_weights() - before])
                sums = torch.zeros((2, n), dtype=both.dtype, device=both.device)
                sums.index_add_(1, self.sampler.segments(), both * both)
                vals = sums.sqrt_().reshape(-1).cpu().double().numpy()
            else:
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


def _coprime_stride(p: torch.Tensor, sample_size: int) -> int:
    """A stride of about ``numel / sample_size`` that shares no factor with the row length.

    Rows are the elements after the first dimension (a matrix row, a conv
    filter). A stride sharing a factor with that length would sample the same
    few columns of every row (784 inputs, stride 392: two columns); a coprime
    one walks through every column as it goes down the rows.
    """
    n = p.numel()
    stride = max(1, n // sample_size)
    if stride == 1 or p.dim() < 2 or not p.shape[0]:
        return stride
    row = n // p.shape[0]
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


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
