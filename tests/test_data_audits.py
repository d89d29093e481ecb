"""Data bugs reported by a plain ``Runner(...).run()``: no check function is called (issue #12).

Each data code of DESIGN section 4 has at least two forms (image and tabular,
other sizes) and is run with three seeds; the healthy twins near each audit's
threshold must stay silent.
"""

from __future__ import annotations

import pytest

import tlwidgets as tlw
from tlwidgets import zoo

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
