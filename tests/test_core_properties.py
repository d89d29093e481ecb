"""Property tests: random sequences of controls and steps keep the runner's invariants."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    make_loader,
    make_mlp,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlwidgets import Event, Stage

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NAMES = ["0", "2", "0.weight", "0.bias", "2.weight", "2.bias"]

lrs = st.sampled_from([0.0, 1e-3, 0.01, 0.05, 0.2])
freeze = st.tuples(st.just("freeze"), st.sampled_from(NAMES))
unfreeze = st.tuples(st.just("unfreeze"), st.sampled_from(NAMES), st.one_of(st.none(), lrs))
set_lr = st.tuples(st.just("set_lr"), lrs, st.integers(0, 3))
step = st.tuples(st.just("step"))
training_actions = st.lists(st.one_of(freeze, unfreeze, set_lr, step, step), min_size=1, max_size=10)
all_actions = st.lists(
    st.one_of(
        freeze, unfreeze, set_lr, step, step, st.tuples(st.just("checkpoint")), st.tuples(st.just("rewind"))
    ),
    min_size=1,
    max_size=14,
)


def _runner():
    """Fine-tune setup: layer 0 frozen and outside the optimizer; dropout; shuffled data; per-step schedule."""
    torch.manual_seed(0)
    model = make_mlp(dropout=0.2)
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[3].parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.95**t)
    loader = make_loader(n=24, batch_size=8, shuffle=True)
    return make_runner(model, loader, optimizer=opt, scheduler=sched, scheduler_interval="step")


def _name(name: str) -> str:
    return name.replace("2", "3", 1) if name.startswith("2") else name  # dropout shifts the head to 3


def _apply(runner, action) -> None:
    kind = action[0]
    if kind == "freeze":
        runner.freeze(_name(action[1]))
    elif kind == "unfreeze":
        runner.unfreeze(_name(action[1]), lr=action[2])
    elif kind == "set_lr":
        runner.set_lr(action[1], group=action[2] % len(runner.optimizer.param_groups))
    elif kind == "step":
        runner.step()


def _check_consistency(runner) -> None:
    groups = runner.optimizer.param_groups
    trainable = [n for n, p in runner.named_params if p.requires_grad]
    where = runner.param_group_of()
    assert all(where[n] is not None for n in trainable), "a trainable parameter is outside the optimizer"
    assert len(runner.scheduler.base_lrs) == len(groups)
    assert len(runner.scheduler.lr_lambdas) == len(groups)
    held = [id(p) for g in groups for p in g["params"]]
    assert len(held) == len(set(held)), "a parameter is in two groups"
    assert all(float(g["lr"]) >= 0 for g in groups)


@SETTINGS
@given(actions=all_actions)
def test_random_controls_keep_the_invariants(actions):
    runner = _runner()
    runner.step()
    handles = []
    for action in actions:
        kind = action[0]
        if kind == "step":
            frozen = {n: p.detach().clone() for n, p in runner.named_params if not p.requires_grad}
            runner.step()
            for n, before in frozen.items():
                assert torch.equal(before, dict(runner.named_params)[n]), f"frozen {n} moved"
            rec = runner.records.get(Stage.STEP)
            if rec is not None and rec.ok:
                assert rec.data["frozen_changed"] == []
        elif kind == "checkpoint":
            if runner.stage is Stage.FETCH:
                handles.append(
                    (
                        runner.checkpoint(),
                        snapshot(runner.model),
                        [p.requires_grad for _, p in runner.named_params],
                    )
                )
            else:
                with pytest.raises(RuntimeError):
                    runner.checkpoint()
        elif kind == "rewind":
            if not handles:
                continue
            ck, weights, grads = handles[-1]
            runner.rewind(ck)
            assert weights_equal(weights, snapshot(runner.model))
            assert [p.requires_grad for _, p in runner.named_params] == grads
            assert runner.stage is Stage.FETCH and runner.global_step == ck.step
        else:
            _apply(runner, action)
        _check_consistency(runner)
    assert "frozen-param-changed" not in [f.code for f in runner.findings]


@SETTINGS
@given(actions=training_actions)
def test_rewind_then_replay_equals_the_original_run(actions):
    runner = _runner()
    runner.step()
    losses: list[float] = []
    runner.events.on(Event.STEP, lambda s: losses.append(s.loss))
    ck = runner.checkpoint()
    for action in actions:
        _apply(runner, action)
    first = list(losses)
    first_weights = snapshot(runner.model)
    first_lrs = runner.lrs
    first_grads = [p.requires_grad for _, p in runner.named_params]
    first_pos = (runner.global_step, runner.epoch, runner.batch_index, runner.stage)
    first_rng = torch.get_rng_state()

    runner.rewind(ck)
    losses.clear()
    for action in actions:
        _apply(runner, action)
    assert losses == first
    assert weights_equal(first_weights, snapshot(runner.model))
    assert runner.lrs == first_lrs
    assert [p.requires_grad for _, p in runner.named_params] == first_grads
    assert (runner.global_step, runner.epoch, runner.batch_index, runner.stage) == first_pos
    assert torch.equal(first_rng, torch.get_rng_state())
