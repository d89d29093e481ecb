"""Explicit model checks: lr_range_test, overfit_one_batch, labels-decoupled, batch independence, gradcheck.

Every check must leave model, optimizer and RNG states exactly as it found them; these tests compare
bit for bit. They also inject each bug and check that its healthy twin stays silent.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.checks import (
    LRRangeResult,
    check_batch_independence,
    check_labels_decoupled,
    gradcheck_function,
    lr_range_test,
    overfit_one_batch,
    preserved_state,
)
from tlwidgets.zoo.models import SequenceNet, mlp

torch.set_num_threads(1)


# ---------------------------------------------------------------------- helpers
def _snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    return {
        "tensors": [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "opt": copy.deepcopy(opt.state_dict()) if opt is not None else None,
        "group_ids": [id(g) for g in opt.param_groups] if opt is not None else None,
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _assert_restored(before: dict, after: dict) -> None:
    for key in before:
        assert _same(before[key], after[key]), f"{key} was not restored bit for bit"


class _BNDrop(nn.Module):
    """Linear + BatchNorm + Dropout (buffers, train-mode randomness) with one frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 32)
        self.fc = nn.Linear(32, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(32, 10)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.frozen(x.flatten(1)))
        return self.out(self.drop(torch.relu(self.bn(self.fc(h)))))


@pytest.fixture
def digits_data():
    train, val = zoo.digits.train_val_split(*zoo.load_digits_tensors(), val_fraction=0.2, seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    return train, val, loader


def _trained_parts(loader, optimizer="adam"):
    torch.manual_seed(0)
    model = _BNDrop()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(loader):  # non-empty optimizer state and grads left in place
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if i == 2:
            break
    model.out.eval()  # an unusual mode mix that must survive the check
    return model, loss_fn, opt


# ---------------------------------------------------------------------- state restoration
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_lr_range_test_restores_everything_bit_for_bit(digits_data, optimizer):
    _, _, loader = digits_data
    model, loss_fn, opt = _trained_parts(loader, optimizer)
    np.random.seed(3)
    random.seed(3)
    before = _snapshot(model, opt)
    result = lr_range_test(model, loss_fn, opt, loader, num_steps=30, end_lr=1.0)
    _assert_restored(before, _snapshot(model, opt))
    assert len(result.lrs) >= 2


def test_overfit_and_labels_check_restore_everything(digits_data):
    _, _, loader = digits_data
    model, loss_fn, opt = _trained_parts(loader)
    inputs = next(iter(loader))[0]  # drawn before the snapshot: iterating a shuffling loader uses the RNG
    before = _snapshot(model, opt)
    overfit_one_batch(model, loss_fn, opt, loader, steps=10, lr=0.5)
    _assert_restored(before, _snapshot(model, opt))
    check_labels_decoupled(model, loss_fn, opt, loader, steps=10)
    _assert_restored(before, _snapshot(model, opt))
    check_batch_independence(model, inputs)
    _assert_restored(before, _snapshot(model, opt))


def test_preserved_state_undoes_a_step_and_keeps_identities():
    torch.manual_seed(0)
    model = _BNDrop()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    groups, state_ids = opt.param_groups, [id(p) for p in model.parameters()]
    before = _snapshot(model, opt)
    with preserved_state(model, opt):
        x = torch.randn(16, 64)
        model(x).sum().backward()
        opt.param_groups[0]["lr"] = 7.0
        opt.step()
        model.eval()
        torch.rand(3)
    _assert_restored(before, _snapshot(model, opt))
    assert opt.param_groups is groups and [id(p) for p in model.parameters()] == state_ids


def test_checks_leave_a_runner_replaying_identically():
    setup = zoo.get("mlp-digits")

    def session(with_checks: bool):
        runner = setup.runner(seed=1)  # seeds the global RNG: both sessions start identical
        try:
            runner.run(steps=3)
            position = (runner.global_step, runner.epoch, runner.batch_index, len(runner.history))
            if with_checks:
                lr_range_test(runner, num_steps=20)
                overfit_one_batch(runner, steps=5)
                check_labels_decoupled(runner, steps=5)
                assert (runner.global_step, runner.epoch, runner.batch_index, len(runner.history)) == position
            runner.run(steps=30)  # crosses an epoch end: the next shuffle order must match too
            return runner.history.loss.copy(), [v.clone() for v in runner.model.state_dict().values()]
        finally:
            runner.close()

    plain_loss, plain_state = session(False)
    checked_loss, checked_state = session(True)
    assert len(plain_loss) == 33 and np.array_equal(plain_loss, checked_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_state, checked_state))


def test_checks_refuse_a_runner_holding_an_autograd_graph():
    runner = zoo.get("mlp-digits").runner()
    try:
        while runner.stage is not Stage.LOSS:
            runner.step_stage()
        with pytest.raises(RuntimeError, match="mid-step"):
            lr_range_test(runner, num_steps=5)
        runner.step()  # finishing the batch makes it legal again
        assert lr_range_test(runner, num_steps=5).lrs.size == 5
    finally:
        runner.close()


def test_one_shot_runner_data_is_not_consumed():
    setup = zoo.get("mlp-digits")
    parts = setup.build()
    parts["train_data"] = iter(list(parts["train_data"]))
    runner = tlw.Runner(**parts)
    try:
        with pytest.raises(ValueError, match="one-shot"):
            lr_range_test(runner)
    finally:
        runner.close()


# ---------------------------------------------------------------------- LR range test
def test_lr_range_curve_shape_and_suggestion(digits_data):
    _, _, loader = digits_data
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res = lr_range_test(model, nn.CrossEntropyLoss(), opt, loader, start_lr=1e-5, end_lr=100.0, num_steps=80)
    assert isinstance(res, LRRangeResult)
    assert res.lrs[0] == pytest.approx(1e-5)
    steps = np.diff(np.log(res.lrs))
    assert np.allclose(steps, np.log(100.0 / 1e-5) / 79)  # exponential spacing
    assert res.stopped_by in ("diverged", "non-finite")  # lr 100 with momentum cannot train
    assert len(res.lrs) < 80 and len(res.losses) == len(res.lrs) == len(res.smoothed)
    # A working LR for this MLP is about 0.01-0.3: the suggestion must be in the useful decade range.
    assert 1e-3 <= res.suggestion <= 1.0
    assert res.suggestion <= res.min_loss_lr
    assert res.per_group == {0: res.suggestion}
    assert "suggested lr" in str(res) and res.to_dict()["suggestion"] == res.suggestion


def test_smoothed_curve_and_suggestion_against_a_naive_computation():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5)]
    res = lr_range_test(model, nn.MSELoss(), opt, data, start_lr=1e-4, end_lr=3.0, num_steps=40, smooth=0.3)
    beta = 0.7

    def ema(x):
        out, avg = [], 0.0
        for i, v in enumerate(x):
            avg = beta * avg + (1 - beta) * v
            out.append(avg / (1 - beta ** (i + 1)))
        return np.array(out)

    assert np.allclose(res.smoothed, ema(res.losses), rtol=1e-12)
    # suggestion: lag-free smoothing up to the lowest running loss, then min(steepest, min/10)
    cut = int(np.argmin(res.smoothed)) + 1
    lagfree = ema(ema(res.losses[:cut])[::-1])[::-1]
    i_min = int(np.argmin(lagfree))
    assert res.min_loss_lr == pytest.approx(res.lrs[i_min])
    skip = min(max(1, cut // 20), i_min)
    slope = np.gradient(lagfree[skip : i_min + 1], np.log10(res.lrs[skip : i_min + 1]))
    steepest = res.lrs[skip + int(np.argmin(slope))]
    assert res.steepest_lr == pytest.approx(steepest)
    assert res.suggestion == pytest.approx(min(steepest, res.min_loss_lr / 10))


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names(healthy=True))
def test_lr_suggestion_is_near_the_lr_that_trains_each_healthy_setup(name):
    runner = zoo.get(name).runner()
    try:
        working = max(runner.lrs)
        res = lr_range_test(runner)
        assert working / 10 <= res.suggestion <= working * 10, str(res)
    finally:
        runner.close()


def test_lr_range_sweeps_only_the_chosen_group_and_each_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.02}]
    )
    seen: list[tuple[float, float]] = []

    def loss_fn(out, y):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return nn.functional.mse_loss(out, y)

    data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(3)]
    res = lr_range_test(model, loss_fn, opt, data, start_lr=1e-4, end_lr=1e-1, num_steps=10, group=1)
    assert all(a == 0.01 for a, _ in seen) and seen[-1][1] == pytest.approx(res.lrs[-1])
    assert res.groups == (1,) and set(res.per_group) == {1}
    seen.clear()
    each = lr_range_test(model, loss_fn, opt, data, start_lr=1e-4, end_lr=1e-1, num_steps=10, group="each")
    assert set(each.curves) == {0, 1} and set(each.per_group) == {0, 1}
    assert each.per_group[1] == each.curves[1].suggestion
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02]
    with pytest.raises(ValueError):
        lr_range_test(model, loss_fn, opt, data, group=5)
    with pytest.raises(ValueError):
        lr_range_test(model, loss_fn, opt, data, start_lr=1.0, end_lr=0.1)


def test_lr_range_stops_at_a_non_finite_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = nn.functional.mse_loss(out, y)
        return loss * float("nan") if calls["n"] > 15 else loss

    data = [(torch.randn(16, 4), torch.randn(16, 1))]
    res = lr_range_test(model, loss_fn, opt, data, num_steps=50)
    assert res.stopped_by == "non-finite" and len(res.lrs) == 16
    assert np.isnan(res.losses[-1]) and np.isnan(res.smoothed[-1]) and np.isfinite(res.smoothed[:-1]).all()
    assert res.suggestion is not None and res.lrs[0] / 10 <= res.suggestion <= res.lrs[-1]


# ---------------------------------------------------------------------- overfit one batch
def test_overfit_one_batch_passes_on_a_working_model(digits_data):
    _, _, loader = digits_data
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    res = overfit_one_batch(model, nn.CrossEntropyLoss(), opt, loader, steps=60)
    assert res.passed and res.finding is None
    assert len(res.losses) == 61 and res.final_loss == res.losses[-1] < 0.1 * res.initial_loss
    assert "passed" in str(res)


class _BiasOnly(nn.Module):
    """Outputs a learned constant: it cannot fit a batch with several classes."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10)


def test_overfit_one_batch_names_why_it_fails():
    torch.manual_seed(0)
    x, y = torch.randn(40, 64), torch.arange(40) % 10
    batch = (x, y)
    model = mlp([64, 32, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    low = overfit_one_batch(model, nn.CrossEntropyLoss(), opt, batch=batch, steps=20, lr=1e-7)
    assert not low.passed and low.finding.code == "lr-too-low"
    high = overfit_one_batch(model, nn.CrossEntropyLoss(), opt, batch=batch, steps=20, lr=1e4)
    assert not high.passed and high.finding.code in ("non-finite-loss", "lr-too-high")
    const = _BiasOnly()
    plateau = overfit_one_batch(
        const, nn.CrossEntropyLoss(), torch.optim.Adam(const.parameters(), lr=0.1), batch=batch, steps=50
    )
    assert not plateau.passed and plateau.finding.code == "loss-plateau"
    assert "single batch" in plateau.finding.message and "model" in plateau.finding.cause
    assert plateau.final_loss == pytest.approx(math.log(10), abs=0.05)  # the best constant: uniform


def test_overfit_that_is_still_falling_is_not_a_finding():
    x, y = zoo.load_digits_tensors()
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    res = overfit_one_batch(model, nn.CrossEntropyLoss(), opt, batch=(x[:64], y[:64]), steps=15)
    quarter = res.losses[-1 - 15 // 4]
    assert not res.passed and res.still_falling and res.final_loss < 0.9 * quarter
    assert res.finding is None and "still falling" in str(res)


def test_overfit_on_a_runner_uses_its_first_batch_and_restores():
    runner = zoo.get("cnn-bn-digits").runner()
    try:
        before = _snapshot(runner.model, runner.optimizer)
        res = overfit_one_batch(runner, steps=40, lr=1e-2)
        assert res.passed, str(res)
        _assert_restored(before, _snapshot(runner.model, runner.optimizer))
        assert runner.global_step == 0 and runner.batch_index == 0
    finally:
        runner.close()


# ---------------------------------------------------------------------- labels decoupled
def test_labels_decoupled_detects_shuffled_labels_and_spares_the_twin():
    broken, twin = zoo.get("labels-decoupled"), zoo.get("mlp-digits")
    rb, rt = broken.runner(), twin.runner()
    try:
        f = check_labels_decoupled(rb, steps=60)
        assert f is not None and f.code == "labels-decoupled" and f.severity == "error"
        assert f.evidence["gain"] < 0.05 and f.evidence["baseline_loss"] > 2.0
        assert check_labels_decoupled(rt, steps=60) is None
        # with an explicit held-out set (real pairs) the verdict is the same
        assert check_labels_decoupled(rb, val_data=rt.val_data, steps=60) is not None
    finally:
        rb.close()
        rt.close()


def test_labels_decoupled_on_regression_twin_is_silent():
    runner = zoo.get("regression-mlp").runner()
    try:
        assert check_labels_decoupled(runner, steps=60) is None
    finally:
        runner.close()


# ---------------------------------------------------------------------- batch independence
def test_batch_independence_finds_a_view_instead_of_transpose():
    torch.manual_seed(0)
    x = torch.randn(6, 12, 2)
    good, bad = SequenceNet(mix_batch=False), SequenceNet(mix_batch=True)
    bad.load_state_dict(good.state_dict())
    assert check_batch_independence(good, x) is None
    f = check_batch_independence(bad, x, index=2)
    assert f is not None and f.code == "batch-mixing" and f.params == ("gru",)
    assert f.evidence["dependent_rows"] >= 1 and f.evidence["other_grad"] > 0


class _Centered(nn.Module):
    """Subtracts the batch mean: every output depends on every example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h - h.mean(0, keepdim=True))


def test_batch_independence_names_the_first_mixing_module_and_keeps_modes():
    model = _Centered()
    model.train()
    f = check_batch_independence(model, torch.randn(4, 5))
    assert f is not None and f.params == ("head",)  # fc's output is per example; mixing happens before head
    assert model.training and all(p.grad is None for p in model.parameters())


def test_batch_norm_is_not_batch_mixing():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()  # in train mode BN couples the batch legitimately; the check runs in eval mode
    assert check_batch_independence(model, torch.randn(8, 5)) is None
    stats_free = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 2))
    assert check_batch_independence(stats_free, torch.randn(8, 5)) is None
    assert model.training


class _TokenMixer(nn.Module):
    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.mix = mix

    def forward(self, tokens):
        e = self.emb(tokens).mean(1)  # [N, 4]
        return e + e.roll(1, 0) if self.mix else e


def test_batch_independence_for_integer_inputs_by_reordering():
    tokens = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(0))
    assert check_batch_independence(_TokenMixer(False), tokens) is None
    f = check_batch_independence(_TokenMixer(True), tokens)
    assert f is not None and f.code == "batch-mixing"
    with pytest.raises(ValueError):
        check_batch_independence(_TokenMixer(False), tokens[:2])


# ---------------------------------------------------------------------- gradcheck
class _Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x


class _BadMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        _, w = ctx.saved_tensors
        return g * w, g * w  # wrong: d(x*w)/dw is x


def test_gradcheck_function():
    x, w = torch.randn(4, 3), torch.randn(4, 3)
    assert gradcheck_function(_Mul.apply, x, w) is None
    f = gradcheck_function(_BadMul.apply, x, w)
    assert f is not None and f.code == "stage-error" and f.evidence["input"] == 1
    assert "_BadMul.apply" in f.message and "input 1" in f.cause
    assert x.dtype == torch.float32 and not x.requires_grad and x.grad is None  # originals untouched
    assert gradcheck_function(nn.Linear(3, 2), torch.randn(2, 3)) is None

    def broken(a):
        raise RuntimeError("boom")

    g = gradcheck_function(broken, x)
    assert g is not None and g.code == "stage-error" and "could not run" in g.message and "boom" in g.message
    with pytest.raises(ValueError):
        gradcheck_function(_Mul.apply, torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
