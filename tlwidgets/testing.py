"""pytest assertions for training code, and synthetic data to run them on.

Each assertion runs a tiny experiment (one or a few optimizer steps, one
forward pass) and raises :class:`AssertionError` with a message that names the
parameters, modules or values at fault. Model weights, buffers, gradients,
module modes, optimizer state and the global RNG states are restored
afterwards, so the assertions can run on the real model in any order.

>>> from tlwidgets.testing import assert_params_update, make_classification
>>> data = make_classification(256, in_features=4, classes=3)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> assert_params_update(model, torch.nn.CrossEntropyLoss(), data.tensors)

Generators follow "synthetic data per task type": a nonlinear 1-D regression
(``sin(8 (x - 1.2))`` plus noise), Gaussian clusters per class (balance
selectable), and detection-style patches (a bright square on a dark, noisy
image; the target is its box).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlwidgets.core.activations import first_tensor
from tlwidgets.core.batches import call_model, default_unpack
from tlwidgets.core.controls import optimizer_param_ids
from tlwidgets.core.findings import Severity
from tlwidgets.core.naming import resolve_names
from tlwidgets.core.training import LossShapeError, train_step
from tlwidgets.diagnostics.checks import overfit_one_batch, preserved_state

__all__ = [
    "assert_finite",
    "assert_frozen_unchanged",
    "assert_loss_decreases",
    "assert_no_findings",
    "assert_output_range",
    "assert_params_update",
    "make_classification",
    "make_patches",
    "make_regression",
]

Unpack = Callable[[Any], tuple[Any, Any]]
Forward = Callable[[nn.Module, Any], Any]


# ====================================================================== helpers
def _split(batch: Any, unpack: Unpack | None) -> tuple[Any, Any]:
    return (unpack or default_unpack)(batch)


def _default_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    # Adam moves every parameter with a non-zero gradient by about lr, however small the gradient.
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AssertionError("the model has no parameter with requires_grad=True: nothing can update")
    return torch.optim.Adam(params, lr=lr)


def _one_step(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    forward: Forward,
    set_to_none: bool | None = True,
) -> float:
    """:func:`~tlwidgets.core.training.train_step`, a non-scalar loss reported as a failed assertion."""
    try:
        return train_step(
            model, loss_fn, optimizer, inputs, targets, forward=forward, set_to_none=set_to_none
        )
    except LossShapeError as exc:
        raise AssertionError(str(exc)) from None


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = "\n".join(f"  - {s}" for s in items[:limit])
    return shown + (f"\n  ... and {len(items) - limit} more" if len(items) > limit else "")


# ====================================================================== assertions
def assert_params_update(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    params: Sequence[str] | None = None,
    steps: int = 1,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> None:
    """Assert that an optimizer step changes every trainable parameter.

    Parameters
    ----------
    model, loss_fn
        What is trained.
    batch
        One batch, ``(inputs, targets)`` by default.
    optimizer
        The optimizer to step (default: Adam over the trainable parameters,
        which moves any parameter whose gradient is not exactly zero).
    params
        Module or parameter names (a name selects its dotted subtree); default:
        every parameter with ``requires_grad=True``.
    steps
        Optimizer steps to take.
    unpack, forward
        How to split the batch and call the model.

    Raises
    ------
    AssertionError
        Naming each parameter that did not change and why: frozen, not in the
        optimizer, no gradient (the loss does not reach it), zero gradient, or
        a zero learning rate.
    """
    forward = forward or call_model
    named = dict(model.named_parameters())
    names = (
        resolve_names(params, list(named))
        if params is not None
        else [n for n, p in named.items() if p.requires_grad]
    )
    if not names:
        raise AssertionError("no trainable parameter to check: every parameter has requires_grad=False")
    opt = optimizer if optimizer is not None else _default_optimizer(model)
    inputs, targets = _split(batch, unpack)
    with preserved_state(model, opt):
        before = {n: named[n].detach().clone() for n in names}
        grads: dict[str, torch.Tensor | None] = {}
        for _ in range(steps):
            _one_step(model, loss_fn, opt, inputs, targets, forward)
            grads = {n: None if named[n].grad is None else named[n].grad.detach().clone() for n in names}
        held = optimizer_param_ids(opt)
        group_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        stuck = []
        for n in names:
            p = named[n]
            if not torch.equal(before[n], p.detach()):
                continue
            g = grads[n]
            if not p.requires_grad:
                why = "requires_grad=False (frozen)"
            elif id(p) not in held:
                why = "not in any optimizer group (build the optimizer after replacing layers)"
            elif g is None:
                why = (
                    "got no gradient: the loss does not reach it (a .detach(), no_grad, or an unused module)"
                )
            elif not bool(g.any()):
                why = "its gradient is exactly zero (dead units, zero initialization, or a constant input)"
            elif float(group_lr.get(id(p), 1.0)) == 0.0:
                why = "its optimizer group has lr=0"
            else:
                why = f"the step left it unchanged (grad norm {float(g.norm()):.3g})"
            stuck.append(f"{n}: {why}")
    if stuck:
        raise AssertionError(
            f"{len(stuck)} of {len(names)} parameter(s) did not change after {steps} optimizer step(s):\n"
            + _listing(stuck)
        )


def assert_frozen_unchanged(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer,
    *,
    frozen: Sequence[str] | None = None,
    steps: int = 2,
    set_to_none: bool | None = None,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> None:
    """Assert that frozen parameters stay bit-for-bit unchanged through optimizer steps.

    Runs ``steps`` iterations of ``optimizer.zero_grad()``,
    forward, loss, backward, ``optimizer.step()`` (two by default, so momentum
    gets a chance to act). A frozen parameter left in the optimizer with a
    stale zero gradient (``zero_grad(set_to_none=False)``) is still moved by
    weight decay and momentum; this assertion catches that.

    Parameters
    ----------
    model, loss_fn, batch, optimizer
        As in your training loop.
    frozen
        Names (dotted subtrees) that must be frozen; default: every parameter
        with ``requires_grad=False``. A named parameter that still requires
        grad fails the assertion.
    steps
        Iterations to run.
    set_to_none
        Passed to ``optimizer.zero_grad``; ``None`` (default) calls ``optimizer.zero_grad()``
        as a training loop does (PyTorch >= 2.0 sets grads to ``None``; an optimizer or loop that
        zeroes in place keeps zero gradient tensors, which weight decay and momentum act on).
    unpack, forward
        How to split the batch and call the model.

    Raises
    ------
    AssertionError
        Naming the parameters that are not frozen or that moved, with how far.
    """
    forward = forward or call_model
    named = dict(model.named_parameters())
    if frozen is not None:
        names = resolve_names(frozen, list(named))
        not_frozen = [n for n in names if named[n].requires_grad]
        if not_frozen:
            raise AssertionError(
                f"{len(not_frozen)} parameter(s) expected frozen still have requires_grad=True:\n"
                + _listing(not_frozen)
            )
    else:
        names = [n for n, p in named.items() if not p.requires_grad]
        if not names:
            raise AssertionError("no parameter is frozen (every parameter has requires_grad=True)")
    inputs, targets = _split(batch, unpack)
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    with preserved_state(model, optimizer):
        before = {n: named[n].detach().clone() for n in names}
        had_grad = {n: named[n].grad is not None for n in names}
        for _ in range(steps):
            _one_step(model, loss_fn, optimizer, inputs, targets, forward, set_to_none=set_to_none)
        moved = []
        for n in names:
            delta = (named[n].detach() - before[n]).norm()
            if float(delta) == 0.0 and torch.equal(named[n].detach(), before[n]):
                continue
            g = where.get(id(named[n]))
            how = ""
            if g is not None:
                opts = {k: g[k] for k in ("weight_decay", "momentum") if g.get(k)}
                settings = ", ".join(f"{k}={v}" for k, v in opts.items()) or "no decay or momentum"
                how = f"; it is in an optimizer group ({settings})"
                if had_grad[n] or named[n].grad is not None:
                    how += " and a (stale) gradient tensor: use zero_grad(set_to_none=True)"
            moved.append(f"{n}: changed by {float(delta):.3g}{how}")
    if moved:
        raise AssertionError(
            f"{len(moved)} frozen parameter(s) changed during {steps} optimizer step(s):\n" + _listing(moved)
        )


def assert_finite(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> None:
    """Assert that the forward pass (and with ``loss_fn`` the loss and gradients) hold no NaN/Inf.

    Parameters
    ----------
    model
        The model.
    batch
        Inputs (a tensor), or an ``(inputs, targets)`` batch.
    loss_fn
        When given, the loss and every parameter's gradient are checked too.
    unpack, forward
        How to split the batch and call the model.

    Raises
    ------
    AssertionError
        Naming the first module whose output is not finite, the loss value, or
        the parameters with non-finite gradients.
    """
    forward = forward or call_model
    if isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    else:
        inputs, targets = _split(batch, unpack)
    if loss_fn is not None and targets is None:
        raise ValueError("loss_fn needs a batch with targets: pass (inputs, targets)")
    bad_modules: list[str] = []

    def hook(name: str):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is not None and not bool(torch.isfinite(t.detach()).all()):
                bad_modules.append(name or "<model>")

        return fn

    with preserved_state(model):
        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
        try:
            with torch.set_grad_enabled(loss_fn is not None):
                out = forward(model, inputs)
        finally:
            for h in handles:
                h.remove()
        o = first_tensor(out)
        if o is not None and not bool(torch.isfinite(o.detach()).all()):
            n_bad = int((~torch.isfinite(o.detach())).sum())
            first = bad_modules[0] if bad_modules else "the model's forward (outside any submodule)"
            raise AssertionError(
                f"the output holds {n_bad} NaN/Inf value(s) of {o.numel()}; "
                f"they first appear in the output of {first}"
            )
        if loss_fn is None:
            return
        loss = loss_fn(out, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise AssertionError(f"the loss is {value} although the model output is finite (check loss_fn)")
        for p in model.parameters():
            p.grad = None
        if loss.requires_grad:
            loss.backward()
        bad = [
            n
            for n, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
    if bad:
        raise AssertionError(f"{len(bad)} parameter(s) got NaN/Inf gradients:\n" + _listing(bad))


def assert_output_range(
    model: nn.Module,
    inputs: Any,
    low: float,
    high: float,
    *,
    forward: Forward | None = None,
) -> None:
    """Assert that every output value lies in ``[low, high]`` (e.g. probabilities in [0, 1]).

    The model runs under ``no_grad`` in its current mode (state restored).

    Raises
    ------
    AssertionError
        With the count of values outside the range (NaN counts as outside) and the observed min and max.
    """
    if low > high:
        raise ValueError(f"low must not exceed high, got {low} > {high}")
    forward = forward or call_model
    with preserved_state(model), torch.no_grad():
        out = first_tensor(forward(model, inputs))
    if out is None:
        raise AssertionError("the model returned no floating-point tensor")
    o = out.detach()
    outside = ~((o >= low) & (o <= high))
    k = int(outside.sum())
    if k:
        finite = o[torch.isfinite(o)]
        lo = float(finite.min()) if finite.numel() else math.nan
        hi = float(finite.max()) if finite.numel() else math.nan
        n_nan = int((~torch.isfinite(o)).sum())
        nan_text = f", {n_nan} of them NaN/Inf" if n_nan else ""
        raise AssertionError(
            f"{k} of {o.numel()} output values lie outside [{low}, {high}]{nan_text}: "
            f"observed min {lo:.4g}, max {hi:.4g} (output shape {tuple(o.shape)})"
        )


def assert_loss_decreases(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    steps: int = 20,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float | None = None,
    max_ratio: float = 0.9,
    unpack: Unpack | None = None,
    forward: Forward | None = None,
) -> None:
    """Assert that training on one batch lowers its loss to at most ``max_ratio`` of the start.

    Parameters
    ----------
    model, loss_fn, batch
        What is trained, on one batch (``(inputs, targets)`` by default).
    steps
        Optimizer steps on the batch.
    optimizer
        Default: Adam over the trainable parameters with ``lr`` (default 1e-3).
    lr
        Learning rate to use (overrides the optimizer's during the check).
    max_ratio
        The final loss must be at most this fraction of the initial loss.
    unpack, forward
        How to split the batch and call the model.

    Raises
    ------
    AssertionError
        With the loss curve's start, end and the diagnosis of
        :func:`~tlwidgets.diagnostics.checks.overfit_one_batch`.
    """
    opt = optimizer if optimizer is not None else _default_optimizer(model)
    result = overfit_one_batch(
        model,
        loss_fn,
        opt,
        batch=batch,
        steps=steps,
        lr=lr,
        target_ratio=max_ratio,
        unpack=unpack,
        forward=forward,
    )
    initial, final = result.initial_loss, result.final_loss
    if result.passed and final < initial:
        return
    curve = ", ".join(f"{v:.4g}" for v in result.losses[:: max(1, len(result.losses) // 6)])
    detail = f"\n  {result.finding}" if result.finding is not None else ""
    raise AssertionError(
        f"the loss on one batch went from {initial:.4g} to {final:.4g} in {steps} steps "
        f"(required: at most {max_ratio:g} x the start); curve: {curve}{detail}"
    )


def assert_no_findings(
    runner_or_watcher: Any,
    severity: str = "warning",
    *,
    ignore: Sequence[str] = (),
) -> None:
    """Assert that a Runner or watcher has no finding of ``severity`` or worse.

    Parameters
    ----------
    runner_or_watcher
        Anything with a ``findings`` list (a Runner, a watcher, or a list of findings).
    severity
        ``"error"``: only errors fail; ``"warning"`` (default): warnings and
        errors; ``"info"``: any finding.
    ignore
        Finding codes to leave out.

    Raises
    ------
    AssertionError
        Listing every offending finding with its cause and fix.
    """
    limit = Severity(severity).rank
    findings = runner_or_watcher if isinstance(runner_or_watcher, list) else runner_or_watcher.findings
    # A resolved finding (fixed by an action or a control, or rewound past) is history, not a problem.
    bad = [
        f
        for f in findings
        if Severity(f.severity).rank <= limit
        and f.code not in set(ignore)
        and not getattr(f, "resolved", False)
    ]
    if bad:
        raise AssertionError(
            f"{len(bad)} finding(s) of severity {severity} or worse:\n" + "\n".join(str(f) for f in bad)
        )


# ====================================================================== synthetic data
def make_regression(
    n: int = 256,
    in_features: int = 1,
    noise: float = 0.01,
    seed: int = 0,
    *,
    as_dataset: bool = True,
) -> TensorDataset | tuple[torch.Tensor, torch.Tensor]:
    """Nonlinear regression: ``y = sin(8 (u - 1.2)) + noise``.

    ``x`` is uniform on ``[-1, 1]^in_features``; ``u = x`` for one feature,
    else the projection of ``x`` on a random unit vector (so every feature matters).

    Returns
    -------
    TensorDataset or (x, y)
        ``x``: ``[n, in_features]`` float32; ``y``: ``[n, 1]`` float32 (the shape
        of a ``Linear(..., 1)`` output, so MSE does not broadcast).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, in_features, generator=g) * 2 - 1
    if in_features == 1:
        u = x[:, 0]
    else:
        w = torch.randn(in_features, generator=g)
        u = x @ (w / w.norm())
    y = torch.sin(8 * (u - 1.2)) + noise * torch.randn(n, generator=g)
    y = y[:, None]
    return TensorDataset(x, y) if as_dataset else (x, y)


def make_classification(
    n: int = 512,
    in_features: int = 2,
    classes: int = 3,
    seed: int = 0,
    *,
    separation: float = 3.0,
    weights: Sequence[float] | None = None,
    as_dataset: bool = True,
) -> TensorDataset | tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one per class: ``x ~ N(mu_class, I)``.

    Parameters
    ----------
    n, in_features, classes, seed
        Size, dimensionality, number of classes and RNG seed.
    separation
        Scale of the random class means (larger: easier).
    weights
        Class proportions (default balanced); e.g. ``[0.9, 0.05, 0.05]`` for an imbalanced set.
    as_dataset
        Return a ``TensorDataset`` (default) or the ``(x, y)`` tensors.

    Returns
    -------
    TensorDataset or (x, y)
        ``x``: ``[n, in_features]`` float32; ``y``: ``[n]`` int64 class indices in ``[0, classes)``.
    """
    if classes < 2:
        raise ValueError("classes must be at least 2")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, in_features, generator=g) * separation
    if weights is None:
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.numel() != classes or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must hold one non-negative proportion per class")
        y = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    x = means[y] + torch.randn(n, in_features, generator=g)
    y = y.long()
    return TensorDataset(x, y) if as_dataset else (x, y)


def make_patches(
    n: int = 256,
    size: int = 16,
    seed: int = 0,
    *,
    min_box: int = 3,
    max_box: int | None = None,
    classes: int = 1,
    noise: float = 0.05,
    as_dataset: bool = True,
) -> TensorDataset | tuple[torch.Tensor, ...]:
    """Detection-style patches: a bright square on a dark, slightly noisy image.

    Parameters
    ----------
    n, size, seed
        Number of images, their side length, RNG seed.
    min_box, max_box
        Square side range in pixels (default up to ``size // 2``).
    classes
        With more than one class, each square is filled with a class-specific
        brightness ``(c + 1) / classes`` and the labels are returned as well.
    noise
        Standard deviation of the background noise.
    as_dataset
        Return a ``TensorDataset`` (default) or the tensors.

    Returns
    -------
    TensorDataset or tensors
        ``images``: ``[n, 1, size, size]`` float32; ``boxes``: ``[n, 4]`` float32,
        ``(x0, y0, x1, y1) / size`` in ``[0, 1]``; and ``labels`` ``[n]`` int64 when
        ``classes > 1`` (then unpack with ``unpack=lambda b: (b[0], (b[1], b[2]))``).
    """
    max_box = max_box if max_box is not None else max(min_box, size // 2)
    if not 1 <= min_box <= max_box <= size:
        raise ValueError(f"need 1 <= min_box <= max_box <= size, got {min_box}, {max_box}, {size}")
    g = torch.Generator().manual_seed(seed)
    images = noise * torch.randn(n, 1, size, size, generator=g)
    side = torch.randint(min_box, max_box + 1, (n,), generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    boxes = torch.empty(n, 4)
    for i in range(n):
        s = int(side[i])
        x0 = int(torch.randint(0, size - s + 1, (1,), generator=g))
        y0 = int(torch.randint(0, size - s + 1, (1,), generator=g))
        images[i, 0, y0 : y0 + s, x0 : x0 + s] += (int(labels[i]) + 1) / classes
        boxes[i] = torch.tensor([x0, y0, x0 + s, y0 + s], dtype=torch.float32) / size
    out: tuple[torch.Tensor, ...] = (images, boxes) if classes == 1 else (images, boxes, labels.long())
    return TensorDataset(*out) if as_dataset else out
