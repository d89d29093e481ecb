"""Data bugs reported by a plain ``Runner(...).run()``: no check function is called (issue #12).

Each data code of DESIGN section 4 has at least two forms (image and tabular,
other sizes) and is run with three seeds; the healthy twins near each audit's
threshold must stay silent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.diagnostics import audits

DATA_CODES = (
    "data-leakage",
    "train-val-shift",
    "channel-order",
    "class-imbalance",
    "labels-decoupled",
    "batch-mixing",
    "dropout-too-high",
)

FORMS = {
    "data-leakage": ["data-leakage", "data-leakage-tabular", "data-leakage-images"],
    "train-val-shift": ["train-val-shift", "train-val-shift-tabular", "train-val-shift-images"],
    "channel-order": ["channel-order", "channel-order-24px"],
    "class-imbalance": ["class-imbalance", "class-imbalance-binary", "class-imbalance-digits"],
    "labels-decoupled": ["labels-decoupled", "labels-decoupled-regression", "labels-decoupled-images"],
    "batch-mixing": ["batch-mixing", "batch-mixing-mlp"],
    "dropout-too-high": ["dropout-too-high", "dropout-functional", "dropout2d-too-high"],
}

TWINS = [
    "mlp-digits",
    "rgb-cnn",
    "sequence-gru",
    "gaussian-rmsprop",
    "regression-mlp",
    "near-duplicate-free-tabular",
    "small-natural-shift",
    "mild-imbalance",
    "binary-3to1",
    "row-independent-mlp",
    "dropout-half",
]


def _plain_run(name: str, seed: int) -> tlw.Runner:
    setup = zoo.get(name)
    parts = setup.build(seed, data_seed=seed)
    runner = tlw.Runner(
        parts.pop("model"), parts.pop("loss_fn"), parts.pop("optimizer"), parts.pop("train_data"), **parts
    )
    runner.run(**setup.run)
    return runner


CASES = [(code, name, seed) for code, names in FORMS.items() for name in names for seed in (0, 1, 2)]


@pytest.mark.parametrize(("code", "name", "seed"), CASES, ids=[f"{n}-{s}" for _, n, s in CASES])
def test_data_bug_reported_by_a_plain_run(code, name, seed):
    runner = _plain_run(name, seed)
    got = runner.findings_with(code)
    assert got, f"{name} seed {seed}: {[f.code for f in runner.findings]}"
    assert got[0].evidence, "a data finding carries its evidence"


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_twin_stays_silent(name, seed):
    runner = _plain_run(name, seed)
    loud = [f for f in runner.findings if f.severity in ("warning", "error")]
    data = [f for f in runner.findings if f.code in DATA_CODES]
    assert not loud and not data, [(f.code, f.message) for f in loud + data]


def test_every_data_code_has_two_forms_and_a_registered_twin():
    for code, names in FORMS.items():
        assert len(names) >= 2
        for name in names:
            setup = zoo.get(name)
            assert code in setup.expected
    for name in TWINS:
        assert zoo.get(name).healthy


# ---------------------------------------------------------------------- data the audits cannot sample up front
class RowsDataset(Dataset):
    """A user's own ``Dataset``, as people write them: rows of numpy arrays turned into tensors one by one.

    The audits do not index it up front (its ``__getitem__`` is user code): they read the batches the
    Runner fetches anyway.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.arrays = [t.numpy() for t in tensors]
        self.calls = 0

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, i: int):
        self.calls += 1
        return tuple(torch.as_tensor(np.asarray(a[i])) for a in self.arrays)


def _as_custom(data):
    """The same data, behind a ``RowsDataset`` (same batch size, shuffling and drop_last)."""
    if not isinstance(data, DataLoader) or type(data.dataset) is not TensorDataset:
        return data
    return DataLoader(
        RowsDataset(*data.dataset.tensors),
        batch_size=data.batch_size,
        shuffle=isinstance(data.sampler, RandomSampler),
        drop_last=data.drop_last,
    )


def _custom_run(name: str, seed: int, *, stream: bool = False) -> tlw.Runner:
    setup = zoo.get(name)
    parts = setup.build(seed, data_seed=seed)
    train, val = _as_custom(parts.pop("train_data")), _as_custom(parts.pop("val_data", None))
    assert isinstance(train.dataset, RowsDataset), f"{name}: the zoo form is no longer a TensorDataset loader"
    epochs = setup.run.get("epochs", 1)
    if stream:  # a one-shot stream of batches: nothing can be read from it up front
        loader = train
        train = (batch for _ in range(epochs) for batch in loader)
    runner = tlw.Runner(
        parts.pop("model"), parts.pop("loss_fn"), parts.pop("optimizer"), train, val_data=val, **parts
    )
    calls = train.dataset.calls if not stream else 0
    assert calls == 0 or stream, "the audits must not index a custom Dataset up front"
    if stream:
        runner.run(epochs=1)
    else:
        runner.run(**setup.run)
    return runner


# Forms whose bug is in the data the construction audits read (the first-step audits need no data set).
CUSTOM_FORMS = {
    code: names for code, names in FORMS.items() if code not in ("batch-mixing", "dropout-too-high")
}
CUSTOM_CASES = [
    (code, name, seed) for code, names in CUSTOM_FORMS.items() for name in names for seed in (0, 1, 2)
]


@pytest.mark.parametrize(("code", "name", "seed"), CUSTOM_CASES, ids=[f"{n}-{s}" for _, n, s in CUSTOM_CASES])
def test_data_bug_in_a_custom_dataset_is_reported(code, name, seed):
    runner = _custom_run(name, seed)
    got = runner.findings_with(code)
    assert got, f"{name} seed {seed}: {[f.code for f in runner.findings]}"
    assert got[0].evidence


@pytest.mark.parametrize("name", ["data-leakage", "class-imbalance-digits", "train-val-shift-tabular"])
def test_data_bug_in_a_stream_is_reported(name):
    code = next(c for c, names in FORMS.items() if name in names)
    runner = _custom_run(name, 0, stream=True)
    assert runner.findings_with(code), [f.code for f in runner.findings]


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_twin_in_a_custom_dataset_stays_silent(name, seed):
    setup = zoo.get(name)
    parts = setup.build(seed, data_seed=seed)
    if (
        not isinstance(parts["train_data"], DataLoader)
        or type(parts["train_data"].dataset) is not TensorDataset
    ):
        pytest.skip(f"{name} does not load a TensorDataset")
    runner = _custom_run(name, seed)
    loud = [f for f in runner.findings if f.severity in ("warning", "error")]
    data = [f for f in runner.findings if f.code in DATA_CODES]
    assert not loud and not data, [(f.code, f.message) for f in loud + data]


def test_fetched_batches_stop_being_read_once_the_sample_is_complete():
    """The audits read at most one epoch of a custom Dataset's batches, then the Runner stops showing them."""
    runner = _custom_run("mlp-digits", 0)
    assert not runner._tapped_splits, "after the first epoch end nothing more is shown to the audits"
    audit = runner.diagnoser._audits[runner]
    train = audit.fetched["train"].sample
    assert 0 < train.examples <= audits.FETCHED_TRAIN + 256
    assert audit.train is train and audit.val is audit.fetched["val"].sample


def test_streamed_label_counts_match_a_bincount_of_every_label() -> None:
    # Counted per batch (in numpy, #15), with classes that first appear late and batches of other
    # integer dtypes; an empty or negative-label batch counts nothing.
    rng = np.random.default_rng(0)
    sample = audits.Sample()
    seen = []
    for i, dtype in enumerate([torch.int64, torch.int32, torch.uint8, torch.int64] * 5):
        y = torch.from_numpy(rng.integers(0, 3 + i, size=16)).to(dtype)
        audits._count_labels(sample, y, 16, probe=False)
        seen.append(y.numpy().astype(np.int64))
    audits._count_labels(sample, torch.tensor([-1, 2]), 2, probe=False)
    audits._count_labels(sample, torch.zeros(0, dtype=torch.long), 0, probe=False)
    assert np.array_equal(sample.labels, np.bincount(np.concatenate(seen)))
    assert sample.labels.dtype == np.int64


# ------------------------------------------------------------------ labels counted past the cap (#15)
def _naive_label_counts(batches: list[torch.Tensor]) -> np.ndarray:
    """Per-batch bincount of integer 1-D labels, skipping a batch with a label out of [0, 100000]."""
    total = np.zeros(0, dtype=np.int64)
    for y in batches:
        if y.min() < 0 or y.max() > 100_000:
            continue
        c = np.bincount(y.numpy())
        m = max(len(total), len(c))
        total = np.pad(total, (0, m - len(total))) + np.pad(c, (0, m - len(c)))
    return total


@pytest.mark.parametrize("n_batches", [1, 31, 32, 33, 70])
def test_labels_past_the_cap_are_counted_in_batches_of_batches_as_one_by_one(n_batches):
    gen = torch.Generator().manual_seed(n_batches)
    f = audits._Fetched(None, 8, labels_past_cap=True, projector=audits._Projector())
    x = torch.randn(8, 3)
    first = torch.randint(0, 4, (8,), generator=gen)
    f.add(x, first)  # fills the cap: the sample itself
    assert f.full
    seen = [first]
    for i in range(n_batches):
        y = torch.randint(0, 7 if i % 5 else 12, (8,), generator=gen)
        if i == 3:
            y[2] = -100  # an ignore_index label: this batch alone is left out, as before
        assert f.add(x, y)
        seen.append(y)
    pending = len(f._pending)
    assert pending == n_batches % audits._Fetched.LABEL_BATCHES  # the rest were counted on the way
    counts = f.sample.labels  # reading the sample counts what is pending
    assert f._pending == []
    np.testing.assert_array_equal(counts, _naive_label_counts(seen))
    assert f.labelled == 8 * (n_batches + 1)


def test_labels_past_the_cap_of_other_kinds_are_counted_at_once():
    f = audits._Fetched(None, 4, labels_past_cap=True, projector=audits._Projector())
    f.add(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    f.add(torch.randn(4, 2), torch.tensor([[2], [2], [0], [1]]))  # (n, 1) labels: counted now, not held
    f.add(torch.randn(4, 2), torch.tensor([1.0, 0.0, 1.0, 1.0]))  # float 0/1 targets: the binary counts
    assert f._pending == []
    np.testing.assert_array_equal(f.sample.labels, [3, 3, 2])
    np.testing.assert_array_equal(f.sample.binary, [1, 3])
