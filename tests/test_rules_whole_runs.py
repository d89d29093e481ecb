"""Rules keep running for the whole run (DESIGN section 6, "Whole runs").

Every trend code is injected twice into runs of 600+ steps:

* **late**: the run is healthy for 300 steps (past the default schedule's dense phase of 200
  steps), then the bug starts, with the default schedule (``measure_every=20, dense_steps=200``);
* **sparse from the start**: the bug is there from step 0 and ``dense_steps=0``, so only every
  20th step is measured from the first step on.

Both must name the bug. Before the trend rules were scheduled from their last run, the engine
tested ``step % every == 0`` on the steps after measured ones (``20k + 1``), which never held past
the dense phase: none of these runs found anything after step 200.

The bugs are injected by the user's own code (a forward pre-hook that changes the optimizer, a
weight, the loss scale or the labels at a given training step), never through the runner's
controls, except where the bug *is* a control (an LR set far too low).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_rules_support import classification, find, loader, mlp, regression
from torch import nn

import tlwidgets as tlw
from tlwidgets.diagnostics.rules import trend

pytestmark = pytest.mark.slow

LATE = 300
STEPS = 640
SCHEDULES = {
    "late": {"onset": LATE, "schedule": {}},
    "sparse-from-start": {"onset": 0, "schedule": {"dense_steps": 0}},
}


class AtStep:
    """Calls ``action()`` once, before the training forward pass of step ``onset`` (the user's code)."""

    def __init__(self, model: nn.Module, onset: int, action: Callable[[], None]) -> None:
        self.count = 0
        self.onset = onset
        self.action = action
        self.fired_at: int | None = None
        model.register_forward_pre_hook(self._pre)

    def _pre(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # validation passes are not training steps
        if self.count == self.onset:
            self.action()
            self.fired_at = self.count
        self.count += 1


@dataclasses.dataclass
class Case:
    runner: tlw.Runner
    switch: AtStep | None = None


def _classifier(schedule: dict, *, sizes=(20, 32, 4), lr=0.05, momentum=0.9, **kw) -> Case:
    model = mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x, y = classification(n=1024)
    return Case(tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(x, y), **schedule, **kw))


def _found(case: Case, code: str) -> list[Any]:
    got = find(case.runner, code)
    assert got, f"{code} not found; findings: {[(f.code, f.first_step) for f in case.runner.findings]}"
    return got


def _onset_ok(case: Case, finding: Any, onset: int) -> None:
    """The finding is about the injected bug: raised at or after its onset."""
    if case.switch is not None:
        assert case.switch.fired_at == onset
    assert finding.first_step >= onset


# ---------------------------------------------------------------------------------------- the bugs
def lr_too_high(onset: int, schedule: dict) -> tuple[Case, str]:
    case = _classifier(schedule)
    opt = case.runner.optimizer

    def jump() -> None:  # a buggy warm restart: 60x the LR
        for g in opt.param_groups:
            g["lr"] = 3.0

    case.switch = AtStep(case.runner.model, onset, jump)
    return case, "lr-too-high"


def lr_too_low(onset: int, schedule: dict) -> tuple[Case, str]:
    case = _classifier(schedule, lr=1e-7 if onset == 0 else 0.05)
    if onset:
        case.runner.run(steps=onset)
        case.runner.set_lr(1e-7)  # a typo'd learning rate set mid-run
    return case, "lr-too-low"


def scheduler_too_fast(onset: int, schedule: dict) -> tuple[Case, str]:
    # One epoch is 16,384 / 32 = 512 steps; the LR reaches 1e-2 of its peak at `onset` (or 40).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step_size = max(onset, 40) // 2
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)
    x, y = classification(n=16_384)
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        opt,
        loader(x, y),
        scheduler=sched,
        scheduler_interval="step",
        **schedule,
    )
    return Case(r), "scheduler-too-fast"


def exploding_gradients(onset: int, schedule: dict) -> tuple[Case, str]:
    # A hand-rolled loss scaler that grows every step and never unscales (Adam hides it from the
    # weights, not from the gradients): the gradients grow by orders of magnitude.
    model = mlp()
    state = {"scale": 1.0, "growing": False}

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if state["growing"]:
            state["scale"] = min(state["scale"] * 1.1, 1e8)
        return nn.functional.cross_entropy(out, target) * state["scale"]

    x, y = classification(n=1024)
    r = tlw.Runner(model, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3), loader(x, y), **schedule)
    case = Case(r)
    case.switch = AtStep(model, onset, lambda: state.update(growing=True))
    return case, "exploding-gradients"


class Gate(nn.Module):
    """Multiplies by ``scale`` (a learnable-gate stand-in that saturates to ~0)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def vanishing_gradients(onset: int, schedule: dict) -> tuple[Case, str]:
    torch.manual_seed(0)
    gate = Gate()
    model = nn.Sequential(
        nn.Linear(20, 32),
        gate,
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 4),
    )
    x, y = classification(n=1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    case = Case(tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(x, y), **schedule))
    case.switch = AtStep(model, onset, lambda: setattr(gate, "scale", 1e-6))
    return case, "vanishing-gradients"


def dead_relu(onset: int, schedule: dict) -> tuple[Case, str]:
    case = _classifier(schedule)
    first = case.runner.model[0]

    def kill() -> None:  # e.g. a bad bias re-initialization in the user's code
        with torch.no_grad():
            first.bias.fill_(-20.0)

    case.switch = AtStep(case.runner.model, onset, kill)
    return case, "dead-relu"


def over_regularization(onset: int, schedule: dict) -> tuple[Case, str]:
    case = _classifier(schedule)
    opt = case.runner.optimizer

    def decay() -> None:  # weight_decay=1.0 where 1e-4 was meant
        for g in opt.param_groups:
            g["weight_decay"] = 1.0

    case.switch = AtStep(case.runner.model, onset, decay)
    return case, "over-regularization"


class LabelsGoBad:
    """Batches of a loader whose labels turn to noise after ``onset`` batches (a broken join)."""

    def __init__(self, data: Any, onset: int, classes: int) -> None:
        self.data, self.onset, self.classes = data, onset, classes
        self.served = 0
        self.gen = torch.Generator().manual_seed(7)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.data:
            if self.served >= self.onset:
                y = torch.randint(0, self.classes, y.shape, generator=self.gen)
            self.served += 1
            yield x, y


def loss_plateau(onset: int, schedule: dict) -> tuple[Case, str]:
    model = nn.Linear(20, 4)
    if onset == 0:  # nothing to learn from the start: the classic stuck-at-chance run
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
    x, y = classification(n=2048)
    data = LabelsGoBad(loader(x, y, batch_size=64), onset, 4)
    # Labels random from the start are also labels-decoupled, found by the data audits at the first
    # epoch end: the trend rule is what this case tests, so the audits are off.
    from tlwidgets.diagnostics.engine import RuleDiagnoser

    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.05),
        data,
        diagnoser=RuleDiagnoser(disable=["data-audits"]),
        **schedule,
    )
    return Case(r), "loss-plateau"


class ShrinksTo:
    """Epochs of ``big`` until ``onset`` batches were served, then epochs of ``small`` (a debug subset
    left in the pipeline)."""

    def __init__(self, big: Any, small: Any, onset: int) -> None:
        self.big, self.small, self.onset = big, small, onset
        self.served = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.big if self.served < self.onset else self.small:
            self.served += 1
            yield batch


def overfitting(onset: int, schedule: dict) -> tuple[Case, str]:
    # 32 noisy examples and a wide MLP: it memorizes the noise and validation loss climbs. Late: 512
    # clean examples first (no overfitting), then only the 32 noisy ones.
    x, y = regression(32)
    y = y + 0.5 * torch.randn(32, 1, generator=torch.Generator().manual_seed(3))
    xb, yb = regression(512, seed=2)
    xv, yv = regression(256, seed=1)
    model = mlp((10, 256, 256, 1))
    data = ShrinksTo(loader(xb, yb, batch_size=8), loader(x, y, batch_size=8), onset)
    r = tlw.Runner(
        model,
        nn.MSELoss(),
        torch.optim.Adam(model.parameters(), lr=3e-3),
        data,
        val_data=loader(xv, yv, shuffle=False),
        **schedule,
    )
    return Case(r), "overfitting"


BUGS = [
    lr_too_high,
    lr_too_low,
    scheduler_too_fast,
    exploding_gradients,
    vanishing_gradients,
    dead_relu,
    over_regularization,
    loss_plateau,
    overfitting,
]


def test_every_trend_code_is_covered() -> None:
    """The trend codes of DESIGN section 4 that windows of steps or epochs find, all injected here."""
    covered = set()
    for make in BUGS:
        covered.add(make.__name__.replace("_", "-"))
    rules = {c for r in trend.TREND_RULES if r.kind in ("trend", "epoch") for c in r.codes}
    assert rules - {"class-imbalance"} <= covered


@pytest.mark.parametrize("when", list(SCHEDULES))
@pytest.mark.parametrize("make", BUGS, ids=lambda f: f.__name__.replace("_", "-"))
def test_trend_bug_found_over_a_whole_run(make, when) -> None:
    onset, schedule = SCHEDULES[when]["onset"], SCHEDULES[when]["schedule"]
    case, code = make(onset, schedule)
    runner = case.runner
    runner.run(steps=STEPS - runner.global_step)
    (f, *_) = _found(case, code)
    if onset:
        _onset_ok(case, f, onset)
        # Past the dense phase: the finding did not come from the first 200 steps.
        assert f.first_step > 200
    if code == "overfitting":  # reference: validation loss really rose after its best
        val = [e.val_loss for e in runner.history.epochs if e.val_loss is not None]
        assert val[-1] > (1 + trend.OVERFIT_MARGIN) * min(val)


def test_trend_rules_run_on_every_measured_step_past_the_dense_phase() -> None:
    """Counted: each trend rule runs at least once per ``max(every, measure_every)`` steps, whole run."""
    from tlwidgets.diagnostics.engine import RuleDiagnoser

    calls: dict[str, list[int]] = {}
    base = RuleDiagnoser()
    runner_box: list[tlw.Runner] = []

    def counted(r):
        def fn(ctx):
            calls.setdefault(r.name, []).append(int(runner_box[0].global_step))
            return r.fn(ctx)

        return dataclasses.replace(r, fn=fn)

    diag = RuleDiagnoser([counted(r) if r.kind == "trend" else r for r in base.rules])
    x, y = classification(n=1024)
    model = mlp()
    runner = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        loader(x, y),
        diagnoser=diag,
    )
    runner_box.append(runner)
    runner.run(steps=800)
    for rule in (r for r in base.rules if r.kind == "trend"):
        steps = np.array(calls[rule.name])
        late = steps[steps > 200]
        period = max(rule.every, runner.tracker.measure_every)
        assert late.size >= (800 - 200) // period - 1, (rule.name, late.tolist())
        assert np.diff(late).max() <= period, rule.name


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lr", [0.5, 1.0, 4.0])
def test_lr_too_high_whatever_the_lr_and_seed(lr: float, seed: int) -> None:
    """SGD momentum 0.9 at 10x to 80x a good LR on the zoo's digits MLP: named too high, first.

    At lr 4.0 the loss spikes ~10x in the first steps, the ReLUs die and the steps that follow are
    tiny: that aftermath once read as ``lr-too-low`` (a far-too-high LR named too low). At lr 0.5
    the loss comes down but keeps jumping with 20-40x the healthy update ratio for hundreds of steps.
    """
    from tlwidgets.zoo.healthy import build_mlp_digits

    torch.manual_seed(seed)
    runner = tlw.Runner(**build_mlp_digits(seed, lr=lr))
    runner.run(steps=800)
    found = [f.code for f in runner.findings if f.severity in ("warning", "error")]
    assert "lr-too-low" not in found
    assert found and found[0] == "lr-too-high", found


def _own_loop(model: nn.Module, opt: torch.optim.Optimizer, data: Any, steps: int) -> None:
    crit = nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for x, y in data:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                return


@pytest.mark.parametrize("when", list(SCHEDULES))
@pytest.mark.parametrize("make", [lr_too_high], ids=lambda f: f.__name__)
def test_watch_finds_a_bug_over_a_whole_run(make, when) -> None:
    """The same bugs in the user's own loop under ``watch()``: found past the dense phase too."""
    onset, schedule = SCHEDULES[when]["onset"], SCHEDULES[when]["schedule"]
    case, code = make(onset, schedule)  # only its model, optimizer, data and switch are used
    r = case.runner
    with tlw.watch(r.model, r.optimizer, loss_fn=nn.CrossEntropyLoss(), **schedule) as w:
        _own_loop(r.model, r.optimizer, r.train_data, STEPS)
    found = [f for f in w.findings if f.code == code]
    assert found, [(f.code, f.first_step) for f in w.findings]
    if onset:
        assert case.switch.fired_at == onset and found[0].first_step > 200
