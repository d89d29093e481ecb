"""Data audits that run by themselves (DESIGN section 6, "Data is audited without being asked").

A Runner's data is audited on bounded samples, at the moment each audit is
cheap and meaningful, by :class:`~tlwidgets.diagnostics.engine.RuleDiagnoser`:

========================  ==========================  =================================================
when                      audit                       reads
========================  ==========================  =================================================
construction              :func:`audit_leakage`       digests of up to ``TRAIN_EXAMPLES`` training and
                                                      ``VAL_EXAMPLES`` validation examples; random
                                                      projections of up to ``NEAR_TRAIN`` of them for
                                                      near-duplicates
construction              :func:`audit_shift`         per-feature mean and std of the same samples
construction              :func:`audit_channel_order` the first sampled batch of 4-D inputs
construction              :func:`audit_imbalance`     label counts of the training sample
construction              (probe for labels-decoupled) a random-feature ridge probe on the sample
first measured step       :func:`audit_batch_mixing`  one forward/backward on ``MIX_EXAMPLES`` examples
first measured step       :func:`audit_dropout`       one no-grad forward: the ``p`` of every dropout call
first epoch ends / step   :func:`audit_labels_decoupled` the recent training losses against the label
``DECOUPLED_STEPS``                                   prior's loss, when the probe found no signal
========================  ==========================  =================================================

Samples are drawn only from data that can be read without running user code:
a ``DataLoader`` over a ``TensorDataset`` (or a ``Subset`` of one) by index (a
seeded random subset when it is larger than the sample; the loader is not
iterated, so no worker starts), a list of batches, an ``(X, y)`` pair or a
tensor (at most ``MAX_BATCHES`` batches). Custom datasets and streams are not
read up front (their ``__getitem__`` may decode files, augment or count calls):
their audits read the batches the Runner fetches anyway (the first
``FETCHED_TRAIN`` training examples, with label counts over the whole first
epoch, and ``FETCHED_VAL`` examples of the first evaluation), and run at the
first epoch end, or once the sample is full when the loader shuffles.
Every audit preserves the global RNGs and the data loaders' generators, and
the model's weights, buffers, mode and gradients. A failing audit is recorded
in ``session.diagnostic_errors``, never raised into training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from tlwidgets.core.batches import call_model, default_unpack, tensors_in, to_device
from tlwidgets.core.catalog import make_finding
from tlwidgets.core.checkpoint import capture_generators, data_generators, restore_generators
from tlwidgets.core.findings import Finding
from tlwidgets.diagnostics.checks_data import (
    as_batches,
    check_channel_order,
    feature_view,
    input_tensor,
    rng_preserved,
)

__all__ = [
    "DataAudit",
    "audit_batch_mixing",
    "audit_channel_order",
    "audit_dropout",
    "audit_imbalance",
    "audit_labels_decoupled",
    "audit_leakage",
    "audit_shift",
    "sample_data",
]

#: Sample sizes (examples) and the batch cap for sources that cannot be indexed.
TRAIN_EXAMPLES = 20_000
VAL_EXAMPLES = 2_000
MAX_BATCHES = 64
#: At most this many bytes of inputs are read from each set (large images: fewer examples), and for at most
#: this many seconds (a dataset that decodes files from disk).
MAX_BYTES = 64 * 2**20
MAX_SECONDS = 2.0
#: Training rows kept (projected to ``PROJ_DIM``) for the near-duplicate search.
NEAR_TRAIN = 4_096
PROJ_DIM = 64
#: Near-duplicate: nearest training row closer than this fraction of the typical training nearest-neighbour
#: distance.
NEAR_FRACTION = 0.02
#: Leaked fraction from which data-leakage is an error (smaller overlaps: info).
LEAK_MIN_FRACTION = 0.01
#: train-val-shift: standardized mean difference per feature, the share of features, the std ratio.
SHIFT_SMD = 0.5
SHIFT_FEATURES = 0.5
SHIFT_SCALE = 2.0
#: class-imbalance: majority/minority ratio; examples needed (overall and per class present).
IMBALANCE_RATIO = 8.0
IMBALANCE_MIN = 100
IMBALANCE_PER_CLASS = 10
#: Data that cannot be sampled up front (a custom ``Dataset``, a stream) is audited on the batches the Runner
#: fetches: this many training examples (their label counts: the whole first epoch, up to
#: ``FETCHED_LABELS``) and this many validation examples of the first evaluation.
FETCHED_TRAIN = 4_096
FETCHED_VAL = 2_000
FETCHED_LABELS = 1_000_000
#: labels-decoupled: steps before the check without an epoch end; relative gain over the prior needed.
DECOUPLED_STEPS = 300
DECOUPLED_MIN_STEPS = 10
DECOUPLED_GAIN = 0.1
#: batch-mixing: examples of the probe batch.
MIX_EXAMPLES = 8
#: dropout-too-high: p above which dropout is too high (the setup rule's threshold for modules).
DROPOUT_HIGH = 0.5

_DROPOUT_FNS = (
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
)


# ====================================================================== sampling
@dataclasses.dataclass
class Sample:
    """What one bounded read of a data set keeps (CPU, small)."""

    examples: int = 0
    total: int | None = None  # examples in the whole set, when known
    digests: list[bytes] = dataclasses.field(default_factory=list)
    proj: list[torch.Tensor] = dataclasses.field(default_factory=list)
    feat_n: torch.Tensor | None = None
    feat_sum: torch.Tensor | None = None
    feat_sq: torch.Tensor | None = None
    layout: tuple[int, ...] | None = None
    labels: np.ndarray | None = None  # counts of integer class labels (1-D targets)
    binary: np.ndarray | None = None  # counts of 0/1 float targets ([N] or [N, 1])
    reg: list[float] | None = None  # n, sum, sum of squares of float targets (for an MSE prior)
    first_inputs: Any = None  # the first batch's inputs (its first rows)
    first_x: torch.Tensor | None = None  # first float input tensor of the first batch (up to 256 rows)
    integer_inputs: bool = False
    #: Labelled batches seen, and those holding a single label value: when every batch does, the loop
    #: sets the labels batch by batch (a GAN discriminator's real and fake batches), not the data.
    label_batches: int = 0
    uniform_label_batches: int = 0
    #: Every input tensor has the examples as its first dimension: the first-step probes can take a few
    #: examples (not so with an RNN state fed back as ``(x, (h, c))``, batch second).
    rows_first: bool = True
    #: The inputs hold several per-example tensors (a siamese pair, features and a mask): the label may
    #: depend on how they relate, which a probe of the first one cannot see.
    multi_input: bool = False
    probe_x: list[torch.Tensor] = dataclasses.field(default_factory=list)
    probe_y: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def projected(self) -> torch.Tensor | None:
        return torch.cat(self.proj) if self.proj else None


def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _plain_tensors(ds: Any) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    """The tensors of a ``TensorDataset`` (or a ``Subset`` of one) and the subset's indices: data that can be
    read without running user code."""
    idx = None
    if type(ds) is Subset:
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        ds = ds.dataset
    if type(ds) is TensorDataset:
        return list(ds.tensors), idx
    return None


def _batches(data: Any, unpack: Any, limit: int, seed: int = 0) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` batches of at most ``limit`` examples (a random subset when there are more).

    Only data that can be read without running the user's code is read: a ``DataLoader`` over a
    ``TensorDataset`` (by index; the loader is not iterated and no worker starts), a list of batches,
    an ``(X, y)`` pair or a tensor. A custom ``Dataset``'s ``__getitem__`` may decode files, draw
    augmentations or count its calls, and a stream may lose the batches read, so neither is sampled.
    """
    unpack = unpack or default_unpack
    if isinstance(data, DataLoader):
        plain = _plain_tensors(data.dataset) if data.batch_sampler is not None else None
        if plain is None:
            return
        tensors, sub = plain
        n = len(sub) if sub is not None else int(tensors[0].shape[0])
        if n > limit:
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        else:
            pick = torch.arange(n)
        rows = sub[pick] if sub is not None else pick
        collate = data.collate_fn
        direct = collate is default_collate
        for s in range(0, len(rows), 256):
            chunk = rows[s : s + 256]
            if direct:
                yield unpack([t[chunk] for t in tensors])
            else:
                yield unpack(collate([tuple(t[i] for t in tensors) for i in chunk.tolist()]))
        return
    if isinstance(data, (list, tuple, torch.Tensor)) or _plain_tensors(data) is not None:
        for k, batch in enumerate(as_batches(data, unpack)):
            if k >= MAX_BATCHES:
                return
            yield batch


def _length(data: Any) -> int | None:
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, (tuple, list)) and len(ds) == 2 and all(isinstance(t, torch.Tensor) for t in ds):
        return int(ds[0].shape[0])
    if (
        isinstance(ds, (Dataset, torch.Tensor))
        and hasattr(ds, "__len__")
        and not isinstance(ds, IterableDataset)
    ):
        try:
            return len(ds)
        except TypeError:
            return None
    return None


class _Projector:
    """A fixed random projection of flattened examples to ``PROJ_DIM`` dimensions."""

    def __init__(self) -> None:
        self.cols: torch.Tensor | None = None
        self.mat: torch.Tensor | None = None
        self.dim = 0

    def fits(self, flat: torch.Tensor) -> bool:
        """Rows of this size can be projected (the first rows seen fix the size)."""
        return self.mat is None or flat.shape[1] == self.dim

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.mat is None:
            g = torch.Generator().manual_seed(1234)
            d = flat.shape[1]
            self.dim = d
            self.cols = torch.randperm(d, generator=g)[:4096] if d > 4096 else None
            k = min(d, 4096)
            self.mat = torch.randn(k, PROJ_DIM, generator=g, dtype=torch.float64) / math.sqrt(PROJ_DIM)
        if self.cols is not None:
            flat = flat[:, self.cols]
        if flat.shape[1] != self.mat.shape[0]:
            raise ValueError("examples of different sizes")
        return flat @ self.mat


def sample_data(data: Any, unpack: Any, limit: int, projector: _Projector, *, near: int) -> Sample:
    """Read a bounded sample of ``data``: digests, projections, feature moments, label counts."""
    out = Sample(total=_length(data))
    nbytes = 0
    start = time.perf_counter()
    gens = capture_generators(data_generators(data))
    try:
        with rng_preserved(), torch.no_grad():
            for inputs, targets in _batches(data, unpack, limit):
                nbytes += add_batch(out, inputs, targets, projector, near=near)
                if out.examples >= limit or nbytes >= MAX_BYTES or time.perf_counter() - start > MAX_SECONDS:
                    break
    finally:
        restore_generators(gens)
    return out


def add_batch(out: Sample, inputs: Any, targets: Any, projector: _Projector, *, near: int) -> int:
    """Add one ``(inputs, targets)`` batch to ``out``; the bytes of inputs read (0: nothing usable)."""
    x = input_tensor(inputs)
    if x is None or x.dim() == 0 or x.shape[0] == 0:
        return 0
    if any(t.layout is not torch.strided for _, t in tensors_in(inputs, "inputs")):
        return 0  # sparse or nested inputs (a graph's adjacency): rows cannot be hashed or compared
    x = x.detach().cpu()
    n = int(x.shape[0])
    if out.first_inputs is None:
        out.first_inputs = _map(inputs, lambda t, n=n: t[:MIX_EXAMPLES] if t.dim() and t.shape[0] == n else t)
        out.first_x = x[:256]
        out.integer_inputs = not x.is_floating_point()
        out.layout = tuple(x.shape[1:])
        leaves = [t for _, t in tensors_in(inputs, "inputs")]
        out.multi_input = sum(t.dim() > 0 and t.shape[0] == n for t in leaves) > 1
        out.rows_first = all(t.dim() > 0 and t.shape[0] == n for t in leaves)
    if tuple(x.shape[1:]) != out.layout:
        return 0  # variable-size examples (padded sequences): keep the first layout only
    _digest(out, inputs, n)
    flat = x.reshape(n, -1).double()
    if flat.is_floating_point() and torch.isfinite(flat).all():
        kept = sum(p.shape[0] for p in out.proj)
        if kept < near and projector.fits(flat):  # validation rows of another size are not compared
            out.proj.append(projector(flat)[: near - kept])
        f = feature_view(x)
        if out.feat_sum is None:
            out.feat_n = torch.zeros(())
            out.feat_sum = torch.zeros(f.shape[1], dtype=torch.float64)
            out.feat_sq = torch.zeros(f.shape[1], dtype=torch.float64)
        out.feat_n += f.shape[0]
        out.feat_sum += f.sum(0)
        out.feat_sq += (f * f).sum(0)
    _count_labels(out, targets, n)
    out.examples += n
    return x.element_size() * x.numel()


def _digest(out: Sample, inputs: Any, n: int) -> None:
    rows = []
    for _, t in tensors_in(inputs, "inputs"):
        if t.dim() == 0 or t.shape[0] != n:
            continue
        a = t.detach().cpu()
        if a.dtype is torch.bfloat16:  # (numpy has no bfloat16; float32 holds every bfloat16 exactly)
            a = a.float()
        if a.is_floating_point():
            a = a + 0.0  # -0.0 and 0.0 are the same value
        arr = a.contiguous().numpy().reshape(n, -1)
        rows.append((f"{arr.dtype}{tuple(t.shape[1:])}".encode(), arr))
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for head, arr in rows:
            h.update(head)
            h.update(arr[i].tobytes())
        out.digests.append(h.digest())


def _count_labels(out: Sample, targets: Any, n: int, *, probe: bool = True) -> None:
    """Label counts of one batch (and, with ``probe``, its labels for the labels probe)."""
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != n:
        return
    y = targets.detach().cpu()
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        return  # per-token or multi-label targets: one label per example is what is counted
    if probe and n > 1:
        out.label_batches += 1
        out.uniform_label_batches += bool((y == y[0]).all())
    if not y.is_floating_point() and y.dtype != torch.bool:
        # In numpy: a watched loop counts every batch's labels up to FETCHED_LABELS examples, and
        # each torch op on a few dozen labels costs several times the numpy one.
        yn = y.numpy()
        if not yn.size or yn.min() < 0 or yn.max() > 100_000:
            return
        c = np.bincount(yn.astype(np.int64, copy=False), minlength=1)
        if out.labels is None:
            out.labels = c
        elif len(c) <= len(out.labels):
            out.labels[: len(c)] += c
        else:
            out.labels = _add(out.labels, c)
        if probe:
            out.probe_y.append(y.long())
        return
    yf = y.double()
    if not bool(torch.isfinite(yf).all()):
        return
    if bool(((yf == 0) | (yf == 1)).all()):
        pos = int(yf.sum())
        c = np.array([n - pos, pos])
        out.binary = c if out.binary is None else out.binary + c
    s = out.reg or [0.0, 0.0, 0.0]
    out.reg = [s[0] + n, s[1] + float(yf.sum()), s[2] + float((yf * yf).sum())]
    if probe:
        out.probe_y.append(yf)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = max(len(a), len(b))
    return np.pad(a, (0, m - len(a))) + np.pad(b, (0, m - len(b)))


# ====================================================================== construction audits
def audit_leakage(train: Sample, val: Sample, step: int = 0) -> Finding | None:
    """Validation examples identical (digests) or near-identical (random projections) to training examples.

    The split is exchangeable when it is right: a validation example then has an identical or
    near-identical training example as often as a training example has one among the other training
    examples (repeated rows of discrete data, dense regions of low-dimensional data). Leakage is the
    excess over that rate.
    """
    if not val.digests or not train.digests:
        return None
    seen: dict[bytes, int] = {}
    for d in train.digests:
        seen[d] = seen.get(d, 0) + 1
    dup_rate = sum(c for c in seen.values() if c > 1) / len(train.digests)
    exact = [i for i, d in enumerate(val.digests) if d in seen]
    # Share of the training set the digests cover: a sample finds that share of the copies.
    cover = min(1.0, train.examples / train.total) if train.total else 1.0
    near: list[int] = []
    near_rate = 0.0
    near_rows = 0
    pt, pv = train.projected, val.projected
    checked = 0
    near_cover = 1.0
    if pt is not None and pv is not None and pt.shape[0] >= 8 and pv.shape[0] >= 1:
        # Every kept training row's nearest other training row (in chunks: at most NEAR_TRAIN rows): the
        # chance rate of near twins is estimated from all of them, not a few.
        parts = []
        for s0 in range(0, pt.shape[0], 512):
            d_tt = torch.cdist(pt[s0 : s0 + 512], pt)
            rows = torch.arange(d_tt.shape[0])
            d_tt[rows, rows + s0] = math.inf
            d_tt[d_tt == 0] = math.inf  # identical rows are counted by the digests
            parts.append(d_tt.min(1).values)
        nn_tt = torch.cat(parts)
        nn_tt = nn_tt[torch.isfinite(nn_tt)]
        typical = float(nn_tt.median()) if nn_tt.numel() else math.nan
        if math.isfinite(typical) and typical > 0:
            thr = NEAR_FRACTION * typical
            near_rate = float((nn_tt < thr).double().mean())
            near_rows = int(nn_tt.numel())
            d_vt = torch.cdist(pv, pt)
            d_vt[d_vt == 0] = math.inf
            exact_set = set(exact)
            near = [
                i for i in torch.nonzero(d_vt.min(1).values < thr).flatten().tolist() if i not in exact_set
            ]
            checked = pv.shape[0]
            near_cover = min(1.0, pt.shape[0] / (train.total or max(train.examples, 1)))
    n_val = len(val.digests)

    def excess(found: int, rate: float, n: int, rate_rows: int | None = None, slack: float = 1.0) -> float:
        """Found beyond the chance count ``rate * n``: Poisson noise of the count, plus the uncertainty of
        ``rate`` when it was estimated from ``rate_rows`` rows (a two-sample comparison)."""
        expected = rate * n
        var = expected + (n * n * rate * (1 - rate) / rate_rows if rate_rows else 0.0)
        return found - expected if found > expected + 3 * math.sqrt(var) + slack else 0.0

    x_exact = excess(len(exact), dup_rate * cover, n_val)
    # Near twins are a softer test than identical digests (dense low-dimensional data has them by chance).
    x_near = excess(len(near), near_rate, checked, near_rows, slack=2.0) if checked else 0.0
    if not x_exact and not x_near:
        return None
    fraction = min(
        1.0, x_exact / n_val / max(cover, 1e-9) + (x_near / checked / near_cover if checked else 0)
    )
    severe = fraction >= LEAK_MIN_FRACTION
    what = f"{len(exact)} identical" + (f" and {len(near)} near-identical" if near else "")
    sampled = "" if cover >= 1 and near_cover >= 1 else f" (estimated {fraction:.1%} of the validation set)"
    return make_finding(
        "data-leakage",
        f"{what} of {n_val} sampled validation examples also appear in the training data{sampled}; "
        f"within the "
        f"training data {dup_rate + near_rate:.1%} of the examples have such a twin",
        severity=None if severe else "info",
        step=step,
        evidence={
            "identical": len(exact),
            "near_identical": len(near),
            "val_examples": n_val,
            "train_examples_hashed": train.examples,
            "train_examples": train.total,
            "fraction": fraction,
            "train_duplicate_rate": dup_rate,
            "train_near_duplicate_rate": near_rate,
            "val_indices": sorted(exact + near)[:20],
        },
    )


def audit_shift(train: Sample, val: Sample, step: int = 0) -> Finding | None:
    """Per-feature standardized mean difference and std ratio of the two samples."""
    if train.feat_sum is None or val.feat_sum is None or train.feat_sum.shape != val.feat_sum.shape:
        return None
    nt, nv = float(train.feat_n), float(val.feat_n)
    if nt < 2 or nv < 2:
        return None
    mt, mv = train.feat_sum / nt, val.feat_sum / nv
    st = (train.feat_sq / nt - mt**2).clamp_min(0).sqrt()
    sv = (val.feat_sq / nv - mv**2).clamp_min(0).sqrt()
    tiny = 1e-12
    pooled = ((st**2 + sv**2) / 2).sqrt()
    informative = pooled > 1e-6 * (1 + mt.abs())
    if int(informative.sum()) == 0:
        return None
    smd = ((mt - mv).abs() / pooled.clamp_min(tiny))[informative]
    both = informative & (st > tiny) & (sv > tiny)
    ratio = (torch.maximum(st, sv) / torch.minimum(st, sv).clamp_min(tiny))[both]
    frac = float((smd > SHIFT_SMD).double().mean())
    med_ratio = float(ratio.median()) if ratio.numel() else 1.0
    if frac < SHIFT_FEATURES and med_ratio < SHIFT_SCALE:
        return None
    scale = float((sv[both] / st[both]).median()) if bool(both.any()) else float("nan")
    parts = []
    if frac >= SHIFT_FEATURES:
        parts.append(
            f"the means differ by more than {SHIFT_SMD:g} pooled standard deviation on {frac:.0%} of "
            f"{int(informative.sum())} input features (median {float(smd.median()):.3g})"
        )
    if med_ratio >= SHIFT_SCALE:
        parts.append(f"the validation inputs are on {scale:.3g}x the scale of the training inputs")
    return make_finding(
        "train-val-shift",
        "validation inputs are distributed unlike training inputs: " + "; ".join(parts),
        step=step,
        evidence={
            "features": int(informative.sum()),
            "fraction_shifted": frac,
            "median_smd": float(smd.median()),
            "max_smd": float(smd.max()),
            "median_scale_ratio": med_ratio,
            "val_over_train_scale": scale,
            "train_mean": mt.tolist()[:32],
            "val_mean": mv.tolist()[:32],
            "train_std": st.tolist()[:32],
            "val_std": sv.tolist()[:32],
            "train_examples": int(nt) if train.layout and len(train.layout) <= 1 else train.examples,
            "val_examples": val.examples,
        },
    )


def audit_channel_order(train: Sample, step: int = 0) -> Finding | None:
    """The roughness test of :func:`~tlwidgets.diagnostics.checks_data.check_channel_order` on the first
    sampled batch."""
    x = train.first_x
    if x is None or x.dim() != 4:
        return None
    f = check_channel_order(x)
    return dataclasses.replace(f, step=step) if f is not None else None


def _loss_weighted(loss_fn: Any) -> bool:
    return any(getattr(loss_fn, a, None) is not None for a in ("weight", "pos_weight"))


def audit_imbalance(train: Sample, loss_fn: Any, step: int = 0) -> Finding | None:
    """Majority/minority ratio of the label counts of the training sample."""
    counts = train.labels if train.labels is not None else train.binary
    if counts is None or _loss_weighted(loss_fn):
        return None
    present = counts[counts > 0]
    n = int(present.sum())
    if present.size < 2 or n < max(IMBALANCE_MIN, IMBALANCE_PER_CLASS * present.size):
        return None
    ratio = float(present.max() / present.min())
    if ratio < IMBALANCE_RATIO:
        return None
    major = int(np.argmax(counts))
    minor = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    sampled = "" if not train.total or train.examples >= train.total else f" (a sample of {train.total})"
    return make_finding(
        "class-imbalance",
        f"class {major} has {ratio:.3g}x as many examples as class {minor} "
        f"({counts[major]} vs {counts[minor]} "
        f"of {n} training labels{sampled}); the majority class alone is {counts[major] / n:.0%}",
        step=step,
        evidence={
            "counts": counts.tolist()[:1000],
            "ratio": ratio,
            "majority": major,
            "minority": minor,
            "samples": n,
            "dataset_total": train.total,
        },
    )


# ---------------------------------------------------------------------- labels-decoupled
@dataclasses.dataclass
class Prior:
    """The loss of the best input-independent prediction, and whether a probe found signal in the inputs."""

    loss: float
    kind: str  # "classes", "binary" or "regression"
    probe_signal: bool | None  # None: no probe could be fitted


def _loss_kind(loss_fn: Any) -> str | None:
    name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "")
    if getattr(loss_fn, "reduction", "mean") != "mean":
        return None
    if name in ("CrossEntropyLoss", "cross_entropy", "NLLLoss", "nll_loss"):
        return None if float(getattr(loss_fn, "label_smoothing", 0.0) or 0.0) > 0 else "classes"
    if name in ("BCEWithLogitsLoss", "binary_cross_entropy_with_logits", "BCELoss", "binary_cross_entropy"):
        return "binary"
    if name in ("MSELoss", "mse_loss"):
        return "regression"
    return None


def label_prior(train: Sample, loss_fn: Any) -> Prior | None:
    """The prior's loss for the session's loss (cross-entropy, BCE, MSE), and the probe's verdict."""
    kind = _loss_kind(loss_fn)
    if kind is None or _loss_weighted(loss_fn):
        return None
    if kind == "classes" and train.labels is not None:
        p = train.labels[train.labels > 0] / train.labels.sum()
        loss = float(-(p * np.log(p)).sum())
    elif kind == "binary" and train.binary is not None:
        p = train.binary[train.binary > 0] / train.binary.sum()
        loss = float(-(p * np.log(p)).sum())
    elif kind == "regression" and train.reg is not None and train.reg[0] > 1:
        n, s, q = train.reg
        loss = q / n - (s / n) ** 2
    else:
        return None
    if not loss > 1e-6:
        return None
    return Prior(loss, kind, _probe(train, kind))


def _probe(train: Sample, kind: str) -> bool | None:
    """Does a random-feature ridge probe, fitted on 3/4 of the sample, beat the prior on the other 1/4?"""
    x = train.projected
    if x is None or train.integer_inputs or train.multi_input or not train.probe_y:
        return None
    if train.label_batches and train.uniform_label_batches == train.label_batches:
        return None  # labels set per batch by the loop (real vs generated), not a property of the data
    y = torch.cat(train.probe_y)[: x.shape[0]]
    n = y.shape[0]
    if n < 64:
        return None
    x = x[:n]
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(x.shape[1], 512, generator=g, dtype=torch.float64) / math.sqrt(x.shape[1])
    b = torch.rand(512, generator=g, dtype=torch.float64) * 2 - 1
    feats = torch.cat([torch.relu(x @ w + b), x, torch.ones(n, 1, dtype=torch.float64)], 1)
    perm = torch.randperm(n, generator=g)
    cut = n * 3 // 4
    tr, te = perm[:cut], perm[cut:]
    if kind == "classes":
        classes = int(y.max()) + 1
        target = torch.nn.functional.one_hot(y.long(), classes).double()
    else:
        target = y.double().reshape(n, -1)
    a = feats[tr]
    lam = 1e-1 * float((a * a).sum()) / a.shape[0]
    coef = torch.linalg.solve(
        a.t() @ a + lam * torch.eye(a.shape[1], dtype=torch.float64), a.t() @ target[tr]
    )
    pred = feats[te] @ coef
    if kind == "regression":
        base = float(((target[te] - target[tr].mean(0)) ** 2).mean())
        err = float(((target[te] - pred) ** 2).mean())
        return base > 0 and err < 0.9 * base
    if kind == "binary":
        hit = float(((pred[:, 0] > 0.5).double() == target[te, 0]).double().mean())
        major = max(float(target[te, 0].mean()), 1 - float(target[te, 0].mean()))
    else:
        hit = float((pred.argmax(1) == y[te].long()).double().mean())
        major = float(torch.bincount(y[tr].long()).max()) / len(tr)
    m = len(te)
    margin = max(0.03, 3 * math.sqrt(max(major * (1 - major), 0.01) / m))
    return hit > major + margin


def audit_labels_decoupled(
    prior: Prior | None, losses: np.ndarray, val_loss: float | None, step: int, explained: bool
) -> Finding | None:
    """The recent training loss is no better than the label prior's, and the probe found no signal."""
    if prior is None or prior.probe_signal is not False or explained or losses.size < DECOUPLED_MIN_STEPS:
        return None
    recent = losses[-min(20, losses.size) :]
    recent = recent[np.isfinite(recent)]
    if not recent.size:
        return None
    train_loss = float(np.median(recent))
    bar = (1 - DECOUPLED_GAIN) * prior.loss
    if train_loss < bar or (val_loss is not None and math.isfinite(val_loss) and val_loss < bar):
        return None
    what = {
        "classes": "the class frequencies",
        "binary": "the share of positives",
        "regression": "the mean target",
    }
    return make_finding(
        "labels-decoupled",
        f"after {losses.size} steps the training loss ({train_loss:.4g}) is no better "
        f"than the {prior.loss:.4g} of "
        f"predicting {what[prior.kind]} without looking at the inputs, and a probe fitted on a sample of the "
        "training data finds no relation between inputs and labels",
        step=step,
        evidence={
            "train_loss": train_loss,
            "val_loss": val_loss,
            "baseline_loss": prior.loss,
            "kind": prior.kind,
            "steps": int(losses.size),
        },
    )


# ---------------------------------------------------------------------- first-step audits
def audit_batch_mixing(session: Any, train: Sample, step: int) -> Finding | None:
    """``check_batch_independence`` on the first ``MIX_EXAMPLES`` sampled examples."""
    from tlwidgets.diagnostics.checks import NotBatchFirst, check_batch_independence

    inputs = train.first_inputs
    leaves = [t for _, t in tensors_in(inputs, "inputs") if t.dim() > 0] if inputs is not None else []
    if not leaves or leaves[0].shape[0] < 2:
        return None
    inputs = to_device(inputs, getattr(session, "device", None))
    forward = getattr(session, "forward", None) or call_model  # a watcher's inputs are the model's args
    try:
        f = check_batch_independence(session.model, inputs, forward=forward)
    except NotBatchFirst:
        return None  # sequence-first outputs: rows are not examples, the probe does not apply
    return dataclasses.replace(f, step=step) if f is not None else None


class _DropoutCalls(torch.overrides.TorchFunctionMode):
    def __init__(self, inside: list[int]) -> None:
        super().__init__()
        self.inside = inside
        self.calls: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT_FNS and not self.inside[0]:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if isinstance(p, (int, float)) and training:
                self.calls.append((func.__name__, float(p)))
        return func(*args, **kwargs)


def audit_dropout(session: Any, train: Sample, step: int) -> Finding | None:
    """Dropout called functionally in ``forward`` (``F.dropout(x, p)``) with ``p`` above 0.5.

    Dropout modules are reported by the setup rule ``dropout-too-high``; calls made inside them are skipped.
    """
    from tlwidgets.diagnostics.checks import preserved_state

    model = session.model
    inputs = train.first_inputs
    if inputs is None or not model.training:
        return None
    depth = [0]
    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            handles.append(m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)))
            handles.append(m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)))
    mode = _DropoutCalls(depth)
    forward = getattr(session, "forward", None) or call_model
    try:
        with preserved_state(model), torch.no_grad(), mode:
            forward(model, to_device(inputs, getattr(session, "device", None)))
    finally:
        for h in handles:
            h.remove()
    high = [(name, p) for name, p in mode.calls if p > DROPOUT_HIGH]
    if not high:
        return None
    p = max(p for _, p in high)
    return make_finding(
        "dropout-too-high",
        f"the model's forward calls {high[0][0]}(..., p={p:g}) directly: {p:.0%} of the values "
        "are dropped at "
        "every step",
        step=step,
        params=("forward",),
        evidence={"calls": [{"fn": n, "p": q} for n, q in high][:10], "p": p},
        fix="Use p between 0.1 and 0.5 in the F.dropout call of forward() and raise it only "
        "if validation loss "
        "shows overfitting.",
    )


# ====================================================================== per session
class _Fetched:
    """A sample built from the batches a Runner reads (data that cannot be sampled up front)."""

    #: Past the cap, the integer labels of this many batches are counted together (one concatenation,
    #: one host transfer and one ``bincount``, instead of a few calls per batch: a watched loop counts
    #: labels for up to ``FETCHED_LABELS`` examples, and on a GPU each batch's count was a host sync).
    LABEL_BATCHES = 32

    def __init__(self, total: int | None, cap: int, *, labels_past_cap: bool, projector: _Projector) -> None:
        self._sample = Sample(total=total)
        self.cap = cap
        self.labels_past_cap = labels_past_cap
        self.projector = projector
        self.bytes = 0
        self.seconds = 0.0
        self.labelled = 0  # examples whose labels were counted (past the cap too)
        self.complete = False  # a whole pass (epoch / evaluation) was seen
        self._pending: list[torch.Tensor] = []  # integer label batches not counted yet

    @property
    def sample(self) -> Sample:
        """The sample, with the labels of every batch read so far counted."""
        if self._pending:
            self._count_pending()
        return self._sample

    @property
    def full(self) -> bool:
        """Nothing more is kept (cap, bytes or time reached)."""
        s = self._sample
        return s.examples >= self.cap or self.bytes >= MAX_BYTES or self.seconds > MAX_SECONDS

    def add(self, inputs: Any, targets: Any) -> bool:
        """Keep what the batch adds; whether more batches are wanted."""
        if self.full:  # past the cap: the label counts only (every batch of a watched loop, for a while)
            if not (self.labels_past_cap and self.labelled < FETCHED_LABELS):
                return False
            x = input_tensor(inputs)
            n = int(x.shape[0]) if x is not None and x.dim() else 0
            if n:
                self._count_later(targets, n)
                self.labelled += n
            return self.labelled < FETCHED_LABELS
        t0 = time.perf_counter()
        with torch.no_grad():
            self.bytes += add_batch(self._sample, inputs, targets, self.projector, near=self.cap)
            x = input_tensor(inputs)
            self.labelled += int(x.shape[0]) if x is not None and x.dim() else 0
        self.seconds += time.perf_counter() - t0
        return not self.full or (self.labels_past_cap and self.labelled < FETCHED_LABELS)

    def _count_later(self, targets: Any, n: int) -> None:
        """Count a batch's labels (past the cap): integer class labels in a batch of batches, the rest now."""
        if (
            isinstance(targets, torch.Tensor)
            and targets.dim() == 1
            and targets.shape[0] == n
            and not targets.is_floating_point()
            and targets.dtype != torch.bool
        ):
            self._pending.append(targets.detach())
            if len(self._pending) >= self.LABEL_BATCHES:
                self._count_pending()
        else:
            _count_labels(self._sample, targets, n, probe=False)

    def _count_pending(self) -> None:
        pending, self._pending = self._pending, []
        try:
            y = torch.cat(pending).cpu()  # (one device and dtype in a loop; else one by one below)
        except (RuntimeError, TypeError):
            y = None
        if y is not None and y.numel() and int(y.min()) >= 0 and int(y.max()) <= 100_000:
            _count_labels(self._sample, y, y.shape[0], probe=False)
            return
        for t in pending:  # a batch with a label out of range (ignore_index=-100) is skipped alone
            _count_labels(self._sample, t, t.shape[0], probe=False)


def _representative(session: Any) -> bool:
    """The first batches stand for the whole training set: a ``DataLoader`` that draws them at random, or
    (a watched loop, whose data is not known) batches not named sorted by class."""
    data = getattr(session, "train_data", None)
    if data is None:
        has = getattr(session, "has_finding", None)
        return not (callable(has) and has("unshuffled-data"))
    return isinstance(data, DataLoader) and isinstance(
        getattr(data, "sampler", None), torch.utils.data.RandomSampler
    )


class DataAudit:
    """The data audits of one Runner: the schedule, and what each found (cached, reported once).

    Data that can be read without running user code is sampled at construction.
    Other data (a custom ``Dataset``, a stream) is audited on the batches the
    Runner reads anyway (:meth:`on_batch`): the first ``FETCHED_TRAIN`` training
    examples and ``FETCHED_VAL`` validation examples of the first evaluation.
    Its audits run when the sample stands for the data: at the first epoch end,
    or as soon as the sample is full when the loader shuffles.
    """

    def __init__(self) -> None:
        self.train: Sample | None = None
        self.val: Sample | None = None
        self.prior: Prior | None = None
        self.construction: list[Finding] = []
        self.first_step_done = False
        self.decoupled_done = False
        self.decoupled_checks = 0
        self._proj = _Projector()
        self.fetched: dict[str, _Fetched] = {}
        self.split_done = False  # leakage and shift have run
        self.constructed = False
        self.val_passes = 0  # validation passes seen ending (a watched loop)
        self.decoupled_at_val = 0

    def at_construction(self, session: Any, run: Callable[[str, Callable[[], Any]], Any]) -> list[Finding]:
        """Leakage, shift, channel order, imbalance (and the labels probe) on bounded samples."""
        self.constructed = True
        proj = self._proj
        if not hasattr(session, "train_data"):
            # A watcher: the data sets are the user's; only the batches the loop feeds the model are seen.
            self.fetched["train"] = _Fetched(None, FETCHED_TRAIN, labels_past_cap=True, projector=proj)
            self.fetched["val"] = _Fetched(None, FETCHED_VAL, labels_past_cap=False, projector=proj)
            return []
        unpack = getattr(session, "unpack", None)
        train = run(
            "sample-train",
            lambda: sample_data(session.train_data, unpack, TRAIN_EXAMPLES, proj, near=NEAR_TRAIN),
        )
        if train is None:
            return []
        found: list[Finding | None] = []
        if train.examples:
            found.extend(self._train_audits(session, train, run, step=0))
        else:
            self.fetched["train"] = _Fetched(
                _length(session.train_data), FETCHED_TRAIN, labels_past_cap=True, projector=proj
            )
        val_data = getattr(session, "val_data", None)
        if val_data is not None:
            val = run(
                "sample-val", lambda: sample_data(val_data, unpack, VAL_EXAMPLES, proj, near=VAL_EXAMPLES)
            )
            if val is not None and val.examples:
                self.val = val
            elif val is not None:
                self.fetched["val"] = _Fetched(
                    _length(val_data), FETCHED_VAL, labels_past_cap=False, projector=proj
                )
        found.extend(self._split_audits(run, step=0))
        self.construction = [f for f in found if f is not None]
        return self.construction

    def _train_audits(
        self, session: Any, train: Sample, run: Callable[[str, Callable[[], Any]], Any], step: int
    ) -> list[Finding | None]:
        self.train = train
        self.prior = run("label-prior", lambda: label_prior(train, session.loss_fn))
        return [
            run("channel-order", lambda: audit_channel_order(train, step)),
            run("class-imbalance", lambda: audit_imbalance(train, session.loss_fn, step)),
        ]

    def _split_audits(self, run: Callable[[str, Callable[[], Any]], Any], step: int) -> list[Finding | None]:
        train, val = self.train, self.val
        if self.split_done or train is None or val is None:
            return []
        self.split_done = True
        return [
            run("data-leakage", lambda: audit_leakage(train, val, step)),
            run("train-val-shift", lambda: audit_shift(train, val, step)),
        ]

    # ------------------------------------------------------------------ data read by the Runner
    def wants(self, split: str) -> bool:
        """Whether :meth:`on_batch` still keeps batches of ``split`` (``"train"`` or ``"val"``)."""
        f = self.fetched.get(split)
        return f is not None and not f.complete

    def on_batch(self, split: str, inputs: Any, targets: Any) -> bool:
        """Keep what a batch the Runner read adds to the sample of its split; whether more are wanted."""
        f = self.fetched.get(split)
        if f is None or f.complete:
            return False
        fv = self.fetched.get("val")
        if split == "train" and fv is not None and fv.sample.examples and not fv.complete:
            # Training again after validation batches (a watched loop): the validation pass is over, and
            # the epoch before it most likely too.
            fv.complete = True
            f.complete = True
            self.val_passes += 1
            return False
        more = f.add(inputs, targets)
        if not more:
            f.complete = f.complete or split == "val"
        return more

    def pass_ended(self, split: str) -> None:
        """A whole epoch (``"train"``) or evaluation (``"val"``) was read."""
        f = self.fetched.get(split)
        if f is not None:
            f.complete = True

    def fetched_audits(
        self, session: Any, run: Callable[[str, Callable[[], Any]], Any], *, epoch_end: bool
    ) -> list[Finding]:
        """The audits whose fetched samples are ready now (see the class docstring)."""
        step = int(session.global_step)
        found: list[Finding | None] = []
        ft = self.fetched.get("train")
        if ft is not None and self.train is None and ft.sample.examples:
            if epoch_end:
                ft.complete = True
            if ft.complete or (ft.full and _representative(session)):
                found.extend(self._train_audits(session, ft.sample, run, step))
        fv = self.fetched.get("val")
        if fv is not None and self.val is None and fv.complete and fv.sample.examples:
            self.val = fv.sample
        found.extend(self._split_audits(run, step))
        return [f for f in found if f is not None]

    @property
    def first_inputs(self) -> Any:
        """The first training examples read (sampled up front or fetched), for the first-step audits."""
        if self.train is not None:
            return self.train
        ft = self.fetched.get("train")
        return ft.sample if ft is not None and ft.sample.first_inputs is not None else None

    def at_first_step(self, session: Any, run: Callable[[str, Callable[[], Any]], Any]) -> list[Finding]:
        """Batch mixing and functional dropout, once, after the model has run a step."""
        sample = self.first_inputs
        if self.first_step_done or sample is None:
            return []
        self.first_step_done = True
        if not sample.rows_first:
            return []  # the probes cannot cut a few examples out of these inputs
        if getattr(session, "forward", call_model) is not call_model:
            return []  # a custom forward= is user code that may count its calls: the probes do not call it
        step = int(session.global_step)
        found = [
            run("batch-mixing", lambda: audit_batch_mixing(session, sample, step)),
            run("dropout", lambda: audit_dropout(session, sample, step)),
        ]
        return [f for f in found if f is not None]

    def decoupled(
        self,
        session: Any,
        val_loss: float | None,
        explained: bool,
        run: Callable[[str, Callable[[], Any]], Any],
    ) -> list[Finding]:
        """labels-decoupled at the first epoch ends (at most 3) or once after ``DECOUPLED_STEPS`` steps."""
        if self.decoupled_done or self.prior is None or self.prior.probe_signal is not False:
            return []
        self.decoupled_checks += 1
        if self.decoupled_checks >= 3:
            self.decoupled_done = True
        h = session.history
        losses = np.asarray(h.window("loss", len(h)), dtype=np.float64) if len(h) else np.zeros(0)
        step = int(session.global_step)
        f = run(
            "labels-decoupled", lambda: audit_labels_decoupled(self.prior, losses, val_loss, step, explained)
        )
        if f is not None:
            self.decoupled_done = True
            return [f]
        return []
