"""The Runner trains exactly like a plain PyTorch loop: same losses, weights and RNG state, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import make_loader, make_mlp, one_thread  # noqa: F401  (fixture)
from torch import nn

import tlwidgets as tlw
from tlwidgets import EpochRecord, Event

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 2
SEED = 1234


def _setup(opt_kind: str, sched_kind: str):
    model = make_mlp(seed=0, dropout=0.3)
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if sched_kind == "epoch":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=EPOCHS * 5)
    train = make_loader(n=40, batch_size=8, shuffle=True, seed=0)  # 5 batches per epoch
    val = make_loader(n=12, batch_size=8, shuffle=False, seed=1)  # 8 + 4: a weighted mean
    return model, opt, sched, train, val


def _plain_loop(opt_kind: str, sched_kind: str):
    model, opt, sched, train, val = _setup(opt_kind, sched_kind)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(SEED)
    losses, val_losses = [], []
    for _ in range(EPOCHS):
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched_kind == "step":
                sched.step()
            losses.append(loss.item())
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                total += float(loss_fn(model(x), y)) * len(x)
                n += len(x)
        val_losses.append(total / n)
        model.train()
        if sched_kind == "epoch":
            sched.step()
    return losses, val_losses, model.state_dict(), opt, torch.get_rng_state()


def _runner_loop(opt_kind: str, sched_kind: str, mode: str):
    model, opt, sched, train, val = _setup(opt_kind, sched_kind)
    runner = tlw.Runner(
        model, nn.CrossEntropyLoss(), opt, train, val_data=val, scheduler=sched, scheduler_interval=sched_kind
    )
    losses: list[float] = []
    runner.events.on(Event.STEP, lambda s: losses.append(s.loss))
    torch.manual_seed(SEED)
    if mode == "run":
        result = runner.run(epochs=EPOCHS)
        assert result.stopped_by == "epochs", result
    elif mode == "step":  # step() passes through epoch ends; the last one needs a FETCH
        for _ in range(EPOCHS * 5):
            rec = runner.step()
            assert rec.ok
        assert isinstance(runner.step_stage(), EpochRecord)
    else:  # one stage at a time (exact statistics, weight snapshots)
        while runner.epoch < EPOCHS:
            rec = runner.step_stage()
            assert rec.ok
    val_losses = [e.val_loss for e in runner.history.epochs]
    assert all(isinstance(e, EpochRecord) for e in runner.history.epochs)
    return losses, val_losses, model.state_dict(), opt, torch.get_rng_state(), runner


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("sched_kind", ["epoch", "step"])
@pytest.mark.parametrize("mode", ["run", "step", "step_stage"])
def test_runner_equals_plain_loop_bit_for_bit(opt_kind, sched_kind, mode):
    p_losses, p_val, p_state, p_opt, p_rng = _plain_loop(opt_kind, sched_kind)
    r_losses, r_val, r_state, r_opt, r_rng, runner = _runner_loop(opt_kind, sched_kind, mode)
    assert len(r_losses) == len(p_losses) == EPOCHS * 5
    assert r_losses == p_losses  # exact float equality
    assert r_val == p_val
    assert p_state.keys() == r_state.keys()
    for k in p_state:
        assert torch.equal(p_state[k], r_state[k]), k
    # Optimizer state (momentum / Adam moments) and LR schedule match too.
    for pp, rp in zip(p_opt.param_groups[0]["params"], r_opt.param_groups[0]["params"]):
        for key, value in p_opt.state[pp].items():
            other = r_opt.state[rp][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), key
    assert p_opt.param_groups[0]["lr"] == r_opt.param_groups[0]["lr"]
    # The runner consumed exactly the random numbers the plain loop did.
    assert torch.equal(p_rng, r_rng)
    assert runner.global_step == EPOCHS * 5 and runner.epoch == EPOCHS
    assert [f.code for f in runner.findings if f.severity == "error"] == []
