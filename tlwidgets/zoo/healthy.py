"""Healthy setups: correct training code on small offline data, the twins of the broken ones.

They differ in model (MLP, CNN, CNN with batch norm, GRU, pretrained backbone
with a new head), data (digits, RGB digits, Gaussian clusters, a nonlinear
regression, detection-style patches, oscillating sequences) and optimizer
(SGD with momentum, Adam, AdamW, RMSprop). Each runs its default length with
no warning or error finding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlwidgets.testing import make_classification, make_patches, make_regression
from tlwidgets.zoo._parts import data_seed, finetune_setup, make_parts
from tlwidgets.zoo.datasets import digits_datasets, loaders, make_rgb_digits, make_sequences
from tlwidgets.zoo.digits import train_val_split
from tlwidgets.zoo.models import PatchNet, RGBNet, SequenceNet, SmallCNN, mlp
from tlwidgets.zoo.registry import Setup, register

__all__ = [
    "build_cnn_bn_digits",
    "build_finetune_digits",
    "build_finetune_frozen_digits",
    "build_mlp_digits",
    "build_regression",
]


def _split(ds: TensorDataset, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    x, y = ds.tensors
    return train_val_split(x, y, val_fraction=val_fraction, seed=data_seed())


# ---------------------------------------------------------------------- builders (reused by broken setups)
def build_mlp_digits(seed: int, *, lr: float = 0.05, hidden: int = 64, **_: Any) -> dict[str, Any]:
    """MLP 64-64-10 on standardized digits, SGD with momentum."""
    train, val = digits_datasets(data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([64, hidden, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return make_parts(model, optimizer, train_loader, val_loader)


def build_cnn_bn_digits(seed: int, *, batch_size: int = 32, dropout: float = 0.0) -> dict[str, Any]:
    """CNN with batch norm on 8x8 digits, Adam."""
    train, val = digits_datasets(data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=batch_size, drop_last=True)
    model = SmallCNN(10, batch_norm=True, dropout=dropout)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=1e-3), train_loader, val_loader)


def build_regression(seed: int, *, flat_targets: bool = False) -> dict[str, Any]:
    """ReLU MLP fitting ``sin(8 (x - 1.2))``, AdamW, MSE on ``[N, 1]`` targets (``[N]``: ``flat_targets``)."""
    x, y = make_regression(1024, 1, noise=0.01, seed=data_seed()).tensors
    train, val = train_val_split(x, y[:, 0] if flat_targets else y, val_fraction=0.2, seed=data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([1, 128, 128, 1], flatten=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    return make_parts(model, optimizer, train_loader, val_loader, loss_fn=nn.MSELoss())


def build_finetune_digits(seed: int) -> dict[str, Any]:
    """Pretrained backbone (digits 0-4) + new head for digits 5-9; AdamW, lower LR for the backbone."""
    model, train_loader, val_loader = finetune_setup()
    optimizer = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": 3e-4},
            {"params": model.head.parameters(), "lr": 3e-3},
        ],
        weight_decay=1e-4,
    )
    return make_parts(model, optimizer, train_loader, val_loader)


def build_finetune_frozen_digits(seed: int) -> dict[str, Any]:
    """Frozen pretrained backbone (weights and batch-norm statistics) + a new head; SGD on the head only."""
    model, train_loader, val_loader = finetune_setup()
    model.backbone.requires_grad_(False)
    model.backbone.eval()  # frozen batch norm keeps its pretrained running statistics
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
    return make_parts(model, optimizer, train_loader, val_loader)


def build_gaussian_rmsprop(seed: int, *, weights: Any = None) -> dict[str, Any]:
    """MLP on 8-D Gaussian clusters (4 classes), RMSprop."""
    train, val = _split(make_classification(1200, 8, 4, seed=data_seed(), separation=1.0, weights=weights))
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([8, 32, 4], flatten=False)
    return make_parts(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), train_loader, val_loader)


def build_patches(seed: int) -> dict[str, Any]:
    """CNN regressing the box of a bright square in 16x16 patches, Adam, MSE."""
    train, val = _split(make_patches(768, 16, seed=data_seed()))
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = PatchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    return make_parts(model, optimizer, train_loader, val_loader, loss_fn=nn.MSELoss())


def build_sequence(seed: int, *, mix_batch: bool = False) -> dict[str, Any]:
    """GRU classifying the frequency of noisy oscillations ``[N, T, 2]``, Adam."""
    train, val = _split(make_sequences(768, seed=data_seed()))
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = SequenceNet(2, 32, 3, mix_batch=mix_batch)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=1e-2), train_loader, val_loader)


def build_rgb(seed: int, *, reshape_bug: bool = False) -> dict[str, Any]:
    """CNN on RGB digits; the channels-last images are converted with a permute (or, broken, a view)."""
    hwc, y = make_rgb_digits(data_seed())
    n, h, w, c = hwc.shape
    x = hwc.view(n, c, h, w) if reshape_bug else hwc.permute(0, 3, 1, 2).contiguous()
    train, val = train_val_split(x, y, val_fraction=0.2, seed=data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = RGBNet(10)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


# ---------------------------------------------------------------------- registry
register(
    Setup(
        "mlp-digits",
        "An MLP (64-64-10, ReLU) on standardized digits with SGD (lr 0.05, momentum 0.9), shuffled "
        "batches of 64 and a disjoint validation split.",
        build_mlp_digits,
        healthy=True,
        run={"epochs": 2},
    )
)
register(
    Setup(
        "cnn-bn-digits",
        "A CNN with batch norm on 8x8 digits, Adam (lr 1e-3), batches of 32 with drop_last=True.",
        build_cnn_bn_digits,
        healthy=True,
        twin="eval-mode-training",
        run={"epochs": 1},
    )
)
register(
    Setup(
        "regression-mlp",
        "A ReLU MLP regressing y = sin(8 (x - 1.2)) + noise with MSE on matching [N, 1] shapes, AdamW.",
        build_regression,
        healthy=True,
        twin="shape-broadcast",
        run={"epochs": 6},
    )
)
register(
    Setup(
        "finetune-digits",
        "Transfer learning: a CNN backbone pretrained on digits 0-4 gets a new head for digits 5-9; "
        "AdamW with lr 3e-4 for the backbone and 3e-3 for the head, built after the head was replaced.",
        build_finetune_digits,
        healthy=True,
        twin="head-not-in-optimizer",
        run={"epochs": 2},
    )
)
register(
    Setup(
        "finetune-frozen-digits",
        "Transfer learning with a frozen backbone: requires_grad=False and batch norm in eval mode for the "
        "backbone, an optimizer over the new head only (SGD with momentum).",
        build_finetune_frozen_digits,
        healthy=True,
        twin="frozen-but-moving",
        run={"epochs": 2},
    )
)
register(
    Setup(
        "gaussian-rmsprop",
        "An MLP on 8-D Gaussian clusters (4 balanced classes), RMSprop (lr 1e-3).",
        build_gaussian_rmsprop,
        healthy=True,
        twin="class-imbalance",
        run={"epochs": 2},
    )
)
register(
    Setup(
        "patches-cnn",
        "Detection-style regression: a CNN predicts the box (x0, y0, x1, y1) of a bright square in noisy "
        "16x16 patches; Adam, MSE.",
        build_patches,
        healthy=True,
        run={"epochs": 2},
    )
)
register(
    Setup(
        "sequence-gru",
        "A GRU classifies the frequency of noisy 2-D oscillations; batch-first input is transposed to the "
        "time-major layout nn.GRU expects.",
        build_sequence,
        healthy=True,
        twin="batch-mixing",
        checks=("batch-independence",),
        run={"epochs": 3},
    )
)
register(
    Setup(
        "rgb-cnn",
        "A CNN on RGB digits; the channels-last images are converted with x.permute(0, 3, 1, 2).",
        build_rgb,
        healthy=True,
        twin="channel-order",
        checks=("channel-order",),
        run={"epochs": 2},
    )
)
