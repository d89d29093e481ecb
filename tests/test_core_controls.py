"""Controls: freeze / unfreeze / set_lr keep the optimizer and scheduler consistent, and do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    make_batches,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn

from tlwidgets import ControlChange, Event, Stage

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER1 = ["layer1.0.weight", "layer1.0.bias"]


class Net(nn.Module):
    """``layer1`` and ``layer10`` (a name prefix trap), a batch-norm layer and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.layer10 = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.layer10(self.layer1(x)))))


def _opt(kind: str, params, lr: float = 0.1):
    if kind == "sgd-momentum-wd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.1)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    return torch.optim.SGD(params, lr=lr)


def _runner(opt_kind: str = "sgd", n_batches: int = 6, **kwargs):
    model = Net()
    opt = _opt(opt_kind, model.parameters())
    return make_runner(model, make_batches(n_batches), optimizer=opt, **kwargs)


def _controls(runner) -> list[ControlChange]:
    seen: list[ControlChange] = []
    runner.events.on(Event.CONTROL, seen.append)
    return seen


# ---------------------------------------------------------------------- freeze
def test_freeze_matches_a_dotted_subtree_not_a_name_prefix():
    runner = _runner()
    runner.step()
    assert all(p.grad is not None for p in runner.model.parameters())
    frozen = runner.freeze("layer1")
    assert frozen == LAYER1
    assert runner.frozen() == LAYER1
    for name, p in runner.model.named_parameters():
        assert p.requires_grad is (name not in LAYER1), name
        assert (p.grad is None) is (name in LAYER1), name
    # A parameter name and a nested module name work too.
    assert runner.freeze("layer10.bias") == ["layer10.bias"]
    assert runner.freeze("layer1.0") == LAYER1
    assert runner.frozen() == [*LAYER1, "layer10.bias"]


@pytest.mark.parametrize("opt_kind", ["sgd-momentum-wd", "adamw"])
@pytest.mark.parametrize("mode", ["run", "step_stage"])
def test_frozen_weights_never_move(opt_kind, mode):
    runner = _runner(opt_kind)
    runner.run(steps=3)  # momentum / Adam moments exist for every parameter now
    runner.freeze("layer1")
    before = snapshot(runner.model)
    if mode == "run":
        assert runner.run(steps=5).stopped_by == "steps"
    else:
        while runner.global_step < 8:
            runner.step_stage()
    after = snapshot(runner.model)
    assert weights_equal(before, after, LAYER1)
    assert not weights_equal(before, after, ["layer10.weight", "head.weight"])
    step = runner.records[Stage.STEP].data
    assert step["frozen_changed"] == []
    assert not set(LAYER1) & set(step["changed"])
    idx = [runner.param_names.index(n) for n in LAYER1]
    assert (runner.history.update_norm[-5:, idx] == 0).all()
    assert np.isnan(runner.history.grad_norm[-5:, idx]).all()
    assert "frozen-param-changed" not in [f.code for f in runner.findings]


def test_freeze_between_backward_and_step_holds_those_weights():
    runner = _runner("sgd-momentum-wd")
    runner.run(steps=2)
    while runner.stage is not Stage.STEP:
        runner.step_stage()
    before = snapshot(runner.model)
    runner.freeze("layer1")
    rec = runner.step_stage()
    assert rec.ok and rec.data["frozen_changed"] == []
    assert weights_equal(before, snapshot(runner.model), LAYER1)


def test_freeze_with_bn_eval_keeps_running_statistics():
    runner = _runner()
    runner.run(steps=2)
    runner.freeze("bn", bn_eval=True)
    assert runner.model.bn.training is False and runner.model.training is True
    mean, var = runner.model.bn.running_mean.clone(), runner.model.bn.running_var.clone()
    runner.model.train()  # a user call between steps: the runner keeps the frozen BN in eval
    runner.run(steps=3)
    assert torch.equal(mean, runner.model.bn.running_mean) and torch.equal(var, runner.model.bn.running_var)
    assert "bn" in runner.records[Stage.FORWARD].data["eval_modules"]
    runner.unfreeze("bn")
    assert runner.model.bn.training is True
    runner.run(steps=1)
    assert not torch.equal(mean, runner.model.bn.running_mean)


def test_freeze_without_bn_eval_leaves_bn_training():
    runner = _runner()
    runner.freeze("bn")
    mean = runner.model.bn.running_mean.clone()
    runner.run(steps=1)
    assert runner.model.bn.training is True
    assert not torch.equal(mean, runner.model.bn.running_mean)


def test_freeze_bn_stats_runner_default():
    runner = _runner(freeze_bn_stats=True)
    runner.freeze("bn")
    assert runner.model.bn.training is False
    runner.freeze("layer10")  # not a BN layer: nothing else changes mode
    assert runner.model.layer10.training is True


# ---------------------------------------------------------------------- unfreeze
def _partial_setup(sched_kind: str | None, interval: str = "step"):
    """Head-only fine-tune: layer1 frozen and not in the optimizer."""
    model = Net()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = {
        None: lambda: None,
        "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.8**t),
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    }[sched_kind]()
    runner = make_runner(model, make_batches(6), optimizer=opt, scheduler=sched, scheduler_interval=interval)
    return runner, opt, sched


@pytest.mark.parametrize("sched_kind", ["lambda", "step", "onecycle", "cosine"])
def test_unfreeze_adds_a_group_and_extends_the_scheduler(sched_kind):
    runner, opt, sched = _partial_setup(sched_kind)
    assert runner.param_group_of()["layer1.0.weight"] is None
    runner.run(steps=3)
    seen = _controls(runner)
    names = runner.unfreeze("layer1", lr=0.01)
    assert names == LAYER1
    assert len(opt.param_groups) == 2
    layer1 = list(runner.model.layer1.parameters())
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in layer1]
    assert all(p.requires_grad for p in layer1)
    assert None not in runner.param_group_of().values()
    assert len(sched.base_lrs) == 2
    assert seen[-1].kind == "unfreeze" and seen[-1].detail["new_group"] == 1
    ratio0 = opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"]
    if sched_kind != "onecycle":  # the new group's base LR is 0.01 against 0.1: a tenth at every step
        assert ratio0 == pytest.approx(0.1)
    before = snapshot(runner.model)
    ratios = []
    for _ in range(6):
        assert runner.run(steps=1).stopped_by == "steps"
        ratios.append(opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"])
    np.testing.assert_allclose(ratios, ratio0, rtol=1e-9)
    assert not weights_equal(before, snapshot(runner.model), LAYER1)
    assert runner.history.lr.shape[1] == 2


def test_unfreeze_default_lr_is_the_first_groups_base_and_no_new_group_when_held():
    runner, opt, _ = _partial_setup(None)
    runner.unfreeze("layer1")
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)
    runner.freeze("layer1")
    runner.unfreeze("layer1")  # already in the optimizer: no second group
    assert len(opt.param_groups) == 2


def test_param_not_in_optimizer_finding_appears_and_goes_away():
    model = Net()  # every parameter trainable, but the optimizer only holds the head (the classic bug)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    runner = make_runner(model, make_batches(2), optimizer=opt)
    found = [f for f in runner.findings if f.code == "param-not-in-optimizer"]
    assert len(found) == 1 and found[0].severity == "error"
    assert set(found[0].params) == {n for n, _ in model.named_parameters() if not n.startswith("head")}
    runner.unfreeze("")  # the whole model: adds what the optimizer lacks
    assert None not in runner.param_group_of().values()
    assert "param-not-in-optimizer" not in [f.code for f in runner.active_findings]
    (gone,) = [f for f in runner.resolved_findings if f.code == "param-not-in-optimizer"]
    assert gone.resolved_by == "audit"  # kept in the story of the run, resolved


# ---------------------------------------------------------------------- set_lr
def _lr_trace(runner, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        runner.run(steps=1)
        out.append(float(runner.optimizer.param_groups[0]["lr"]))
    return out


@pytest.mark.parametrize("sched_kind", ["lambda", "step", "onecycle", "cosine"])
def test_set_lr_sets_the_effective_lr_and_keeps_the_schedule_shape(sched_kind):
    reference, _, _ = _partial_setup(sched_kind)
    changed, _, _ = _partial_setup(sched_kind)
    reference.run(steps=3)
    changed.run(steps=3)
    old = changed.lrs[0]
    seen = _controls(changed)
    changed.set_lr(0.05)
    assert changed.lrs == [0.05] and changed.optimizer.param_groups[0]["lr"] == 0.05
    assert seen[-1].kind == "set_lr" and seen[-1].detail == {"group": 0, "lr": 0.05, "old": old}
    # 10 more steps: the cosine schedule passes its minimum (T_max=10) and turns back up.
    ref = np.array(_lr_trace(reference, 10))
    new = np.array(_lr_trace(changed, 10))
    assert len(set(np.round(ref, 12))) > 1  # the schedule really moves the LR
    np.testing.assert_allclose(new, ref * (0.05 / old), rtol=1e-9, atol=1e-15)


def test_set_lr_without_scheduler_and_on_a_later_group():
    runner, _, _ = _partial_setup(None)
    runner.unfreeze("layer1", lr=0.01)
    runner.set_lr(0.003, group=1)
    runner.set_lr(0.2, group=-2)
    assert runner.lrs == [0.2, 0.003]
    runner.run(steps=2)
    assert runner.lrs == [0.2, 0.003]
    np.testing.assert_allclose(runner.history.lr[-1], [0.2, 0.003])


def test_set_lr_zero_sticks_under_a_lambda_schedule():
    runner, _, _ = _partial_setup("lambda")
    runner.run(steps=2)
    runner.set_lr(0.0)
    runner.run(steps=2)
    assert runner.lrs == [0.0]


# ---------------------------------------------------------------------- invalid input
def test_invalid_control_input_raises_and_changes_nothing():
    runner = _runner()
    with pytest.raises(KeyError, match="nope"):
        runner.freeze("nope")
    with pytest.raises(KeyError):
        runner.freeze("layer1", "layer1x")  # one bad name: nothing is frozen
    assert runner.frozen() == []
    with pytest.raises(KeyError):
        runner.freeze("layer")  # a prefix of a name is not a dotted path
    with pytest.raises(ValueError):
        runner.freeze()
    with pytest.raises(TypeError):
        runner.freeze(3)
    with pytest.raises(KeyError):
        runner.unfreeze("nope")
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            runner.set_lr(bad)
    with pytest.raises(TypeError):
        runner.set_lr("0.1")
    with pytest.raises(ValueError):
        runner.unfreeze("layer1", lr=-1.0)
    for group in (1, 5, -2):
        with pytest.raises(IndexError):
            runner.set_lr(0.1, group=group)
    assert runner.lrs == [0.1] and runner.history.controls == []


# ---------------------------------------------------------------------- controls during a stage
class CallDuringForward(nn.Module):
    """Calls ``action()`` once from inside the model's forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.action = None
        self.seen: list = []

    def forward(self, x):
        if self.action is not None:
            self.seen.append(self.action())
            self.action = None
        return self.net(x)


def test_set_lr_from_inside_a_stage_applies_at_the_next_boundary():
    model = CallDuringForward(Net())
    runner = make_runner(model, make_batches(4))
    order: list[str] = []
    runner.events.on(Event.STAGE, lambda r: order.append(f"stage:{r.stage.value}"))
    runner.events.on(Event.CONTROL, lambda c: order.append(f"control:{c.kind}"))
    model.action = lambda: (runner.set_lr(0.5), runner.lrs[0])[1]
    for _ in range(4):
        runner.step_stage()
    assert model.seen == [0.1]  # still the old LR while the stage ran
    assert runner.lrs == [0.5]
    assert order[-2:] == ["stage:forward", "control:set_lr"]
    change = runner.history.controls[-1]
    assert change.kind == "set_lr" and change.detail["lr"] == 0.5 and change.step == 0
    assert change.label() == "set_lr 0.5"
    runner.step_stage()
    runner.step_stage()
    assert runner.step_stage().data["lr"] == [0.5]  # the step used the new LR


def test_freeze_from_inside_forward_during_run_holds_the_weights_of_that_step():
    model = CallDuringForward(Net())
    runner = make_runner(model, make_batches(4), momentum=0.9)
    runner.run(steps=2)
    before = snapshot(model)
    model.action = lambda: runner.freeze("net.layer1")
    assert runner.run(steps=2).stopped_by == "steps"
    assert model.seen == [["net.layer1.0.weight", "net.layer1.0.bias"]]
    assert weights_equal(before, snapshot(model), ["net.layer1.0.weight", "net.layer1.0.bias"])
    assert runner.history.controls[-1].kind == "freeze"
    assert runner.history.controls[-1].label() == "freeze net.layer1"


def test_every_control_is_an_event_and_a_history_marker():
    runner, _, _ = _partial_setup(None)
    seen = _controls(runner)
    runner.run(steps=1)
    runner.freeze("head")
    runner.unfreeze("head", "layer1", lr=0.02)
    runner.set_lr(0.3)
    kinds = [c.kind for c in seen]
    assert kinds == ["freeze", "unfreeze", "set_lr"]
    assert [c.kind for c in runner.history.controls] == kinds
    assert all(c.step == 1 for c in seen)
    assert seen[0].detail["params"] == ["head.weight", "head.bias"]


# ---------------------------------------------------------------------- set_lr inputs (issue #11)
@pytest.mark.parametrize(
    "lr",
    [
        np.float32(0.01),
        np.float64(0.01),
        np.int64(0),
        np.array(0.01),
        torch.tensor(0.01),
        torch.tensor(0.01, dtype=torch.float64),
        torch.tensor(0),
    ],
    ids=["np.float32", "np.float64", "np.int64", "np.array-0d", "tensor-f32", "tensor-f64", "tensor-int"],
)
def test_set_lr_accepts_real_number_scalars(lr):
    runner = _runner()
    seen = _controls(runner)
    runner.set_lr(lr)
    g = runner.optimizer.param_groups[0]["lr"]
    assert type(g) is float and g == float(lr)  # stored as a plain float, never the caller's object
    assert type(seen[-1].detail["lr"]) is float
    runner.unfreeze("layer1", lr=lr)  # the same conversion for unfreeze(lr=...)
    assert runner.lrs == [float(lr)]
    runner.run(steps=1)


@pytest.mark.parametrize(
    "bad",
    [
        True,
        np.bool_(False),
        torch.tensor(True),
        -0.1,
        np.float32(-1),
        torch.tensor(-1.0),
        float("nan"),
        np.float32("nan"),
        torch.tensor(float("inf")),
        float("-inf"),
    ],
    ids=[
        "True",
        "np.bool_",
        "tensor-bool",
        "negative",
        "np-negative",
        "tensor-negative",
        "nan",
        "np-nan",
        "tensor-inf",
        "-inf",
    ],
)
def test_set_lr_rejects_bool_nan_inf_and_negative_values(bad):
    runner = _runner()
    with pytest.raises(ValueError, match="lr must be"):
        runner.set_lr(bad)
    with pytest.raises(ValueError, match="lr must be"):
        runner.unfreeze("layer1", lr=bad)
    assert runner.lrs == [0.1] and runner.history.controls == []


@pytest.mark.parametrize(
    "bad",
    ["0.1", None, [0.1], torch.tensor([0.1, 0.2]), np.array([0.1]), 1j],
    ids=["str", "None", "list", "tensor-1d", "array-1d", "complex"],
)
def test_set_lr_rejects_what_is_not_a_real_number_with_type_error(bad):
    runner = _runner()
    with pytest.raises(TypeError, match="lr must be a real number"):
        runner.set_lr(bad)
    assert runner.lrs == [0.1] and runner.history.controls == []


@pytest.mark.parametrize("group", ["1", "0", 1.0, 0.0, None, True], ids=repr)
def test_set_lr_group_of_the_wrong_type_is_a_type_error(group):
    runner, _, _ = _partial_setup(None)  # two groups: 0 and 1
    with pytest.raises(TypeError, match="group must be an int"):
        runner.set_lr(0.1, group)
    assert runner.history.controls == []


def test_set_lr_group_accepts_numpy_ints_and_lists_valid_groups_when_out_of_range():
    model = Net()
    opt = torch.optim.SGD(
        [
            {"params": model.layer1.parameters()},
            {"params": [*model.layer10.parameters(), *model.bn.parameters(), *model.head.parameters()]},
        ],
        lr=0.1,
    )
    runner = make_runner(model, make_batches(4), optimizer=opt)
    runner.set_lr(0.02, np.int64(1))
    runner.set_lr(0.03, group=np.int32(-2))
    assert runner.lrs == [0.03, 0.02]
    assert [c.detail["group"] for c in runner.history.controls] == [1, 0]
    assert all(type(c.detail["group"]) is int for c in runner.history.controls)
    for group in (2, -3, np.int64(7)):
        with pytest.raises(IndexError, match=r"valid groups are 0, 1 \(or -2, -1 from the end\)"):
            runner.set_lr(0.1, group=group)
    assert runner.lrs == [0.03, 0.02]


# ---------------------------------------------------------------------- batch-norm eval mode as a control
def test_set_bn_eval_is_a_recorded_control_that_holds_and_releases_frozen_bn():
    runner = _runner()
    runner.run(steps=1)
    runner.freeze("bn")  # option off: the layer still updates its statistics
    assert runner.bn_eval == () and runner.model.bn.training
    seen = _controls(runner)
    assert runner.set_bn_eval(True) == ["bn"]
    assert runner.freeze_bn_stats is True  # without names: the option for later freezes too
    assert runner.bn_eval == ("bn",) and runner.model.bn.training is False
    change = seen[-1]
    assert change.kind == "bn_eval" and change.step == 1
    assert change.detail == {"on": True, "modules": ["bn"]}
    assert runner.history.controls[-1] is change
    mean = runner.model.bn.running_mean.clone()
    runner.run(steps=2)
    assert torch.equal(mean, runner.model.bn.running_mean)
    assert runner.set_bn_eval(False) == ["bn"]
    assert runner.freeze_bn_stats is False and runner.bn_eval == () and runner.model.bn.training
    assert [c.kind for c in seen] == ["bn_eval", "bn_eval"] and seen[-1].detail["on"] is False
    runner.run(steps=1)
    assert not torch.equal(mean, runner.model.bn.running_mean)


def test_set_bn_eval_with_names_touches_only_those_and_keeps_the_option():
    runner = _runner()
    runner.freeze("bn", "head")
    seen = _controls(runner)
    assert runner.set_bn_eval(True, "head") == []  # no batch-norm layer there: recorded, nothing held
    assert runner.bn_eval == () and runner.freeze_bn_stats is False
    assert runner.set_bn_eval(True, "bn") == ["bn"]
    assert runner.freeze_bn_stats is False and runner.bn_eval == ("bn",)
    assert seen[-1].detail == {"on": True, "modules": ["bn"], "names": ["bn"]}
    assert seen[-1].label() == "bn_eval bn"
    runner.unfreeze("bn")  # unfreezing releases the layer, as before
    assert runner.bn_eval == () and runner.model.bn.training
    assert runner.set_bn_eval(True, "bn") == []  # a trainable layer is not held
    with pytest.raises(KeyError):
        runner.set_bn_eval(True, "nope")
    with pytest.raises(TypeError, match="on must be True or False"):
        runner.set_bn_eval("yes")
    with pytest.raises(AttributeError):
        runner.bn_eval = ("bn",)


def test_set_bn_eval_is_undone_by_rewind():
    runner = _runner()
    runner.freeze("bn")
    ck = runner.checkpoint()
    runner.set_bn_eval(True)
    runner.run(steps=2)
    runner.rewind(ck)
    assert runner.bn_eval == () and runner.model.bn.training


def test_set_bn_eval_on_a_watcher():
    import tlwidgets as tlw

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss()) as w:
        w.freeze("bn")
        seen = _controls(w)
        assert w.set_bn_eval(True) == ["bn"] and not model.bn.training and w.bn_eval == ("bn",)
        assert w.set_bn_eval(False) == ["bn"] and model.bn.training and w.bn_eval == ()
        assert [c.kind for c in seen] == ["bn_eval", "bn_eval"]
