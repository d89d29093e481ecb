"""Builders shared by the rule tests (``tests/test_rules_*.py``); this module holds no tests.

Small seeded models and data so a Runner step takes about a millisecond, and
short helpers to read a session's findings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlwidgets as tlw

__all__ = [
    "classification",
    "cnn_bn",
    "codes",
    "digits",
    "find",
    "loader",
    "mlp",
    "problems",
    "regression",
    "run",
]

torch.set_num_threads(1)


def mlp(
    sizes: Iterable[int] = (20, 32, 4),
    *,
    act: type[nn.Module] = nn.ReLU,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Sequential:
    """``Linear - act [- Dropout]`` per hidden layer, then a final ``Linear``; seeded."""
    torch.manual_seed(seed)
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def cnn_bn(channels: int = 8, classes: int = 4, seed: int = 0) -> nn.Sequential:
    """A small conv net with batch norm for 1x8x8 inputs given as 64 features."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * channels, classes),
    )


def classification(
    n: int = 512, features: int = 20, classes: int = 4, seed: int = 0, noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized Gaussian inputs and learnable class labels (a noisy random linear map)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w + noise * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def regression(n: int = 512, features: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized inputs and a smooth target of shape ``(n, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (
        x[:, :3].sum(1, keepdim=True) / 3**0.5
        + 0.5 * torch.tanh(x[:, 3:4])
        + 0.1 * torch.randn(n, 1, generator=g)
    )
    return x, y


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def digits(n: int = 1200, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized sklearn digits (64 features, 10 classes), shuffled once with a fixed seed."""
    x, y = _digits()
    return x[offset : offset + n], y[offset : offset + n]


def loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 32, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A DataLoader with its own seeded generator (the order does not depend on other tests)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def run(
    model: nn.Module,
    data: Any,
    *,
    opt: Any = None,
    loss_fn: Any = None,
    steps: int | None = None,
    epochs: int | None = None,
    **kwargs: Any,
) -> tlw.Runner:
    """A Runner (SGD lr 0.05 unless ``opt(model)`` is given), run for ``steps`` or ``epochs``.

    ``run()`` stops at the first new error finding; the runner is returned either way.
    """
    optimizer = opt(model) if callable(opt) else opt
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    runner = tlw.Runner(
        model, loss_fn if loss_fn is not None else nn.CrossEntropyLoss(), optimizer, data, **kwargs
    )
    runner.run(steps=steps, epochs=epochs)
    return runner


def codes(session: Any) -> list[str]:
    """Finding codes of a Runner or Watcher, in ranked order."""
    return [f.code for f in session.findings]


def find(session: Any, code: str) -> list[Any]:
    """The session's findings of ``code``."""
    return [f for f in session.findings if f.code == code]


def problems(session: Any) -> list[Any]:
    """Warning and error findings (a healthy run must have none)."""
    return [f for f in session.findings if f.severity in ("warning", "error")]
