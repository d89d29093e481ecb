"""Data bugs found in a loop the user writes (``tlw.watch``): the audits read the batches the loop feeds the
model and the loss (training passes, and validation under ``no_grad``), with no check function called."""

from __future__ import annotations

import pytest
import torch

import tlwidgets as tlw
from tlwidgets import zoo

# Every data code of DESIGN section 4, in at least two forms.
FORMS = {
    "data-leakage": ["data-leakage", "data-leakage-tabular", "data-leakage-images"],
    "train-val-shift": ["train-val-shift", "train-val-shift-tabular", "train-val-shift-images"],
    "channel-order": ["channel-order", "channel-order-24px"],
    "class-imbalance": ["class-imbalance", "class-imbalance-binary", "class-imbalance-digits"],
    "labels-decoupled": ["labels-decoupled", "labels-decoupled-regression", "labels-decoupled-images"],
    # The first-step probes run the model with the watcher's hooks suspended.
    "batch-mixing": ["batch-mixing", "batch-mixing-mlp"],
    "dropout-too-high": ["dropout-functional", "dropout2d-too-high"],
}
DATA_CODES = tuple(FORMS)
TWINS = [
    "mlp-digits",
    "rgb-cnn",
    "gaussian-rmsprop",
    "regression-mlp",
    "near-duplicate-free-tabular",
    "small-natural-shift",
    "mild-imbalance",
    "binary-3to1",
    "row-independent-mlp",
    "dropout-half",
]


def _loop(name: str, seed: int, epochs: int | None = None) -> tlw.Watcher:
    """The zoo setup trained by a plain loop under ``watch``: epochs of training, then validation."""
    setup = zoo.get(name)
    parts = setup.build(seed, data_seed=seed)
    model, loss_fn, opt = parts["model"], parts["loss_fn"], parts["optimizer"]
    train, val = parts["train_data"], parts.get("val_data")
    epochs = epochs or setup.run.get("epochs", 1)
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for _ in range(epochs):
            model.train()
            for x, y in train:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
            if val is not None:
                model.eval()
                with torch.no_grad():
                    for x, y in val:
                        loss_fn(model(x), y)
    return w


CASES = [(code, name, seed) for code, names in FORMS.items() for name in names for seed in (0, 1, 2)]


@pytest.mark.parametrize(("code", "name", "seed"), CASES, ids=[f"{n}-{s}" for _, n, s in CASES])
def test_data_bug_in_a_watched_loop_is_reported(code, name, seed):
    w = _loop(name, seed, epochs=2)
    got = w.findings_with(code)
    assert got, f"{name} seed {seed}: {[f.code for f in w.findings]}"
    assert got[0].evidence


@pytest.mark.parametrize("name", [names[0] for names in FORMS.values()])
def test_a_loop_of_one_epoch_is_audited_when_it_ends(name):
    """One epoch and its validation: no training batch follows the validation pass; the end of the
    ``with`` block completes the samples."""
    code = next(c for c, names in FORMS.items() if name in names)
    w = _loop(name, 0, epochs=1)
    got = w.findings_with(code)
    assert got, f"{name}: {[f.code for f in w.findings]}"
    assert got[0].evidence


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_twin_in_a_watched_loop_stays_silent(name, seed):
    w = _loop(name, seed)
    loud = [f for f in w.findings if f.severity in ("warning", "error")]
    data = [f for f in w.findings if f.code in DATA_CODES]
    assert not loud and not data, [(f.code, f.message) for f in loud + data]


def test_the_watched_audits_stop_reading_batches():
    w = _loop("mlp-digits", 0, epochs=2)
    audit = w.diagnoser._audits[w]
    assert not w._tapped_splits
    assert audit.train is audit.fetched["train"].sample and audit.val is audit.fetched["val"].sample
    assert audit.val_passes == 1


def test_the_probes_do_not_show_up_as_steps_of_the_loop(monkeypatch):
    """batch-mixing's probe runs the model inside the loop's first step: the watcher's hooks sit it out,
    so the model's forward hook sees exactly the loop's forwards (training and validation)."""
    from tlwidgets.core.watch import Watcher

    seen = []
    original = Watcher._on_model_pre

    def counting(self, module, args):
        seen.append(torch.is_grad_enabled())
        return original(self, module, args)

    monkeypatch.setattr(Watcher, "_on_model_pre", counting)
    setup = zoo.get("batch-mixing-mlp")
    parts = setup.build(0, data_seed=0)
    train, val = parts["train_data"], parts["val_data"]
    w = _loop("batch-mixing-mlp", 0, epochs=1)
    assert w.findings_with("batch-mixing")
    assert seen.count(True) == len(train) == w.loop.steps
    assert seen.count(False) == len(val)
