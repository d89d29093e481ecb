"""Own-loop setups: bugs that live in the user's training loop, diagnosed with ``tlw.watch``.

A Runner owns its loop and always zeroes gradients and steps the optimizer, so
these bugs only exist in code the user writes. Each setup's ``loop`` is that
code; :meth:`~tlwidgets.zoo.registry.Setup.watch` runs it under
``tlw.watch(model, optimizer, loss_fn=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tlwidgets.zoo.healthy import build_mlp_digits
from tlwidgets.zoo.registry import Setup, register

__all__ = ["train_loop"]


def train_loop(
    parts: dict[str, Any],
    *,
    epochs: int = 1,
    zero_grad: bool = True,
    step: bool = True,
    clip: float | None = None,
    validate: bool = True,
) -> None:
    """A plain PyTorch training loop, with switches that reproduce classic loop bugs.

    Parameters
    ----------
    parts
        A zoo build: ``model``, ``loss_fn``, ``optimizer``, ``train_data``, ``val_data``.
    epochs
        Passes over the training data.
    zero_grad
        Call ``optimizer.zero_grad()`` each iteration (``False``: gradients accumulate).
    step
        Call ``optimizer.step()`` each iteration (``False``: the weights never change).
    clip
        ``max_norm`` of ``clip_grad_norm_`` after backward (``None``: no clipping).
    validate
        Evaluate ``val_data`` under ``model.eval()`` and ``torch.no_grad()`` after each epoch.
    """
    model, loss_fn, optimizer = parts["model"], parts["loss_fn"], parts["optimizer"]
    for _ in range(epochs):
        model.train()
        for inputs, targets in parts["train_data"]:
            if zero_grad:
                optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            if step:
                optimizer.step()
        if validate and parts.get("val_data") is not None:
            model.eval()
            with torch.no_grad():
                for inputs, targets in parts["val_data"]:
                    loss_fn(model(inputs), targets)


def _loop(**switches: Any) -> Callable[..., None]:
    def run(parts: dict[str, Any], **kwargs: Any) -> None:
        train_loop(parts, **switches, **kwargs)

    return run


register(
    Setup(
        "mlp-digits-loop",
        "The mlp-digits setup trained by the user's own loop: zero_grad, forward, loss, backward, gradient "
        "clipping at max_norm=5, step, and a validation pass under eval() and no_grad() after each epoch.",
        build_mlp_digits,
        healthy=True,
        twin="grads-not-zeroed",
        run={"epochs": 2},
        loop=_loop(clip=5.0),
    )
)

#: Broken own-loop setups: mlp-digits trained one epoch by ``train_loop`` with one bug switched on.
#: name (also the expected finding code), description, ``train_loop`` switches, fix
_LOOP_BUGS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    (
        "grads-not-zeroed",
        "The user's loop never calls optimizer.zero_grad(), so every backward() adds to the previous "
        "gradients and the steps keep growing.",
        {"zero_grad": False},
        "Call optimizer.zero_grad() at the start of every iteration.",
    ),
    (
        "optimizer-not-stepping",
        "The user's loop calls loss.backward() but never optimizer.step(), so the weights never change.",
        {"step": False},
        "Call optimizer.step() after loss.backward().",
    ),
    (
        "grad-clipping-too-strong",
        "The user's loop clips gradients with clip_grad_norm_(max_norm=1e-4), orders of magnitude below "
        "their real norm, so every step is cut to a tiny fixed length.",
        {"clip": 1e-4},
        "Clip at about the typical gradient norm (max_norm 1 to 10), or not at all.",
    ),
)

for _name, _desc, _switches, _fix in _LOOP_BUGS:
    register(
        Setup(
            _name,
            _desc,
            build_mlp_digits,
            expected=(_name,),
            twin="mlp-digits-loop",
            run={"epochs": 1},
            loop=_loop(**_switches),
            fix=_fix,
        )
    )
del _name, _desc, _switches, _fix
