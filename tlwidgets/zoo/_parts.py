"""Pieces shared by the zoo builders: the ``Runner`` keyword dict and the digits fine-tune setup."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tlwidgets.zoo.datasets import loaders
from tlwidgets.zoo.digits import DigitsBackbone, DigitsNet, pretrained_backbone, split_digits

__all__ = ["data_seed", "finetune_setup", "make_parts", "using_data_seed"]

#: The seed of the data the builders generate or split (train/val split, synthetic data); the
#: build seed sets weights and batch order. Set for one build by :func:`using_data_seed`.
_DATA_SEED: contextvars.ContextVar[int] = contextvars.ContextVar("tlwidgets_zoo_data_seed", default=0)


def data_seed() -> int:
    """The data seed of the build in progress (0 unless :func:`using_data_seed` says otherwise)."""
    return _DATA_SEED.get()


@contextlib.contextmanager
def using_data_seed(seed: int) -> Iterator[None]:
    """Builders called inside this block generate and split their data with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"data_seed must be an int >= 0, got {seed!r}")
    token = _DATA_SEED.set(seed)
    try:
        yield
    finally:
        _DATA_SEED.reset(token)


def make_parts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Any,
    val_data: Any = None,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of a ``Runner``, as every zoo builder returns them.

    Parameters
    ----------
    model
        The model to train.
    optimizer
        Its optimizer.
    train_data
        The training batches (usually a ``DataLoader``).
    val_data
        The validation batches, or ``None`` (the key is always present).
    loss_fn
        The loss; ``None`` gives a fresh ``nn.CrossEntropyLoss()``.
    **extra
        Further ``Runner`` keywords (``scheduler``, ``unpack``, ...), added after the five above.

    Returns
    -------
    dict
        ``model``, ``loss_fn``, ``optimizer``, ``train_data``, ``val_data`` (in this order) and ``extra``.
    """
    return {
        "model": model,
        "loss_fn": nn.CrossEntropyLoss() if loss_fn is None else loss_fn,
        "optimizer": optimizer,
        "train_data": train_data,
        "val_data": val_data,
        **extra,
    }


def finetune_setup(
    head_classes: int = 5, *, batch_size: int = 32
) -> tuple[DigitsNet, DataLoader, DataLoader | None]:
    """The fine-tune data and a pretrained digits backbone with a new linear head.

    The loaders are built first, then the model (the head's initialization
    draws from the global torch RNG), the order every fine-tune builder had.

    Parameters
    ----------
    head_classes
        Outputs of the new head (the fine-tune split has the 5 digits 5-9).
    batch_size
        Training batch size; the training loader shuffles and drops the last partial batch.

    Returns
    -------
    tuple
        ``(model, train_loader, val_loader)``.
    """
    split = split_digits(seed=data_seed())
    train_loader, val_loader = loaders(
        split.finetune_train, split.finetune_val, batch_size=batch_size, drop_last=True
    )
    model = DigitsNet(pretrained_backbone(), nn.Linear(DigitsBackbone.out_features, head_classes))
    return model, train_loader, val_loader
