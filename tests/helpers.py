"""Small shared builders for tests: tiny models, data and runners.

Other test files (and other engineers' tests) import these, so the signatures
stay stable and the defaults stay small (a step takes well under a millisecond).
Everything is seeded: the same call gives the same model and data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "IN_FEATURES",
    "NUM_CLASSES",
    "make_batches",
    "make_data",
    "make_loader",
    "make_mlp",
    "make_runner",
    "naive_norms",
    "one_thread",
    "snapshot",
    "weights_equal",
]

IN_FEATURES = 8
NUM_CLASSES = 3


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (restored after).

    The machines share two cores between several jobs; tiny models are about
    ten times faster single-threaded there. Use it with
    ``from helpers import one_thread  # noqa: F401`` and
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_mlp(
    seed: int = 0,
    in_features: int = IN_FEATURES,
    hidden: int = 16,
    classes: int = NUM_CLASSES,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``Linear(in, hidden) - ReLU [- Dropout] - Linear(hidden, classes)``, seeded.

    Parameter names are ``0.weight, 0.bias, 2.weight, 2.bias`` (with dropout:
    ``0.*`` and ``3.*``).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def make_data(
    n: int = 64, in_features: int = IN_FEATURES, classes: int = NUM_CLASSES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``(n, in_features)`` and integer class targets ``(n,)``, seeded.

    Targets depend on the inputs (a fixed random linear map) so a model can learn them.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    w = torch.randn(in_features, classes, generator=gen)
    y = (x @ w).argmax(1)
    return x, y


def make_batches(
    n_batches: int = 4,
    batch_size: int = 8,
    in_features: int = IN_FEATURES,
    classes: int = NUM_CLASSES,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of ``(x, y)`` batches (a re-iterable, unshuffled ``train_data``)."""
    x, y = make_data(n_batches * batch_size, in_features, classes, seed)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def make_loader(
    n: int = 64,
    batch_size: int = 8,
    shuffle: bool = True,
    in_features: int = IN_FEATURES,
    classes: int = NUM_CLASSES,
    seed: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over :func:`make_data` (shuffling uses the global torch RNG)."""
    x, y = make_data(n, in_features, classes, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_runner(
    model: nn.Module | None = None,
    train_data: Iterable[Any] | None = None,
    *,
    lr: float = 0.1,
    momentum: float = 0.0,
    loss_fn: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: Any,
):
    """A ``tlw.Runner`` on :func:`make_mlp` / :func:`make_batches` with SGD, unless given others.

    Extra keyword arguments go to ``Runner`` (``val_data=``, ``scheduler=`` ...).
    """
    import tlwidgets as tlw

    model = make_mlp() if model is None else model
    train_data = make_batches() if train_data is None else train_data
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    return tlw.Runner(model, loss_fn, optimizer, train_data, **kwargs)


def count_trend_runs(runner: Any) -> list[int]:
    """The steps after which ``runner`` runs its trend rules (``on_step``), appended as they happen."""
    calls: list[int] = []
    diagnose = runner._diagnose

    def counted(hook: str, *args: Any) -> Any:
        if hook == "on_step":
            calls.append(runner.global_step)
        return diagnose(hook, *args)

    runner._diagnose = counted
    return calls


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies (never aliases) of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights_equal(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: Sequence[str] | None = None
) -> bool:
    """True when the tensors named (default: all) are bit-for-bit equal."""
    keys = list(a) if names is None else list(names)
    return all(torch.equal(a[k], b[k]) for k in keys)


def naive_norms(tensors: Iterable[torch.Tensor | None]) -> list[float]:
    """``torch.linalg.vector_norm`` of each tensor in float64 (NaN for None)."""
    return [
        float("nan") if t is None else float(torch.linalg.vector_norm(t.detach().double())) for t in tensors
    ]


def digits_runner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    n: int | None = None,
    batch: int = 64,
    **kwargs: Any,
):
    """A ``tlw.Runner`` on scikit-learn's digits (the zoo's split, seed 0) with cross-entropy and
    validation data; ``n``: keep only the first ``n`` training examples. Extra keyword arguments go to
    ``Runner``."""
    import tlwidgets as tlw
    from tlwidgets.zoo.datasets import digits_datasets, loaders

    train, val = digits_datasets(0)
    if n is not None:
        x, y = train.tensors
        train = TensorDataset(x[:n], y[:n])
    train_loader, val_loader = loaders(train, val, batch_size=batch)
    return tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader, **kwargs)


def overfitting_digits_runner(widths: Sequence[int] = (64, 512, 512, 10), **kwargs: Any):
    """The fit tests' overfitting setup: 50 digits for a big MLP (~300k parameters), Adam at 3e-3."""
    from tlwidgets.zoo.models import mlp

    torch.manual_seed(0)
    model = mlp(list(widths))
    return digits_runner(model, torch.optim.Adam(model.parameters(), lr=3e-3), n=50, batch=25, **kwargs)
