"""tlwidgets.integrations.lightning.DebugCallback on real Lightning fits (CPU, MLP on digits).

Both package names (``lightning.pytorch`` and ``pytorch_lightning``) for a healthy run; the bugs
(a head left out of ``configure_optimizers``, an LR far too high, far too low) are named in the top
three findings; ``history.loss`` has one entry per optimizer step (also under
``accumulate_grad_batches``) with the criterion's value; a fit that raises leaves no hook behind.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

from tlwidgets.integrations.lightning import DebugCallback
from tlwidgets.zoo.datasets import digits_datasets

PACKAGES = ("lightning.pytorch", "pytorch_lightning")

for _name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # "GPU available: False", tips: not ours

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning's own advice on CPU runs (num_workers, a small log_every_n_steps): not ours.
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


def module_class(pkg: str) -> type:
    L = importlib.import_module(pkg)

    class DigitsMLP(L.LightningModule):
        """64-64-10 MLP; ``skip_head`` leaves the head out of the optimizer (the bug)."""

        def __init__(self, lr: float = 0.05, momentum: float = 0.9, skip_head: bool = False, fail_at=None):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)
            self.lr, self.momentum, self.skip_head, self.fail_at = lr, momentum, skip_head, fail_at
            self.seen: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            if self.fail_at is not None and self.global_step == self.fail_at[0]:
                raise self.fail_at[1]
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.seen.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("val_loss", loss)
            return loss

        def configure_optimizers(self):
            params = self.body.parameters() if self.skip_head else self.parameters()
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    return DigitsMLP


def loaders() -> tuple[DataLoader, DataLoader]:
    train, val = digits_datasets(0)
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


def trainer(pkg: str, cb, **kw):
    L = importlib.import_module(pkg)
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    options.update(kw)
    return L.Trainer(**options)


def fit(pkg: str = "lightning.pytorch", *, seed: int = 0, module_kw=None, cb=None, **trainer_kw):
    torch.manual_seed(seed)
    cb = cb if cb is not None else DebugCallback()
    module = module_class(pkg)(**(module_kw or {}))
    t = trainer(pkg, cb, **trainer_kw)
    train, val = loaders()
    t.fit(module, train, val)
    return cb, t, module


def serious(cb) -> list[str]:
    return [
        f"{f.code} ({f.severity}): {f.message}" for f in cb.findings if f.severity in ("warning", "error")
    ]


def hooks_left(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every hook a watcher could have left on the model, its parameters and the optimizer."""
    left = []
    for name, m in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if getattr(m, attr):
                left.append(f"{name or '<model>'}.{attr}")
        if "__reduce_ex__" in vars(m):
            left.append(f"{name or '<model>'}.__reduce_ex__")
    for name, p in module.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            left.append(f"{name} grad hooks")
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        left.append("optimizer step hooks")
    return left


# ------------------------------------------------------------------ the class
def test_one_callback_class_passes_both_packages_isinstance_checks() -> None:
    cb = DebugCallback()
    for pkg in PACKAGES:
        assert isinstance(cb, importlib.import_module(pkg).Callback), pkg
    assert cb.session is None and cb.findings == []
    with pytest.raises(AttributeError, match="fit has started"):
        _ = cb.history
    with pytest.raises(TypeError, match="framework provides them"):
        DebugCallback(optimizer=None)


def test_import_tlwidgets_imports_no_framework() -> None:
    code = (
        "import sys, tlwidgets, tlwidgets.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_lightning_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning.pytorch'] = None; sys.modules['pytorch_lightning'] = None\n"
        "try:\n"
        "    import tlwidgets.integrations.lightning\n"
        "except ImportError as e:\n"
        "    assert 'pip install \"tlwidgets[lightning]\"' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ healthy and broken fits
@pytest.mark.parametrize("pkg", PACKAGES)
def test_healthy_fit_raises_no_warning_or_error(pkg: str) -> None:
    cb, t, module = fit(pkg)
    assert serious(cb) == []
    assert cb.session.closed  # finished and closed at fit end
    assert cb.session.diagnostic_errors == []
    # One history row per optimizer step, with the loss training_step returned.
    assert len(cb.history.loss) == t.global_step == 46
    np.testing.assert_allclose(cb.history.loss, module.seen, rtol=1e-6)
    # Validation at each epoch end, as epoch records (the Runner's).
    val = cb.history.val_loss
    assert val.shape == (2, 2) and list(val[:, 0]) == [23, 46]
    assert val[-1, 1] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-5)
    assert val[-1, 1] < 0.5  # it learned


@pytest.mark.parametrize(
    ("module_kw", "code"),
    [
        ({"skip_head": True}, "param-not-in-optimizer"),
        ({"lr": 2.0}, "lr-too-high"),
        ({"lr": 1e-5, "momentum": 0.0}, "lr-too-low"),
    ],
    ids=["head-not-in-optimizer", "lr-too-high", "lr-too-low"],
)
def test_bug_is_named_in_the_top_three_findings(module_kw: dict, code: str) -> None:
    cb, _, _ = fit(module_kw=module_kw)
    top = [f.code for f in cb.findings[:3]]
    assert code in top, [str(f) for f in cb.findings]
    if code == "param-not-in-optimizer":
        f = next(f for f in cb.findings if f.code == code)
        assert set(f.params) == {"head.weight", "head.bias"}


def test_param_not_in_optimizer_fires_at_fit_start_through_the_audit() -> None:
    """The watcher's setup audit runs when the callback creates it, before any step."""
    seen = []

    class Probe(DebugCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append([f.code for f in self.findings])
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    fit(module_kw={"skip_head": True}, cb=Probe(), max_epochs=1, limit_train_batches=2)
    assert seen == [["param-not-in-optimizer"]]


def test_one_history_entry_per_optimizer_step_under_accumulation() -> None:
    cb, t, module = fit(accumulate_grad_batches=2, max_epochs=1)
    n = t.global_step
    assert n == 12 and len(cb.history.loss) == n  # 23 batches -> 12 optimizer steps
    # The step's loss is the mean of its micro-batches' losses (Lightning backpropagates loss / 2).
    seen = np.asarray(module.seen)
    np.testing.assert_allclose(cb.history.loss[:11], seen[:22].reshape(11, 2).mean(axis=1), rtol=1e-6)
    assert cb.history.loss[11] == pytest.approx(seen[22], rel=1e-6)
    assert serious(cb) == []


# ------------------------------------------------------------------ exceptions
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_fit_that_raises_leaves_no_hook_behind(exc: BaseException) -> None:
    handler = signal.getsignal(signal.SIGINT)
    cb = DebugCallback()
    torch.manual_seed(0)
    module = module_class("lightning.pytorch")(fail_at=(5, exc))
    t = trainer("lightning.pytorch", cb)
    try:
        # Lightning turns a KeyboardInterrupt into sys.exit(1) after on_exception.
        with pytest.raises(SystemExit if isinstance(exc, KeyboardInterrupt) else RuntimeError):
            t.fit(module, *loaders())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert cb.session.closed
    assert hooks_left(module, t.optimizers[0]) == []
    assert len(cb.history.loss) == 5
    assert not [f for f in cb.findings if f.code in ("optimizer-not-stepping", "grads-not-zeroed")]


def test_healthy_fit_leaves_no_hook_behind_and_pickles() -> None:
    cb, t, module = fit(max_epochs=1, limit_train_batches=3)
    assert hooks_left(module, t.optimizers[0]) == []
    copy = pickle.loads(pickle.dumps(cb))  # what a spawned process gets: no watcher
    assert type(copy) is type(cb) and copy.session is None


# ------------------------------------------------------------------ fits and controls
def test_second_fit_gets_a_new_watcher() -> None:
    cb, _, _ = fit(max_epochs=1, limit_train_batches=4)
    first = cb.session
    fit(cb=cb, max_epochs=1, limit_train_batches=3)
    assert cb.session is not first and cb.watchers == [first, cb.session]
    assert len(first.history.loss) == 4 and len(cb.history.loss) == 3
    assert first.closed and cb.session.closed


def test_controls_during_fit_apply_at_the_next_batch_start() -> None:
    """set_lr/freeze called during a step (here from the training step, on another thread) are
    queued and applied at the next batch boundary, recorded as control changes."""
    import threading

    cb = DebugCallback()
    lrs = []

    class Module(module_class("lightning.pytorch")):
        def training_step(self, batch, batch_idx):
            lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            if self.global_step == 3:
                th = threading.Thread(target=lambda: (cb.set_lr(0.01), cb.freeze("body")))
                th.start()
                th.join()
                assert self.body[1].weight.requires_grad  # not yet: queued
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = Module()
    t = trainer("lightning.pytorch", cb, max_epochs=1, limit_train_batches=6)
    t.fit(module, *loaders())
    assert lrs == [0.05] * 4 + [0.01] * 2
    assert not module.body[1].weight.requires_grad
    kinds = [(c.kind, c.step) for c in cb.history.controls]
    assert kinds == [("set_lr", 4), ("freeze", 4)]
    # After the fit the watcher is closed: a control says so instead of silently doing nothing.
    with pytest.raises(RuntimeError, match="closed"):
        cb.set_lr(0.1)


def test_scheduler_from_configure_optimizers_is_watched() -> None:
    cb = DebugCallback()

    class Module(module_class("lightning.pytorch")):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": sched}

    torch.manual_seed(0)
    t = trainer("lightning.pytorch", cb, max_epochs=2, limit_train_batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Module(), *loaders())
    assert cb.session.scheduler is t.lr_scheduler_configs[0].scheduler
    np.testing.assert_allclose(cb.history.lr[:, 0], [0.05] * 3 + [0.025] * 3)
