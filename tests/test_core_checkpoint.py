"""Checkpoint / rewind: replaying after a rewind gives the same losses and weights bit for bit."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from helpers import (
    make_batches,
    make_data,
    make_loader,
    make_mlp,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from tlwidgets import Checkpoint, Event, Stage
from tlwidgets.core.training import restore_optimizer, snapshot_optimizer, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyDataset(Dataset):
    """Augmentation with numpy and Python ``random``: rewind must restore those RNGs too."""

    def __init__(self, n: int = 40) -> None:
        self.x, self.y = make_data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        noise = float(np.random.normal()) * 0.1 + random.random() * 0.1
        return self.x[i] + noise, self.y[i]


def _runner(sched: str = "onecycle", data: str = "loader", **kwargs):
    model = make_mlp(dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    if sched == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
        interval = "step"
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        interval = "epoch"
    train = (
        make_loader(n=40, batch_size=8, shuffle=True)
        if data == "loader"
        else DataLoader(NoisyDataset(), batch_size=8, shuffle=True)
    )
    val = make_loader(n=16, batch_size=8, shuffle=True, seed=3)  # shuffled val consumes RNG too
    return make_runner(
        model, train, optimizer=opt, scheduler=scheduler, scheduler_interval=interval, val_data=val, **kwargs
    )


def _record(runner) -> list[float]:
    losses: list[float] = []
    runner.events.on(Event.STEP, lambda s: losses.append(s.loss))
    return losses


def _state(runner) -> dict:
    return {
        "weights": snapshot(runner.model),
        "opt": copy.deepcopy(runner.optimizer.state_dict()),
        "sched": copy.deepcopy(runner.scheduler.state_dict()) if runner.scheduler is not None else None,
        "rng": torch.get_rng_state(),
        "pos": (runner.global_step, runner.epoch, runner.batch_index, runner.stage),
        "lr": runner.lrs,
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["pos"] == b["pos"]
    assert weights_equal(a["weights"], b["weights"])
    assert a["lr"] == b["lr"]
    assert torch.equal(a["rng"], b["rng"])
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for k, v in a["opt"]["state"].items():
        for key, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(b["opt"]["state"][k][key])), key
    if a["sched"] is not None:
        sa = {k: v for k, v in a["sched"].items() if k != "lr_lambdas"}
        sb = {k: v for k, v in b["sched"].items() if k != "lr_lambdas"}
        assert sa == sb


@pytest.mark.parametrize(
    "sched,data,start,k",
    [
        ("onecycle", "loader", 0, 3),  # before the first batch (no epoch iterator yet)
        ("onecycle", "loader", 2, 2),  # mid-epoch, stays in the epoch
        ("onecycle", "loader", 3, 6),  # crosses an epoch end (validation, shuffled val loader)
        ("epoch", "loader", 1, 11),  # crosses two epoch ends with a per-epoch scheduler
        ("onecycle", "noisy", 2, 5),  # numpy / random augmentation in the dataset
    ],
)
def test_rewind_then_replay_is_bit_for_bit(sched, data, start, k):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    runner = _runner(sched, data)
    losses = _record(runner)
    runner.run(steps=start)
    at_ck = _state(runner)
    ck = runner.checkpoint("before")
    assert isinstance(ck, Checkpoint) and ck.step == start and ck.label == "before"
    runner.run(steps=k)
    first = losses[start:]
    first_state = _state(runner)
    first_history = runner.history.loss.copy(), runner.history.update_norm.copy()
    first_epochs = [(e.epoch, e.step, e.train_loss, e.val_loss) for e in runner.history.epochs]
    assert len(first) == k

    runner.rewind(ck)
    _assert_same_state(at_ck, _state(runner))
    assert len(runner.history) == start
    assert all(e.step <= start for e in runner.history.epochs)
    runner.run(steps=k)
    second = losses[start + k :]
    assert second == first
    _assert_same_state(first_state, _state(runner))
    np.testing.assert_array_equal(runner.history.loss, first_history[0])
    np.testing.assert_array_equal(runner.history.update_norm, first_history[1])
    assert [(e.epoch, e.step, e.train_loss, e.val_loss) for e in runner.history.epochs] == first_epochs


def test_rewind_to_the_end_of_an_epoch_does_not_duplicate_the_epoch_record():
    runner = make_runner(make_mlp(), make_batches(4), val_data=make_batches(1, seed=2))
    runner.run(steps=4)  # last batch done; the epoch end happens at the next FETCH
    ck = runner.checkpoint()
    runner.run(steps=1)
    assert len(runner.history.epochs) == 1
    runner.rewind(ck)
    runner.run(steps=1)
    assert len(runner.history.epochs) == 1
    assert len(runner.history.val_loss) == 1


def _partial_runner():
    """Fine-tune setup: layer 0 frozen and not in the optimizer; a per-step LambdaLR."""
    model = make_mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
    return make_runner(model, make_batches(6), optimizer=opt, scheduler=sched, scheduler_interval="step")


def test_rewind_restores_requires_grad_groups_and_scheduler_after_unfreeze():
    runner = _partial_runner()
    model, opt, sched = runner.model, runner.optimizer, runner.scheduler
    losses = _record(runner)
    runner.run(steps=1)
    ck = runner.checkpoint()
    before = _state(runner)
    runner.unfreeze("0", lr=0.01)
    runner.freeze("2.bias")
    runner.set_lr(0.5)
    runner.run(steps=2)
    assert len(opt.param_groups) == 2 and len(sched.base_lrs) == 2

    runner.rewind(ck)
    assert len(opt.param_groups) == 1 and len(sched.base_lrs) == 1 and len(sched.lr_lambdas) == 1
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert runner.param_group_of() == {"0.weight": None, "0.bias": None, "2.weight": 0, "2.bias": 0}
    _assert_same_state(before, _state(runner))
    # Training after the rewind is exactly the training that never saw those controls.
    runner.run(steps=2)
    twin = _partial_runner()
    twin_losses = _record(twin)
    twin.run(steps=3)
    assert losses[-2:] == twin_losses[1:]
    assert weights_equal(snapshot(twin.model), snapshot(model))
    assert twin.lrs == runner.lrs


def test_checkpoint_mid_step_raises_and_rewind_discards_a_partial_step():
    runner = _runner()
    runner.run(steps=1)
    ck = runner.checkpoint()
    state = _state(runner)
    for _ in range(5):
        runner.step_stage()
    assert runner.stage is Stage.BACKWARD
    with pytest.raises(RuntimeError, match="step boundary"):
        runner.checkpoint()
    runner.rewind(ck)
    assert runner.stage is Stage.FETCH and runner.records == {}
    _assert_same_state(state, _state(runner))


def test_checkpoints_are_bounded_and_evicted_handles_still_work():
    runner = make_runner(make_mlp(), make_batches(8), max_checkpoints=3)
    handles, weights = [], []
    for _ in range(5):
        weights.append(snapshot(runner.model))
        handles.append(runner.checkpoint())
        runner.step()
    assert len(runner.checkpoints) == 3
    assert list(runner.checkpoints) == handles[2:]
    runner.rewind(handles[0])  # evicted from the deque, still a complete handle
    assert runner.global_step == 0 and weights_equal(weights[0], snapshot(runner.model))
    runner.rewind()  # None: the newest checkpoint
    assert runner.global_step == 4 and weights_equal(weights[4], snapshot(runner.model))


def test_checkpoint_holds_copies_not_aliases():
    runner = make_runner()
    ck = runner.checkpoint()
    saved = {k: v.clone() for k, v in ck.model_state.items()}
    runner.run(steps=3)
    assert all(torch.equal(saved[k], ck.model_state[k]) for k in saved)
    for k, v in runner.model.state_dict().items():
        assert v.data_ptr() != ck.model_state[k].data_ptr()


def test_rewind_restores_batch_norm_buffers_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    runner = make_runner(model, make_batches(6))
    runner.run(steps=1)
    ck = runner.checkpoint()
    state = snapshot(model)
    runner.freeze("1", bn_eval=True)
    runner.run(steps=2)
    model.eval()
    runner.rewind(ck)
    assert weights_equal(state, snapshot(model))  # includes running_mean / running_var / num_batches
    assert model.training and model[1].training
    assert model[1].weight.requires_grad


def test_checkpoint_and_rewind_are_control_events():
    runner = make_runner()
    seen = []
    runner.events.on(Event.CONTROL, seen.append)
    runner.run(steps=2)
    ck = runner.checkpoint("mine")
    runner.run(steps=1)
    runner.rewind(ck)
    assert [c.kind for c in seen] == ["checkpoint", "rewind"]
    assert seen[0].detail == {"id": ck.id, "label": "mine"} and seen[0].step == 2
    assert seen[1].step == 2
    assert [c.kind for c in runner.history.controls] == ["checkpoint", "rewind"]


def test_rewind_refuses_a_checkpoint_of_another_model():
    ck = make_runner(nn.Sequential(nn.Linear(8, 3))).checkpoint()
    with pytest.raises(ValueError, match="different model"):
        make_runner().rewind(ck)


def test_rewind_then_replay_gives_the_same_activation_history():
    runner = make_runner(make_mlp(), make_batches(6))  # activations measured at steps 0, 1, 2
    runner.run(steps=2)
    ck = runner.checkpoint()
    runner.run(steps=2)
    first = {k: v.values() for k, v in runner.history.activations.items()}
    runner.rewind(ck)
    runner.run(steps=2)
    again = {k: v.values() for k, v in runner.history.activations.items()}
    assert first.keys() == again.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])


# ---------------------------------------------------------------------- data sources with their own RNG
def _own_generator_runner(how: str):
    """Shuffling by a generator of the loader's own (``generator=``), of the sampler, or of both loaders."""
    model = make_mlp(dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = make_data(40)
    ds = TensorDataset(x, y)
    if how == "loader":
        train = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    else:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(1))
        train = DataLoader(ds, batch_size=8, sampler=sampler)
    vx, vy = make_data(20, seed=3)
    val = DataLoader(
        TensorDataset(vx, vy), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    return make_runner(model, train, optimizer=opt, val_data=val)


@pytest.mark.parametrize("how", ["loader", "sampler"])
@pytest.mark.parametrize("start,k", [(0, 3), (2, 2), (3, 9), (5, 6)])
def test_rewind_is_bit_for_bit_when_the_loader_shuffles_with_its_own_generator(how, start, k):
    torch.manual_seed(0)
    runner = _own_generator_runner(how)
    losses = _record(runner)
    runner.run(steps=start)
    ck = runner.checkpoint()
    runner.run(steps=k)
    first, first_state = losses[start:], _state(runner)
    first_epochs = [(e.epoch, e.step, e.train_loss, e.val_loss) for e in runner.history.epochs]
    runner.rewind(ck)
    runner.run(steps=k)
    assert losses[start + k :] == first
    _assert_same_state(first_state, _state(runner))
    assert [(e.epoch, e.step, e.train_loss, e.val_loss) for e in runner.history.epochs] == first_epochs


def test_checkpoint_and_rewind_refuse_a_one_shot_data_source():
    runner = make_runner(make_mlp(), iter(make_batches(4)))
    runner.run(steps=1)
    with pytest.raises(ValueError, match="one-shot"):
        runner.checkpoint()
    with pytest.raises(ValueError, match="one-shot"):
        runner.rewind()
    assert runner.run(steps=1).stopped_by == "steps"  # the refusal changed nothing


# ---------------------------------------------------------------------- findings of an abandoned timeline
def test_findings_of_the_abandoned_timeline_are_dropped_by_rewind():
    runner = make_runner(make_mlp(), make_batches(8), lr=1e6)
    ck = runner.checkpoint()
    result = runner.run()
    assert result.stopped_by in ("finding", "error") and "non-finite-loss" in [
        f.code for f in runner.findings
    ]
    runner.rewind(ck)
    # The abandoned timeline's findings stay listed, resolved by the rewind; none is active.
    assert not [f for f in runner.active_findings if f.severity == "error"], runner.findings
    assert all(f.resolved_by == "rewind" for f in runner.resolved_findings)
    runner.set_lr(0.05)
    assert runner.run().stopped_by == "epochs"
    codes = [f.code for f in runner.active_findings]
    assert "non-finite-loss" not in codes
    assert not [f for f in runner.active_findings if f.severity == "error"], runner.findings


def test_findings_seen_before_the_checkpoint_stay_as_they_were():
    model = make_mlp()  # layer 0 trainable but not in the optimizer: a setup finding from the start
    runner = make_runner(model, make_batches(8), optimizer=torch.optim.SGD(model[2].parameters(), lr=1e6))
    runner.run(steps=1)
    before = {f.key: (f.first_step, f.message, f.severity) for f in runner.findings}
    assert ("param-not-in-optimizer", ("0.weight", "0.bias")) in before
    ck = runner.checkpoint()
    runner.run()  # the loss goes NaN: errors and trend findings of a timeline that rewind abandons
    assert len(runner.findings) > len(before)
    runner.rewind(ck)
    assert {f.key: (f.first_step, f.message, f.severity) for f in runner.active_findings} == before


# ---------------------------------------------------------------------- one optimizer snapshot
def test_optimizer_snapshot_restores_state_groups_and_identities():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), weight_decay=1e-3)
    x, y = make_batches(1)[0]
    for _ in range(2):
        train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    snap = snapshot_optimizer(opt)
    groups = list(opt.param_groups)
    state = copy.deepcopy(opt.state_dict())
    weights = snapshot(model)
    train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    opt.param_groups[0]["lr"].fill_(0.5)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1})
    restore_optimizer(opt, snap)
    assert len(opt.param_groups) == 1 and opt.param_groups[0] is groups[0]  # dict identity kept
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    now = opt.state_dict()
    for k, st in state["state"].items():
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(now["state"][k][key])), key
    # The snapshot is a copy and can be restored again after more steps.
    model.load_state_dict(weights)
    train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    restore_optimizer(opt, snap)
    for k, st in state["state"].items():
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt.state_dict()["state"][k][key])), key


def test_rewind_restores_the_freeze_bn_stats_option():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    runner = make_runner(model)
    ck = runner.checkpoint()
    runner.set_bn_eval(True)  # no names: every batch-norm layer, and the option later freezes follow
    assert runner.freeze_bn_stats is True
    runner.rewind(ck)
    assert runner.freeze_bn_stats is False and runner.bn_eval == ()
