"""Healthy setups must finish with no warning or error finding (info notes are allowed).

Diverse on purpose: MLP and small CNN with batch norm and dropout, SGD with
momentum, Adam/AdamW/RMSprop, classification on digits and on generated data,
regression with MSE, per-step and per-epoch schedulers, fine-tuning with a
frozen backbone (excluded from the optimizer, or frozen by ``runner.freeze``),
zero-initialized last layer, small batches, and own loops under ``watch()``.
100-300 steps each.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_rules_support import classification, cnn_bn, digits, loader, mlp, problems, regression, run
from torch import nn

import tlwidgets as tlw
from tlwidgets.diagnostics.engine import RuleDiagnoser


def _digits_loaders(batch_size: int = 32):
    x, y = digits(1200)
    xv, yv = digits(300, offset=1200)
    return loader(x, y, batch_size=batch_size), loader(xv, yv, shuffle=False)


def _assert_healthy(session) -> None:
    bad = problems(session)
    assert bad == [], "\n".join(str(f) for f in bad)
    assert session.diagnostic_errors == []


def test_mlp_digits_sgd_momentum_with_validation() -> None:
    train, val = _digits_loaders()
    model = mlp((64, 64, 10))
    r = run(
        model,
        train,
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        val_data=val,
        epochs=5,
    )
    assert r.global_step > 150
    _assert_healthy(r)


def test_mlp_digits_adam_with_dropout() -> None:
    train, val = _digits_loaders()
    model = mlp((64, 128, 64, 10), dropout=0.3)
    r = run(model, train, opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), val_data=val, epochs=5)
    _assert_healthy(r)


def test_cnn_batch_norm_adamw() -> None:
    train, val = _digits_loaders()
    model = cnn_bn(channels=8, classes=10)
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)  # noqa: E731
    r = run(model, train, opt=opt, val_data=val, steps=150)
    _assert_healthy(r)


@pytest.mark.parametrize(
    "opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
    ],
    ids=["sgd-momentum", "adam", "rmsprop"],
)
def test_regression_mse(opt) -> None:
    x, y = regression(n=1024)
    r = run(mlp((10, 32, 32, 1)), loader(x, y), loss_fn=nn.MSELoss(), opt=opt, steps=200)
    _assert_healthy(r)


@pytest.mark.parametrize(
    "make, interval, steps",
    [
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=160), "step", 160),
        (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=160), "step", 160),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), "epoch", 160),
        (lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=20), "step", 160),
    ],
    ids=["cosine-per-step", "onecycle", "steplr-per-epoch", "linear-warmup"],
)
def test_generated_classification_with_a_scheduler(make, interval, steps) -> None:
    x, y = classification(n=1024)
    model = mlp((20, 64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    r = run(model, loader(x, y), opt=opt, scheduler=make(opt), scheduler_interval=interval, steps=steps)
    _assert_healthy(r)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _pretrained() -> _Net:
    """A backbone trained briefly on the first half of digits: a stand-in for pretrained weights."""
    net = _Net()
    x, y = digits(600)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for xb, yb in loader(x, y):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    net.head = nn.Linear(32, 10)  # a fresh head for the new task
    return net


def test_finetune_frozen_backbone_excluded_from_optimizer() -> None:
    net = _pretrained()
    net.backbone.requires_grad_(False)
    net.backbone.eval()  # frozen batch norm keeps its statistics
    train, val = _digits_loaders()
    r = run(
        net,
        train,
        opt=lambda m: torch.optim.SGD(m.head.parameters(), lr=0.05, momentum=0.9),
        val_data=val,
        steps=150,
    )
    _assert_healthy(r)


def test_finetune_frozen_with_runner_freeze_then_unfreeze() -> None:
    net = _pretrained()
    train, val = _digits_loaders()
    r = tlw.Runner(
        net, nn.CrossEntropyLoss(), torch.optim.Adam(net.parameters(), lr=1e-3), train, val_data=val
    )
    r.freeze("backbone", bn_eval=True)
    r.run(steps=80)
    r.unfreeze("backbone")
    r.set_lr(3e-4)
    r.run(steps=80)
    _assert_healthy(r)


def test_zero_initialized_last_layer_and_small_batches() -> None:
    x, y = classification(n=512)
    model = mlp((20, 32, 4))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    r = run(
        model, loader(x, y, batch_size=8), opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.02), steps=200
    )
    _assert_healthy(r)


def test_deep_relu_mlp_adam() -> None:
    train, _ = _digits_loaders()
    r = run(
        mlp((64, 64, 64, 64, 64, 64, 10)),
        train,
        opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        steps=200,
    )
    _assert_healthy(r)


def test_own_loop_healthy() -> None:
    train, val = _digits_loaders()
    model = mlp((64, 64, 10), dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(3):
            model.train()
            for xb, yb in train:
                opt.zero_grad()
                crit(model(xb), yb).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
            model.eval()
            with torch.no_grad():
                for xb, yb in val:
                    crit(model(xb), yb)
    assert w.global_step > 100
    _assert_healthy(w)


def test_rule_cost_per_step_on_a_60_parameter_model() -> None:
    """The default rule set must stay cheap: measured in CPU time of the diagnoser's hooks.

    The target is well under 0.2 ms per step; this assertion only guards
    against a regression by an order of magnitude (shared CI machines are noisy).
    """

    class Timed(RuleDiagnoser):
        spent = 0.0

        def on_stage(self, session, record):
            t0 = time.thread_time()
            try:
                return super().on_stage(session, record)
            finally:
                self.spent += time.thread_time() - t0

        def on_step(self, session):
            t0 = time.thread_time()
            try:
                return super().on_step(session)
            finally:
                self.spent += time.thread_time() - t0

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(20, 16), nn.ReLU()]
    for _ in range(28):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    assert len(list(model.parameters())) == 60
    diag = Timed()
    x, y = classification(n=2048)
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        loader(x, y),
        diagnoser=diag,
    )
    r.run(steps=100)
    per_step = diag.spent / r.global_step
    assert per_step < 2e-3, f"rules cost {per_step * 1e3:.3f} ms per step"
