"""Healthy runs stay silent for the whole run: 1,500 steps, several weight and data seeds.

The zoo's healthy setups train correct code; over 1,500 steps (past the dense phase of the default
schedule, through many epochs) no rule may raise a warning or an error, in the Runner and in
``watch()``. The one exception is ``overfitting`` on small datasets trained for dozens of epochs,
which is real: it is accepted only where the validation losses recorded in the history (a naive
recomputation, not the rule's evidence) rose for two epochs in a row to more than 5% above the
best so far.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import tlwidgets as tlw
import tlwidgets.zoo as zoo
from tlwidgets.diagnostics.rules import trend

pytestmark = pytest.mark.slow

STEPS = 1500

# (setup, weight seed, data seed): every healthy Runner setup of the zoo, three of them on several
# seeds; data seed 5 with weight seed 5 once raised dead-relu on regression-mlp.
CASES = [
    ("mlp-digits", 0, 0),
    ("mlp-digits", 1, 3),
    ("mlp-digits", 5, 5),
    ("regression-mlp", 5, 5),
    ("regression-mlp", 2, 1),
    ("cnn-bn-digits", 1, 3),
    ("finetune-digits", 2, 5),
    ("finetune-frozen-digits", 3, 1),
    ("gaussian-rmsprop", 4, 2),
    ("patches-cnn", 0, 4),
    ("sequence-gru", 1, 2),
    ("rgb-cnn", 2, 3),
    # Healthy twins near the data audits' thresholds (#12).
    ("near-duplicate-free-tabular", 1, 2),
    ("small-natural-shift", 1, 2),
    ("mild-imbalance", 1, 2),
    ("binary-3to1", 1, 2),
    ("row-independent-mlp", 1, 2),
    ("dropout-half", 1, 2),
]


def _overfitting_is_real(history: Any) -> bool:
    """Validation loss rose two epochs in a row to > (1 + margin) x its best so far (naive recomputation)."""
    val = [e.val_loss for e in history.epochs if e.ok and e.val_loss is not None]
    for k in range(2, len(val)):
        a, b, c = val[k - 2 : k + 1]
        if a < b < c and c > (1 + trend.OVERFIT_MARGIN) * min(val[: k + 1]):
            return True
    return False


def _assert_silent(session: Any) -> None:
    problems = [f for f in session.findings if f.severity in ("warning", "error")]
    other = [f for f in problems if f.code != "overfitting"]
    assert other == [], [(f.code, f.first_step, f.message) for f in other]
    if problems:
        assert _overfitting_is_real(session.history), problems[0].message


def test_healthy_cases_cover_every_healthy_runner_setup() -> None:
    runner_setups = {s.name for s in zoo.setups(healthy=True) if s.loop is None}
    assert runner_setups == {name for name, _, _ in CASES}


@pytest.mark.parametrize("name, seed, data_seed", CASES, ids=[f"{n}-s{s}-d{d}" for n, s, d in CASES])
def test_healthy_runner_is_silent_for_1500_steps(name: str, seed: int, data_seed: int) -> None:
    runner = zoo.get(name).runner(seed, data_seed=data_seed)
    result = runner.run(steps=STEPS)
    assert runner.global_step == STEPS, result
    assert runner.history.measured[-1000:].sum() < 1000  # the sparse phase was really exercised
    _assert_silent(runner)


def test_data_seed_changes_the_data_not_the_weights() -> None:
    setup = zoo.get("regression-mlp")
    a, b, c = setup.build(0), setup.build(0, data_seed=1), setup.build(0, data_seed=1)
    xa, xb, xc = (parts["train_data"].dataset.tensors[0] for parts in (a, b, c))
    assert not torch.equal(xa, xb) and torch.equal(xb, xc)
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="data_seed"):
        setup.build(0, data_seed=-1)


@pytest.mark.parametrize("seed, data_seed", [(0, 0), (3, 5)])
def test_healthy_own_loop_is_silent_for_1500_steps(seed: int, data_seed: int) -> None:
    """An ordinary loop (train, then validate under eval() + no_grad() each epoch) under watch()."""
    parts = zoo.get("mlp-digits").build(seed, data_seed=data_seed)
    model, opt, crit = parts["model"], parts["optimizer"], parts["loss_fn"]
    steps = 0
    with tlw.watch(model, opt, loss_fn=crit) as w:
        while steps < STEPS:
            model.train()
            for x, y in parts["train_data"]:
                opt.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                opt.step()
                steps += 1
                if steps == STEPS:
                    break
            model.eval()
            with torch.no_grad():
                val = [crit(model(x), y).item() for x, y in parts["val_data"]]
            assert all(math.isfinite(v) for v in val)
    assert w.global_step == STEPS
    assert w.history.measured[-1000:].sum() < 1000
    problems = [f for f in w.findings if f.severity in ("warning", "error")]
    assert problems == [], [(f.code, f.first_step, f.message) for f in problems]
