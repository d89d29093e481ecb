"""watch(): hooks on the user's own loop, removed on exit; per-step numbers against naive torch; loop facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    make_batches,
    make_mlp,
    make_runner,
    naive_norms,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn

import tlwidgets as tlw
from tlwidgets import Stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _hook_counts(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module) -> dict[str, int]:
    return {
        "forward": sum(len(m._forward_hooks) for m in model.modules()),
        "forward_pre": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "loss_forward": len(loss_fn._forward_hooks) + len(loss_fn._forward_pre_hooks),
        "opt_pre": len(opt._optimizer_step_pre_hooks),
        "opt_post": len(opt._optimizer_step_post_hooks),
        "param_backward": sum(len(p._backward_hooks or {}) for p in model.parameters()),
        "param_post_accumulate": sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()),
    }


def _setup(momentum: float = 0.0):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    return model, opt, nn.CrossEntropyLoss()


def _train(
    model, opt, loss_fn, batches, *, zero_grad: bool = True, step: bool = True, clip: float | None = None
):
    losses = []
    for x, y in batches:
        if zero_grad:
            opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if step:
            opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------- hooks
def test_hooks_are_installed_and_removed_on_exit_keeping_the_users_own():
    model, opt, loss_fn = _setup()
    user = model[0].register_forward_hook(lambda m, a, o: None)  # the user's own hook survives
    baseline = _hook_counts(model, opt, loss_fn)
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        during = _hook_counts(model, opt, loss_fn)
        assert all(during[k] > baseline[k] for k in during), during
        _train(model, opt, loss_fn, make_batches(2))
    assert w.closed
    assert _hook_counts(model, opt, loss_fn) == baseline
    assert len(model[0]._forward_hooks) == 1
    user.remove()
    w.close()  # idempotent
    assert _hook_counts(model, opt, loss_fn)["forward"] == 0


def test_close_removes_hooks_and_is_idempotent():
    model, opt, loss_fn = _setup()
    baseline = _hook_counts(model, opt, loss_fn)
    w = tlw.watch(model, opt, loss_fn=loss_fn)
    _train(model, opt, loss_fn, make_batches(1))
    w.close()
    w.close()
    assert _hook_counts(model, opt, loss_fn) == baseline
    # After close, the user's loop runs untracked.
    _train(model, opt, loss_fn, make_batches(2))
    assert w.global_step == 1 and len(w.history) == 1
    with pytest.raises(RuntimeError, match="closed"):
        w.freeze("0")


def test_hooks_are_removed_when_the_loop_raises():
    model, opt, loss_fn = _setup()
    baseline = _hook_counts(model, opt, loss_fn)
    with pytest.raises(ZeroDivisionError), tlw.watch(model, opt, loss_fn=loss_fn):
        _train(model, opt, loss_fn, make_batches(1))
        1 / 0  # noqa: B018
    assert _hook_counts(model, opt, loss_fn) == baseline


def test_runner_close_removes_its_hooks():
    model, opt, loss_fn = _setup()
    baseline = _hook_counts(model, opt, loss_fn)
    runner = make_runner(model, optimizer=opt, loss_fn=loss_fn)
    runner.run(steps=2)
    runner.close()
    assert _hook_counts(model, opt, loss_fn) == baseline


def test_loss_fn_must_be_a_module_or_use_record_loss():
    model, opt, _ = _setup()
    with pytest.raises(TypeError, match="record_loss"):
        tlw.watch(model, opt, loss_fn=nn.functional.cross_entropy)
    with pytest.raises(TypeError):
        tlw.watch(lambda x: x, opt)
    losses = []
    with tlw.watch(model, opt) as w:
        for x, y in make_batches(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            w.record_loss(loss)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)


# ---------------------------------------------------------------------- numbers
def test_history_equals_naive_per_step_numbers():
    model, opt, loss_fn = _setup(momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    losses, grads, weights, updates = [], [], [], []
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for x, y in make_batches(5):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            before = snapshot(model)
            grads.append(naive_norms(p.grad for p in model.parameters()))
            weights.append(naive_norms(before[n] for n in names))
            opt.step()
            after = snapshot(model)
            updates.append(naive_norms(after[n] - before[n] for n in names))
            losses.append(loss.item())
    h = w.history
    assert w.global_step == 5 and len(h) == 5 and h.param_names == names
    np.testing.assert_array_equal(h.step, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(h.loss, losses, rtol=1e-6)
    np.testing.assert_allclose(h.grad_norm, grads, rtol=1e-5)
    np.testing.assert_allclose(h.weight_norm, weights, rtol=1e-5)
    np.testing.assert_allclose(h.update_norm, updates, rtol=1e-4)
    np.testing.assert_allclose(h.update_ratio, np.array(updates) / np.array(weights), rtol=1e-4)
    np.testing.assert_allclose(h.lr, 0.1)
    assert w.records[Stage.LOSS].data["loss"] == losses[-1]
    assert w.records[Stage.LOSS].data["expected_initial_loss"] == pytest.approx(math.log(3))
    assert w.records[Stage.FETCH].data["tensors"]["inputs"]["shape"] == (8, 8)
    assert w.records[Stage.STEP].data["lr"] == [0.1]
    assert w.kind == "watch"


def _train_and_validate(w_model, opt, loss_fn, train, val, *, val_grad: bool):
    train_losses, val_losses = [], []
    for _ in range(2):
        w_model.train()
        train_losses += _train(w_model, opt, loss_fn, train)
        w_model.eval()
        if val_grad:  # a common slip: validation under eval() but without no_grad()
            val_losses = [loss_fn(w_model(x), y).item() for x, y in val]
        else:
            with torch.no_grad():
                val_losses = [loss_fn(w_model(x), y).item() for x, y in val]
        w_model.train()
    return train_losses, val_losses


@pytest.mark.parametrize("val_grad", [False, True], ids=["no_grad", "grad-enabled"])
def test_validation_is_not_a_training_step(val_grad):
    model, opt, loss_fn = _setup()
    train, val = make_batches(3), make_batches(2, seed=4)
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        train_losses, val_losses = _train_and_validate(model, opt, loss_fn, train, val, val_grad=val_grad)
    assert w.global_step == 6 and len(w.history) == 6
    assert w.loop.steps == 6 and w.loop.backwards == 6
    assert w.loop.stale_steps == 0 and w.loop.backwards_without_step == 0
    np.testing.assert_allclose(w.history.loss, train_losses, rtol=1e-6)
    np.testing.assert_array_equal(w.history.epoch, 0)
    if not val_grad:
        np.testing.assert_allclose(w.loop.val_losses, val_losses, rtol=1e-6)
        assert w.records[Stage.FORWARD].data["training"] is True


def test_forward_record_describes_the_last_training_forward_after_grad_enabled_validation():
    model, opt, loss_fn = _setup()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        _train_and_validate(model, opt, loss_fn, make_batches(3), make_batches(2, seed=4), val_grad=True)
    assert w.records[Stage.FORWARD].data["training"] is True
    assert w.records[Stage.FORWARD].data["eval_modules"] == []


def test_first_parameter_unused_still_records_the_loop():
    class Late(nn.Module):
        """The first registered parameter is unused (a disconnected branch, itself a classic bug)."""

        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(8, 3)
            self.net = make_mlp()

        def forward(self, x):
            return self.net(x)

    model = Late()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        losses = _train(model, opt, loss_fn, make_batches(3))
    assert w.global_step == 3
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)
    assert w.loop.backwards == 3


# ---------------------------------------------------------------------- loop facts
def test_healthy_loop_facts():
    model, opt, loss_fn = _setup()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        _train(model, opt, loss_fn, make_batches(4))
    f = w.loop
    assert (f.backwards, f.steps, f.stale_steps, f.backwards_without_step, f.accumulating) == (
        4,
        4,
        0,
        0,
        False,
    )


def test_missing_zero_grad_counts_stale_steps():
    model, opt, loss_fn = _setup()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        _train(model, opt, loss_fn, make_batches(4), zero_grad=False)
    assert w.loop.stale_steps == 3  # every backward after the first adds to stale grads
    assert w.loop.backwards_without_step == 0 and w.loop.steps == 4


def test_zero_grad_without_set_to_none_is_not_stale():
    model, opt, loss_fn = _setup()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for x, y in make_batches(4):
            opt.zero_grad(set_to_none=False)
            loss_fn(model(x), y).backward()
            opt.step()
    assert w.loop.stale_steps == 0 and w.loop.accumulating is False


def test_missing_step_counts_backwards_without_step():
    model, opt, loss_fn = _setup()
    before = snapshot(model)
    w = tlw.watch(model, opt, loss_fn=loss_fn)
    _train(model, opt, loss_fn, make_batches(4), step=False)
    assert w.loop.backwards == 4 and w.loop.steps == 0
    assert w.loop.backwards_without_step == 3
    w.finish()
    assert w.loop.backwards_without_step >= 4
    w.close()
    assert w.global_step == 0 and len(w.history) == 0
    assert weights_equal(before, snapshot(model))


def test_gradient_accumulation_is_recognised_as_deliberate():
    model, opt, loss_fn = _setup()
    batches = make_batches(12, batch_size=2)
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for i in range(0, 12, 4):
            opt.zero_grad()
            for x, y in batches[i : i + 4]:
                (loss_fn(model(x), y) / 4).backward()
            opt.step()
    f = w.loop
    assert f.backwards == 12 and f.steps == 3
    assert f.accumulating is True
    assert f.stale_steps == 0 and f.backwards_without_step == 0
    assert w.global_step == 3


def test_clip_ratio_is_one_without_clipping_and_tiny_with_strong_clipping():
    model, opt, loss_fn = _setup()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        _train(model, opt, loss_fn, make_batches(4))
    assert len(w.loop.clip_ratio) >= 3
    np.testing.assert_allclose(w.loop.clip_ratio, 1.0, rtol=1e-5)

    model, opt, loss_fn = _setup()
    norms = []
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for x, y in make_batches(4):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), 1e-4)))
            opt.step()
    assert len(w.loop.clip_ratio) >= 3
    assert max(w.loop.clip_ratio) < 1e-2
    # Global clipping scales every gradient by max_norm / total_norm.
    np.testing.assert_allclose(w.loop.clip_ratio, 1e-4 / np.array(norms[: len(w.loop.clip_ratio)]), rtol=1e-3)


# ---------------------------------------------------------------------- controls
def test_watcher_freeze_and_set_lr_act_on_the_users_loop():
    model, opt, loss_fn = _setup(momentum=0.9)
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        _train(model, opt, loss_fn, make_batches(2))
        assert w.freeze("0") == ["0.weight", "0.bias"]
        w.set_lr(0.02)
        before = snapshot(model)
        _train(model, opt, loss_fn, make_batches(3))
    assert weights_equal(before, snapshot(model), ["0.weight", "0.bias"])
    assert not weights_equal(before, snapshot(model), ["2.weight"])
    assert opt.param_groups[0]["lr"] == 0.02
    np.testing.assert_allclose(w.history.lr[-3:, 0], 0.02)
    assert [c.kind for c in w.history.controls] == ["freeze", "set_lr"]


def test_a_sparse_phase_snapshots_the_weights_on_measured_steps_only() -> None:
    # The update statistics need a snapshot before optimizer.step(); an unmeasured step's row has
    # none, so it takes none (#15: it was taken on every step).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss(), dense_steps=5, measure_every=4) as w:
        calls = []
        original = w.tracker.stats.before_step
        w.tracker.stats.before_step = lambda exact=False: (calls.append(w.global_step), original(exact))
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    measured = [i for i, m in enumerate(w.history.measured) if m]
    assert calls == measured == [0, 1, 2, 3, 4, 8, 12, 16, 20, 24, 28]
    ratio = w.history.update_ratio[measured]
    assert np.isfinite(ratio).all() and (ratio > 0).all()
    assert np.isnan(w.history.update_norm[[5, 6, 7, 29]]).all()
