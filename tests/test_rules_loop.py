"""Own-loop rules under ``tlw.watch()``: the user's loop forgets zero_grad or step, clips too hard,
leaves the model in eval mode, freezes mid-run with stale gradients; and the healthy loops stay silent.
"""

from __future__ import annotations

import torch
from test_rules_support import classification, cnn_bn, codes, find, loader, mlp, problems
from torch import nn

import tlwidgets as tlw


def train(
    model: nn.Module | None = None,
    *,
    opt=None,
    epochs: int = 1,
    zero_grad: bool = True,
    set_to_none: bool = True,
    step: bool = True,
    zero_between: bool = False,
    clip: float | None = None,
    accumulate: int = 1,
    validate: bool = True,
    val_grad: bool = False,
    stay_eval: bool = False,
    freeze_at: int | None = None,
    n: int = 256,
    features: int = 20,
    train_data=None,
    val_data=None,
    max_iters: int | None = None,
) -> tlw.Watcher:
    """A plain PyTorch loop under ``tlw.watch``, with one bug switched on by the keyword arguments."""
    model = model if model is not None else mlp((features, 32, 4), dropout=0.2)
    optimizer = opt(model) if opt is not None else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if train_data is None:
        x, y = classification(n=n, features=features)
        xv, yv = classification(n=128, features=features, seed=1)
        train_data, val_data = loader(x, y), loader(xv, yv, shuffle=False)
    it = 0
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for epoch in range(epochs):
            if not stay_eval or epoch == 0:
                model.train()
            for xb, yb in train_data:
                if freeze_at is not None and it == freeze_at:
                    model[0].requires_grad_(False)  # frozen mid-run; grads are left as they are
                if zero_grad and not zero_between and it % accumulate == 0:
                    optimizer.zero_grad(set_to_none=set_to_none)
                loss = criterion(model(xb), yb) / accumulate
                loss.backward()
                if zero_between:
                    optimizer.zero_grad()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if step and (it + 1) % accumulate == 0:
                    optimizer.step()
                it += 1
                if max_iters is not None and it >= max_iters:
                    break
            if validate and val_data is not None:
                model.eval()
                with torch.enable_grad() if val_grad else torch.no_grad():
                    for xb, yb in val_data:
                        criterion(model(xb), yb)
    return w


# ------------------------------------------------------------------ grads-not-zeroed
def test_missing_zero_grad_is_an_error_within_two_steps() -> None:
    w = train(zero_grad=False, max_iters=3, validate=False)
    (f,) = find(w, "grads-not-zeroed")
    assert f.severity == "error" and f.first_step <= 2
    assert codes(w)[0] == "grads-not-zeroed"


def test_missing_zero_grad_is_not_blamed_on_the_lr() -> None:
    w = train(zero_grad=False, max_iters=40, validate=False)
    assert codes(w)[0] == "grads-not-zeroed" and "lr-too-high" not in codes(w)


def test_gradient_accumulation_with_zero_grad_is_fine() -> None:
    w = train(accumulate=4, epochs=2)
    assert find(w, "grads-not-zeroed") == [] and problems(w) == []


def test_zero_grad_keeping_zero_tensors_is_fine() -> None:
    w = train(set_to_none=False, epochs=2)
    assert find(w, "grads-not-zeroed") == [] and problems(w) == []


# ------------------------------------------------------------------ optimizer-not-stepping
def test_missing_optimizer_step_within_two_iterations() -> None:
    w = train(step=False, max_iters=2, validate=False)
    (f,) = find(w, "optimizer-not-stepping")
    assert f.severity == "error" and f.evidence["backwards_without_step"] >= 2
    assert "never called" in f.message


def test_missing_step_is_reported_when_the_loop_ends() -> None:
    model = mlp((20, 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = classification(n=32)
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss()) as w:
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()  # one backward, no step, then the loop ends
        assert find(w, "optimizer-not-stepping") == []
    assert len(find(w, "optimizer-not-stepping")) == 1


# ------------------------------------------------------------------ zero_grad between backward and step
def test_zero_grad_between_backward_and_step_is_reported() -> None:
    w = train(zero_between=True, max_iters=4, validate=False)
    (f,) = find(w, "param-not-updating")
    assert "between" in f.cause and f.first_step <= 1


# ------------------------------------------------------------------ grad-clipping-too-strong
def test_clipping_by_orders_of_magnitude() -> None:
    w = train(clip=1e-4, max_iters=6, validate=False)
    (f,) = find(w, "grad-clipping-too-strong")
    assert f.evidence["clip_ratio"] < 1e-2 and f.first_step <= 4
    # The tiny steps it causes are not blamed on the LR ("raise the LR" would be the wrong fix).
    assert "lr-too-low" not in codes(w)


def test_clipping_at_one_is_fine() -> None:
    w = train(clip=1.0, epochs=2)
    assert find(w, "grad-clipping-too-strong") == [] and problems(w) == []


def test_loss_scaling_is_not_mistaken_for_clipping() -> None:
    model = mlp((20, 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = classification(n=256)
    criterion = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=criterion) as w:
        for xb, yb in loader(x, y):
            opt.zero_grad()
            (criterion(model(xb), yb) * 1024.0).backward()  # a GradScaler-like static scale ...
            for p in model.parameters():
                p.grad /= 1024.0  # ... undone before the step, as GradScaler.unscale_ does
            opt.step()
    assert find(w, "grad-clipping-too-strong") == []


# ------------------------------------------------------------------ eval mode, freezing, validation in own loops
def test_model_left_in_eval_mode_after_validation() -> None:
    w = train(stay_eval=True, epochs=2)
    (f,) = find(w, "eval-mode-training")
    assert f.params == ("2",) and f.first_step == 8  # the first step of the second epoch


def test_validation_with_grad_enabled_is_not_training() -> None:
    w = train(val_grad=True, epochs=2)
    assert find(w, "eval-mode-training") == [] and problems(w) == []


def test_freezing_mid_loop_with_stale_gradients_moves_the_params() -> None:
    w = train(freeze_at=3, set_to_none=False, max_iters=6, validate=False)
    (f,) = find(w, "frozen-param-changed")
    assert f.severity == "error" and f.first_step == 3 and f.params == ("0.weight", "0.bias")


def test_freezing_mid_loop_with_set_to_none_is_fine() -> None:
    w = train(freeze_at=3, max_iters=12, validate=False)
    assert find(w, "frozen-param-changed") == []


def test_overfitting_seen_through_the_validation_losses_of_an_own_loop() -> None:
    from test_rules_support import digits

    x, y = digits(64)
    xv, yv = digits(300, offset=1000)
    model = mlp((64, 256, 10))
    w = train(
        model,
        opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        epochs=12,
        train_data=loader(x, y, batch_size=16),
        val_data=loader(xv, yv, shuffle=False),
    )
    (f,) = find(w, "overfitting")
    assert f.evidence["val"][0] < f.evidence["val"][-1]


def test_healthy_own_loop_with_batch_norm() -> None:
    w = train(cnn_bn(), opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), features=64, epochs=2)
    assert problems(w) == []


def test_frozen_warning_then_error_and_the_error_survives_a_later_audit() -> None:
    model = mlp((20, 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    criterion(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    model[0].requires_grad_(False)  # frozen, but its zeroed grad and momentum buffer stay
    with tlw.watch(model, opt, loss_fn=criterion) as w:
        assert [f.severity for f in find(w, "frozen-param-changed")] == ["warning"]
        for xb, yb in loader(x, y):
            opt.zero_grad(set_to_none=False)
            criterion(model(xb), yb).backward()
            opt.step()
        w.set_lr(0.01)  # a control: the audit runs again
    severities = sorted(f.severity for f in find(w, "frozen-param-changed"))
    assert severities == ["error", "warning"]
