"""The fit verdict (tlwidgets.diagnostics.fit) and the training accuracy per epoch it reads.

Verdicts on constructed epoch records (each rule and threshold), on real short runs on scikit-learn's
digits (an overfitting setup, an underfitting one, healthy ones that must not be called either), the
fit actions (offered only when they apply; applied through the runner's controls, undone by rewind),
and ``EpochRecord.train_metrics["accuracy"]`` against a naive count made by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import digits_runner, make_batches, make_runner, one_thread, overfitting_digits_runner  # noqa: F401
from torch import nn

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.core.records import EpochRecord
from tlwidgets.diagnostics import fit
from tlwidgets.diagnostics.fit import Baseline, FitReport, Verdict, assess_fit, fit_actions, fit_report
from tlwidgets.zoo.datasets import digits_datasets, loaders
from tlwidgets.zoo.models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")

CHANCE10 = Baseline.chance(10)


def records(train_loss, val_loss=None, train_acc=None, val_acc=None, steps_per_epoch=10):
    """Epoch records 0, 1, ... with the numbers given (None: not measured)."""
    out = []
    for i, t in enumerate(train_loss):
        e = EpochRecord(
            epoch=i,
            step=steps_per_epoch * (i + 1),
            train_loss=t,
            val_loss=None if val_loss is None else val_loss[i],
        )
        if train_acc is not None:
            e.train_metrics["accuracy"] = train_acc[i]
        if val_acc is not None:
            e.val_metrics["accuracy"] = val_acc[i]
        out.append(e)
    return out


# ================================================================================ constructed records
def test_chance_baseline_is_ln_k_and_one_over_k():
    b = Baseline.chance(10, target_accuracy=0.95)
    assert b.loss == pytest.approx(math.log(10)) and b.accuracy == pytest.approx(0.1)
    assert b.target_accuracy == 0.95 and b.has_target and "10 classes" in b.label
    with pytest.raises(ValueError, match="at least 2"):
        Baseline.chance(1)


def test_nothing_is_said_before_two_epochs():
    assert assess_fit([], CHANCE10).verdict is Verdict.TOO_EARLY
    one = assess_fit(records([2.0], [1.9], [0.3], [0.4]), CHANCE10)
    assert one.verdict is Verdict.TOO_EARLY and one.epochs == 1 and "first epoch" in one.reason


def test_healthy_numbers_are_a_good_fit():
    r = assess_fit(
        records([1.4, 0.3, 0.15], [0.45, 0.18, 0.15], [0.6, 0.92, 0.96], [0.9, 0.95, 0.958]), CHANCE10
    )
    assert r.verdict is Verdict.GOOD_FIT, r.reason
    assert r.measure == "accuracy" and r.epoch == 3 and r.epochs == 3
    assert r.bias == pytest.approx((1 - 0.96) / 0.9) and r.variance == pytest.approx((0.96 - 0.958) / 0.9)
    assert r.suggestions == () and r.headline.startswith("Good fit: ")


def test_a_large_train_validation_gap_is_overfitting():
    r = assess_fit(records([1.4, 0.7, 0.3], [1.3, 0.9, 0.7], [0.7, 0.92, 0.98], [0.62, 0.77, 0.82]), CHANCE10)
    assert r.verdict is Verdict.OVERFITTING, r.reason
    assert r.variance == pytest.approx((0.98 - 0.82) / 0.9) and r.variance >= fit.OVERFIT_GAP
    assert "gap" in r.reason and any("more training data" in s for s in r.suggestions)


def test_validation_loss_rising_from_its_best_while_training_falls_is_overfitting():
    # Gap below OVERFIT_GAP, above GAP_MIN: the early-stopping signal decides.
    val = [0.9, 0.5, 0.40, 0.45, 0.50]
    r = assess_fit(
        records([1.2, 0.5, 0.3, 0.2, 0.1], val, [0.7, 0.9, 0.93, 0.95, 0.97], [0.8, 0.88, 0.9, 0.91, 0.905]),
        CHANCE10,
    )
    assert r.verdict is Verdict.OVERFITTING, r.reason
    assert r.rising == 2 and r.best_epoch == 3 and r.best_step == 30 and r.best_val_loss == 0.40
    assert "above its best" in r.reason and any("after epoch 3" in s for s in r.suggestions)


def test_a_converged_runs_validation_wobble_is_no_alarm():
    # Validation loss up 10% from its best for three epochs while training falls, but the gap is tiny.
    r = assess_fit(
        records(
            [0.3, 0.06, 0.05, 0.04, 0.03],
            [0.2, 0.07, 0.075, 0.076, 0.077],
            [0.9, 0.98, 0.985, 0.99, 0.991],
            [0.95, 0.975, 0.975, 0.973, 0.973],
        ),
        Baseline.chance(5),
    )
    assert r.rising == 3 and r.variance < fit.GAP_MIN
    assert r.verdict is Verdict.GOOD_FIT, r.reason


def test_stalled_near_chance_is_underfitting_and_fast_learning_is_too_early():
    stalled = assess_fit(
        records(
            [2.45, 2.44, 2.43, 2.43],
            [2.39, 2.38, 2.38, 2.37],
            [0.06, 0.064, 0.065, 0.065],
            [0.06, 0.06, 0.061, 0.064],
        ),
        CHANCE10,
    )
    assert stalled.verdict is Verdict.UNDERFITTING, stalled.reason
    assert stalled.bias > fit.UNDERFIT_CHANCE and stalled.pace < 0.01
    assert any("learning rate" in s for s in stalled.suggestions)
    assert any("bigger model" in s for s in stalled.suggestions)
    # Same level, but improving ~20% of the range per epoch: a slow healthy start.
    learning = assess_fit(
        records([2.3, 2.2, 2.1], [2.25, 2.16, 2.07], [0.08, 0.22, 0.44], [0.16, 0.32, 0.5]), CHANCE10
    )
    assert learning.bias > fit.UNDERFIT_CHANCE
    assert learning.verdict is Verdict.TOO_EARLY and "still learning" in learning.reason


def test_a_target_turns_a_good_fit_into_underfitting():
    recs = records(
        [0.6, 0.4, 0.38, 0.37, 0.37],
        [0.5, 0.42, 0.4, 0.4, 0.4],
        [0.8, 0.88, 0.884, 0.885, 0.886],
        [0.86, 0.87, 0.875, 0.876, 0.876],
    )
    assert assess_fit(recs, CHANCE10).verdict is Verdict.GOOD_FIT
    aimed = assess_fit(recs, Baseline.chance(10, target_accuracy=0.97))
    assert aimed.verdict is Verdict.UNDERFITTING and "the target" in aimed.reason
    assert aimed.bias == pytest.approx((0.97 - 0.886) / (0.97 - 0.1))


def test_both_gaps_name_the_larger():
    # Training accuracy 0.4 (bias 0.67) and validation 0.25 (variance 0.17), stalled: underfitting first.
    r = assess_fit(
        records(
            [1.8, 1.7, 1.7, 1.7], [1.9, 1.9, 1.95, 1.95], [0.39, 0.4, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]
        ),
        CHANCE10,
    )
    assert r.bias > r.variance >= fit.OVERFIT_GAP
    assert r.verdict is Verdict.UNDERFITTING


def test_loss_only_runs_are_measured_from_the_start_of_training():
    # A regression: no accuracy; the baseline is the loss at the start.
    healthy = assess_fit(records([0.5, 0.3, 0.15], [0.45, 0.28, 0.16]), Baseline(loss=0.55, label="start"))
    assert healthy.measure == "loss" and healthy.verdict is Verdict.GOOD_FIT, healthy.reason
    stuck = assess_fit(records([0.54, 0.54, 0.539], [0.55, 0.55, 0.55]), Baseline(loss=0.55))
    assert stuck.verdict is Verdict.UNDERFITTING and stuck.bias > fit.UNDERFIT_LOSS
    # No baseline given: the first epoch's highest loss.
    assert assess_fit(records([0.54, 0.54, 0.539], [0.55, 0.55, 0.55])).verdict is Verdict.UNDERFITTING


def test_without_validation_only_underfitting_can_be_named():
    r = assess_fit(records([1.0, 0.3, 0.2], train_acc=[0.7, 0.93, 0.95]), CHANCE10)
    assert r.verdict is Verdict.NO_VALIDATION and "val_data" in r.suggestions[0]
    assert math.isnan(r.variance) and r.best_epoch is None
    stuck = assess_fit(records([2.4, 2.4, 2.4], train_acc=[0.1, 0.1, 0.1]), CHANCE10)
    assert stuck.verdict is Verdict.UNDERFITTING


def test_non_finite_epochs_are_left_out():
    recs = records(
        [1.4, math.nan, 0.3, 0.15],
        [0.45, math.nan, 0.18, 0.15],
        [0.6, 0.1, 0.92, 0.96],
        [0.9, 0.1, 0.95, 0.958],
    )
    r = assess_fit(recs, CHANCE10)
    assert r.epochs == 3 and r.verdict is Verdict.GOOD_FIT


# ================================================================================ training accuracy
def _digits_batches(n: int, batch: int, seed: int = 0):
    train, val = digits_datasets(seed)
    x, y = train.tensors
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], val


@pytest.mark.parametrize(("examples", "batch"), [(256, 32), (1184, 16)])  # 8 and 74 steps an epoch
def test_train_accuracy_matches_a_naive_count(examples: int, batch: int):
    # (Predictions are compared with the labels 32 steps at a time: 74 steps cross that twice.)
    batches, val = _digits_batches(examples, batch)
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    ref = copy.deepcopy(model)
    runner = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        batches,
        val_data=loaders(val, None)[0],
    )
    runner.run(epochs=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for _ in range(3):
        hits = count = 0
        for xb, yb in batches:
            opt.zero_grad()
            out = ref(xb)
            hits += int((out.argmax(1) == yb).sum())
            count += len(yb)
            nn.functional.cross_entropy(out, yb).backward()
            opt.step()
        expected.append(hits / count)
    got = [e.train_metrics["accuracy"] for e in runner.history.epochs]
    assert got == expected  # the same weights at each forward: the same hits, exactly
    assert expected[-1] > expected[0]  # it learned: the count follows the weights


def test_train_accuracy_of_an_epoch_rewound_between_two_counts_is_the_naive_one():
    batches, val = _digits_batches(1184, 16)
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    runner = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.1),
        batches,
        val_data=loaders(val, None)[0],
    )
    runner.run(steps=40)  # 32 steps counted, 8 waiting
    ck = runner.checkpoint()
    runner.run(epochs=1)
    first = runner.history.epochs[-1].train_metrics["accuracy"]
    runner.rewind(ck)
    runner.run(steps=5)
    runner.rewind(ck)  # twice: what was counted after the checkpoint is forgotten each time
    runner.run(epochs=1)
    assert runner.history.epochs[-1].train_metrics["accuracy"] == first
    assert len(runner.history.epochs) == 1


def test_train_accuracy_survives_a_mid_epoch_rewind_and_is_absent_for_regression():
    runner = make_runner(val_data=make_batches(seed=1))
    runner.run(steps=2)
    ck = runner.checkpoint()
    runner.run(epochs=1)
    first = dict(runner.history.epochs[-1].train_metrics)
    runner.rewind(ck)
    runner.run(epochs=1)
    assert runner.history.epochs[-1].train_metrics == first and "accuracy" in first
    x = torch.randn(32, 8)
    reg = make_runner(
        train_data=[(x[i : i + 8], x[i : i + 8, :3]) for i in range(0, 32, 8)], loss_fn=nn.MSELoss()
    )
    reg.run(epochs=1)
    assert reg.history.epochs[-1].train_metrics == {}


# ================================================================================ real runs on digits
@pytest.fixture
def overfit():
    """50 training examples for a 300k-parameter MLP, Adam, one run() per epoch (each leaves an
    automatic checkpoint at the epoch boundary)."""
    runner = overfitting_digits_runner()
    for _ in range(8):
        runner.run(epochs=1)
    return runner


def test_tiny_train_set_big_mlp_is_overfitting(overfit):
    r = fit_report(overfit)
    assert r.verdict is Verdict.OVERFITTING, r.reason
    assert r.baseline.label == "chance (10 classes)" and r.train_accuracy == 1.0
    assert r.variance > 0.15 and r.best_epoch < r.epoch and r.rising >= fit.RISE_EPOCHS


def test_overfitting_offers_early_stop_and_weight_decay(overfit):
    runner = overfit
    r = fit_report(runner)
    actions = fit_actions(runner, r)
    labels = [a.label for a in actions]
    assert labels == [f"Rewind to epoch {r.best_epoch} (early stop)", "Raise weight decay to 0.0005"], labels
    assert all(a.applies for a in actions)
    done = actions[0].apply()
    assert "Rewound to the end of epoch" in done
    assert runner.global_step == r.best_step and len(runner.history.epochs) == r.best_epoch
    assert runner.history.branches[-1].label == labels[0]
    assert not actions[1].applies or labels[1] in [a.label for a in fit_actions(runner, fit_report(runner))]
    after = fit_report(runner)
    assert after.best_epoch == after.epoch  # the best is the last now: no early stop offered again
    assert not any("early stop" in a.label for a in fit_actions(runner, after))


def test_raising_weight_decay_goes_through_the_controls_and_rewind_undoes_it(overfit):
    runner = overfit
    wd_action = next(a for a in fit_actions(runner, fit_report(runner)) if "weight decay" in a.label)
    assert "set_weight_decay(0.0005)" in wd_action.description
    wd_action.apply()
    assert runner.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert runner.history.controls[-1].kind == "set_weight_decay"
    assert not wd_action.applies  # the state it was offered for is gone
    with pytest.raises(RuntimeError, match="applied already"):
        wd_action.apply()
    nxt = [a.label for a in fit_actions(runner, fit_report(runner))]
    assert "Raise weight decay to 0.005" in nxt  # ten times, up to ten times the usual value
    runner.rewind(runner.auto_checkpoints[-1])  # "auto: before set_weight_decay"
    assert runner.optimizer.param_groups[0]["weight_decay"] == 0


def test_no_early_stop_without_a_checkpoint_and_no_decay_beyond_the_cap():
    torch.manual_seed(0)
    model = mlp([64, 256, 10])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)  # 10x AdamW's usual: the cap
    runner = digits_runner(model, opt, n=50, batch=25, auto_checkpoints=0)
    runner.run(epochs=8)
    r = fit_report(runner)
    assert r.verdict is Verdict.OVERFITTING, r.reason
    assert fit_actions(runner, r) == ()


def test_tiny_lr_is_underfitting_and_raising_the_lr_repairs_it():
    torch.manual_seed(0)
    model = mlp([64, 10])  # a linear model
    runner = digits_runner(model, torch.optim.SGD(model.parameters(), lr=1e-4))
    runner.run(epochs=3)
    r = fit_report(runner)
    assert r.verdict is Verdict.UNDERFITTING, r.reason
    assert r.train_accuracy < 0.2 and r.pace < 0.01
    actions = fit_actions(runner, r)
    assert [a.label.split(" to ")[0] for a in actions] == ["Raise lr"]
    actions[0].apply()
    lr = runner.optimizer.param_groups[0]["lr"]
    assert 1e-2 <= lr <= 1.0 and runner.history.controls[-1].kind == "set_lr"
    runner.run(epochs=3)
    after = fit_report(runner)
    assert after.train_accuracy > 0.85 and after.verdict in (Verdict.GOOD_FIT, Verdict.TOO_EARLY), (
        after.reason
    )


def test_an_underfitting_verdict_at_a_sound_lr_offers_no_lr():
    torch.manual_seed(0)
    runner = zoo.get("mlp-digits").runner(0)
    runner.run(epochs=2)
    r = fit_report(runner)
    assert r.verdict is Verdict.GOOD_FIT, r.reason
    forced = FitReport(Verdict.UNDERFITTING, "as if", baseline=r.baseline)
    assert fit_actions(runner, forced) == ()  # the update/weight ratio says the LR is fine


@pytest.mark.parametrize("name", zoo.names(healthy=True))
def test_healthy_setups_are_never_called_under_or_overfitting(name):
    setup = zoo.get(name)
    runner = setup.runner(0)
    runner.run(**setup.run)
    r = fit_report(runner)
    assert r.verdict in (Verdict.GOOD_FIT, Verdict.TOO_EARLY), f"{name}: {r.headline}"
    assert fit_actions(runner, r) == ()


def test_a_longer_healthy_digits_run_stays_a_good_fit():
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    runner = digits_runner(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    for epochs in (3, 3, 4):
        runner.run(epochs=epochs)
        r = fit_report(runner)
        assert r.verdict is Verdict.GOOD_FIT, r.reason
    assert r.val_accuracy > 0.95


def test_session_baseline_and_targets():
    runner = make_runner(val_data=make_batches(seed=1))
    assert fit.session_baseline(runner).label == "start of training" or runner.history.epochs == []
    runner.run(epochs=2)
    b = fit.session_baseline(runner, target_accuracy=0.9)
    assert (
        b.loss == pytest.approx(math.log(3))
        and b.accuracy == pytest.approx(1 / 3)
        and b.target_accuracy == 0.9
    )
    with pytest.raises(ValueError, match="target_accuracy"):
        fit.session_baseline(runner, target_accuracy=1.5)
    with pytest.raises(ValueError, match="target_loss"):
        fit.session_baseline(runner, target_loss=-1)
