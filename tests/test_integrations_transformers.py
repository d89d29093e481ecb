"""tlwidgets.integrations.transformers.DebugCallback on real Hugging Face ``Trainer`` runs (CPU).

Two models, nothing downloaded: an MLP on scikit-learn digits that returns ``{"loss", "logits"}``
(any ``nn.Module`` the Trainer accepts) and a 2-layer BERT built from ``BertConfig`` on a generated
token task. A healthy run is silent; a classifier left out of the optimizer, an LR far too high and
far too low are named in the top three; ``history.loss`` has one entry per optimizer step, also
under ``gradient_accumulation_steps``; the Trainer's default clipping (``max_grad_norm=1.0``) and
accumulation raise no loop finding; a run that raises leaves no hook behind.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")

from tlwidgets.integrations.transformers import DebugCallback  # noqa: E402
from tlwidgets.zoo.datasets import digits_datasets  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)

pytestmark = pytest.mark.usefixtures("one_thread")

LOOP_CODES = ("grads-not-zeroed", "optimizer-not-stepping", "grad-clipping-too-strong")


# ------------------------------------------------------------------ models and data
class DigitsMLP(nn.Module):
    """64-64-10 MLP that computes its loss like a transformers model (``labels=`` -> ``loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)
        self.seen: list[float] = []
        self.fail_at: int | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.fail_at is not None and self.training and len(self.seen) == self.fail_at:
            raise RuntimeError("boom")
        logits = self.classifier(self.body(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
            if torch.is_grad_enabled():
                self.seen.append(float(out["loss"].detach()))
        return out


class Dicts(torch.utils.data.Dataset):
    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def digits() -> tuple[Dicts, Dicts]:
    train, val = digits_datasets(0)
    return Dicts(x=train.tensors[0], labels=train.tensors[1]), Dicts(x=val.tensors[0], labels=val.tensors[1])


def tokens(n: int, seed: int, length: int = 16) -> Dicts:
    """Label 1 when the sequence holds token 3 (placed at a random position), else 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, 100, (n, length), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, length, (n,), generator=g)
    x[y == 1, pos[y == 1]] = 3
    return Dicts(input_ids=x, attention_mask=torch.ones_like(x), labels=y)


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(cfg)


def train(model, train_ds, eval_ds, tmp_path, *, cb=None, optimizers=None, **kw):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=256,
        num_train_epochs=2,
        learning_rate=3e-3,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="epoch",
        use_cpu=True,
        seed=0,
    )
    options.update(kw)
    cb = cb if cb is not None else DebugCallback()
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        callbacks=[cb],
        **({"optimizers": optimizers} if optimizers is not None else {}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's own notices (no tokenizer, ...), not ours
        trainer.train()
    return cb, trainer


def serious(cb) -> list[str]:
    return [
        f"{f.code} ({f.severity}): {f.message}" for f in cb.findings if f.severity in ("warning", "error")
    ]


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    left = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            if getattr(m, attr):
                left.append(f"{name or '<model>'}.{attr}")
    for name, p in model.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            left.append(f"{name} grad hooks")
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        left.append("optimizer step hooks")
    return left


# ------------------------------------------------------------------ the MLP on digits
def test_healthy_run_raises_no_warning_or_error(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    cb, trainer = train(model, *digits(), tmp_path)
    assert serious(cb) == []
    assert cb.session.closed and cb.session.diagnostic_errors == []
    # The torch optimizer inside accelerate's AcceleratedOptimizer, and the Trainer's scheduler.
    assert isinstance(cb.session.optimizer, torch.optim.AdamW)
    assert cb.session.scheduler is not None
    n = trainer.state.global_step
    assert n == 90 and len(cb.history.loss) == n
    np.testing.assert_allclose(cb.history.loss, model.seen, rtol=1e-6)
    val = cb.history.val_loss
    assert list(val[:, 0]) == [45, 90] and val[-1, 1] < 0.6  # from ln(10) = 2.3
    assert hooks_left(model, cb.session.optimizer) == []


@pytest.mark.parametrize(
    ("setup", "code"),
    [("skip-classifier", "param-not-in-optimizer"), ("lr-high", "lr-too-high"), ("lr-low", "lr-too-low")],
)
def test_bug_is_named_in_the_top_three_findings(setup: str, code: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    kw: dict = {}
    if setup == "skip-classifier":
        kw["optimizers"] = (torch.optim.AdamW(model.body.parameters(), lr=3e-3), None)
    elif setup == "lr-high":
        kw["learning_rate"] = 1.0
    else:
        kw.update(learning_rate=1e-6, optim="sgd", lr_scheduler_type="constant")
    cb, _ = train(model, *digits(), tmp_path, **kw)
    top = [f.code for f in cb.findings[:3]]
    assert code in top, [str(f) for f in cb.findings]
    if code == "param-not-in-optimizer":
        f = next(f for f in cb.findings if f.code == code)
        assert set(f.params) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("ga", [2, 3])
def test_one_history_entry_per_optimizer_step_under_gradient_accumulation(ga: int, tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    cb, trainer = train(model, *digits(), tmp_path, gradient_accumulation_steps=ga, num_train_epochs=1)
    n = trainer.state.global_step
    assert n == -(-45 // ga) and len(cb.history.loss) == n  # 45 micro-batches an epoch
    # The step's loss is the mean of its micro-batches' (the model's loss; the Trainer divides by ga).
    seen = np.asarray(model.seen)
    full = (len(seen) // ga) * ga
    np.testing.assert_allclose(
        cb.history.loss[: full // ga], seen[:full].reshape(-1, ga).mean(axis=1), rtol=1e-5
    )
    assert not [c for c in (f.code for f in cb.findings) if c in LOOP_CODES]
    assert serious(cb) == []


def test_run_that_raises_in_forward_leaves_no_hook_behind(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    model.fail_at = 7
    cb = DebugCallback()
    with pytest.raises(RuntimeError, match="boom"):
        train(model, *digits(), tmp_path, cb=cb)
    assert cb.session.closed
    assert hooks_left(model, cb.session.optimizer) == []
    assert len(cb.history.loss) == 7
    assert not [f for f in cb.findings if f.code in LOOP_CODES]


def test_run_that_raises_in_backward_is_closed_by_close_or_the_next_train(tmp_path) -> None:
    """The Trainer calls no callback when training raises outside the model's forward: the hooks
    stay until cb.close() (or the next train(), or the end of the IPython cell)."""
    torch.manual_seed(0)
    model = DigitsMLP()
    cb = DebugCallback()
    calls = []

    def fail(grad):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in backward")

    handle = model.classifier.weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="boom in backward"):
        train(model, *digits(), tmp_path, cb=cb)
    handle.remove()
    assert not cb.session.closed
    cb.close()
    assert cb.session.closed and hooks_left(model, cb.session.optimizer) == []


def test_controls_queue_until_the_next_step_and_the_callback_pickles(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsMLP()
    cb = DebugCallback()
    lrs = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            lrs.append(optimizer.param_groups[0]["lr"])
            if state.global_step == 3:
                cb.freeze("body")
                assert model.body[1].weight.requires_grad  # queued until the next step begins

    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=32,
            max_steps=6,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
        ),
        train_dataset=digits()[0],
        callbacks=[cb, Spy()],
    )
    body = model.body[1].weight.detach().clone()
    trainer.train()
    assert [(c.kind, c.step) for c in cb.history.controls] == [("freeze", 3)]
    assert not model.body[1].weight.requires_grad
    assert len(lrs) == 6
    # Frozen at step 3: the body changed before, not after (AdamW's decay included: no gradient).
    assert not torch.equal(body, model.body[1].weight)
    copy = pickle.loads(pickle.dumps(cb))
    assert copy.session is None


def test_default_clipping_is_measured_and_not_an_alarm(tmp_path) -> None:
    """The Trainer clips to max_grad_norm=1.0 by default (accelerate -> clip_grad_norm_ between the
    last backward and the step); the watcher measures the clip ratio and raises nothing."""
    torch.manual_seed(0)
    cb, trainer = train(DigitsMLP(), *digits(), tmp_path, gradient_accumulation_steps=2, num_train_epochs=1)
    assert trainer.args.max_grad_norm == 1.0
    ratios = cb.session.loop.clip_ratio
    # Measured (this MLP's gradient norm stays below 1 here, so nothing was cut: ratio 1).
    assert len(ratios) >= 3 and max(ratios) <= 1.0 + 1e-5, ratios
    assert not [f.code for f in cb.findings if f.code in LOOP_CODES]
    # Clipping to 0.1 cuts every step (the watcher sees it) and is still a choice, not a bug.
    torch.manual_seed(0)
    cb, _ = train(DigitsMLP(), *digits(), tmp_path, max_grad_norm=0.1, num_train_epochs=1)
    assert max(cb.session.loop.clip_ratio) < 0.5
    assert not [f.code for f in cb.findings if f.code in LOOP_CODES]


# ------------------------------------------------------------------ a tiny BERT from config
def bert_run(tmp_path, length: int = 16, **kw):
    torch.manual_seed(0)
    model = tiny_bert()
    options = dict(learning_rate=1e-3, num_train_epochs=3)
    options.update(kw)
    return train(model, tokens(1024, 0, length), tokens(256, 1, length), tmp_path, **options)


def test_bert_accumulation_raises_no_loop_finding(tmp_path) -> None:
    cb, trainer = bert_run(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=16)
    assert len(cb.history.loss) == trainer.state.global_step == 96
    assert cb.session.loop.clip_ratio  # measured (this model's gradient norm stays below 1: no clip)
    assert not [f.code for f in cb.findings if f.code in LOOP_CODES]
    assert cb.history.val_loss[-1, 1] < 0.5  # it learns the token task


def test_bert_bug_is_named_lr_far_too_high(tmp_path) -> None:
    cb, _ = bert_run(tmp_path, learning_rate=1.0, num_train_epochs=1)
    assert "lr-too-high" in [f.code for f in cb.findings[:3]], [str(f) for f in cb.findings]


def test_bert_healthy_run_raises_no_warning_or_error(tmp_path) -> None:
    """A healthy tiny BERT learns and stays silent (attention query/key gradients are ~1e-4x their
    neighbours' at init: vanishing-gradients judges depths, not single matrices)."""
    cb, _ = bert_run(tmp_path)
    assert serious(cb) == []
    assert cb.history.val_loss[-1, 1] < 0.3


def test_bert_converged_run_raises_no_lr_too_low(tmp_path) -> None:
    cb, _ = bert_run(tmp_path, length=8, learning_rate=3e-3, num_train_epochs=4)
    assert cb.history.val_loss[-1, 1] < 0.01
    assert "lr-too-low" not in [f.code for f in cb.findings]


def test_in_ipython_the_cell_that_raised_closes_the_watcher(tmp_path, monkeypatch) -> None:
    """A backward that raises ends train() without any callback; in IPython the callback closes the
    watcher when the cell ends with the error (post_run_cell), and unregisters itself."""
    import types

    from tlwidgets.integrations import transformers as integration

    class Events:
        def __init__(self) -> None:
            self.handlers: list = []

        def register(self, name, fn) -> None:
            assert name == "post_run_cell"
            self.handlers.append(fn)

        def unregister(self, name, fn) -> None:
            self.handlers.remove(fn)

    shell = types.SimpleNamespace(events=Events())
    monkeypatch.setattr(integration, "_ipython", lambda: shell)
    torch.manual_seed(0)
    model = DigitsMLP()
    cb = DebugCallback()
    calls = []

    def fail(grad):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in backward")

    handle = model.classifier.weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="boom in backward"):
        train(model, *digits(), tmp_path, cb=cb)
    handle.remove()
    assert not cb.session.closed and len(shell.events.handlers) == 1
    ok = types.SimpleNamespace(error_in_exec=None, error_before_exec=None)
    shell.events.handlers[0](ok)  # another cell that ended well: nothing happens
    assert not cb.session.closed
    shell.events.handlers[0](
        types.SimpleNamespace(error_in_exec=RuntimeError("boom"), error_before_exec=None)
    )
    assert cb.session.closed and hooks_left(model, cb.session.optimizer) == []
    assert shell.events.handlers == []


def test_custom_compute_loss_reports_its_loss_with_record_loss(tmp_path) -> None:
    """A compute_loss override whose loss the model does not return: cb.record_loss(loss) gives it
    to the watcher (without it the history's loss is NaN: nothing else carries it)."""

    class Smoothed(transformers.Trainer):
        def __init__(self, *args, report=None, **kw):
            super().__init__(*args, **kw)
            self.report = report

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = nn.functional.cross_entropy(outputs["logits"], labels, label_smoothing=0.1)
            if self.report is not None:
                self.report(loss)
            return (loss, outputs) if return_outputs else loss

    def run(report: bool):
        torch.manual_seed(0)
        cb = DebugCallback()
        trainer = Smoothed(
            model=DigitsMLP(),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path),
                per_device_train_batch_size=32,
                max_steps=8,
                report_to=[],
                disable_tqdm=True,
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
            ),
            train_dataset=digits()[0],
            callbacks=[cb],
            report=cb.record_loss if report else None,
        )
        trainer.train()
        return cb

    assert np.isnan(run(False).history.loss).all()
    cb = run(True)
    loss = cb.history.loss
    assert len(loss) == 8 and np.isfinite(loss).all() and 2.0 < loss[0] < 2.5  # ~ln(10), smoothed
    assert serious(cb) == []


def test_set_lr_during_train_keeps_the_schedules_shape(tmp_path) -> None:
    """cb.set_lr mid-train rescales the Trainer's scheduler (the one inside accelerate's wrapper):
    the linear decay goes on from the new LR."""

    def run(change: bool) -> list[float]:
        torch.manual_seed(0)
        model = DigitsMLP()
        cb = DebugCallback()
        lrs: list[float] = []

        class Spy(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kw):
                if change and state.global_step == 3:
                    # Queued: DebugCallback.on_step_begin ran before this callback, so the LR is set at
                    # the next step's beginning, and the schedule goes on from there at that level.
                    cb.set_lr(1e-3)

            def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
                lrs.append(optimizer.param_groups[0]["lr"])

        transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path),
                per_device_train_batch_size=32,
                max_steps=8,
                learning_rate=4e-3,
                report_to=[],
                disable_tqdm=True,
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
            ),
            train_dataset=digits()[0],
            callbacks=[cb, Spy()],
        ).train()
        if change:
            assert [(c.kind, c.step) for c in cb.history.controls] == [("set_lr", 4)]
        return lrs

    base, changed = np.asarray(run(False)), np.asarray(run(True))
    np.testing.assert_allclose(changed[:4], base[:4])
    assert changed[4] == pytest.approx(1e-3)
    np.testing.assert_allclose(changed[4:] / base[4:], 1e-3 / base[4], rtol=1e-6)  # same shape
