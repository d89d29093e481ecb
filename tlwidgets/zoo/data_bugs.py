"""More forms of the data bugs (other data, sizes, image and tabular), and healthy twins near each threshold.

The broken setups here are found by a plain ``Runner(...).run()`` through the
automatic data audits (:mod:`tlwidgets.diagnostics.audits`); the healthy ones
sit just inside each audit's threshold (3:1 imbalance, dropout 0.5, a small
natural shift between the splits, disjoint splits with similar examples) and
must stay silent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tlwidgets.testing import make_classification, make_regression
from tlwidgets.zoo._parts import data_seed, make_parts
from tlwidgets.zoo.datasets import digits_datasets, loaders, make_rgb_digits
from tlwidgets.zoo.digits import train_val_split
from tlwidgets.zoo.models import RGBNet, SmallCNN, mlp
from tlwidgets.zoo.registry import Setup, register

__all__ = ["FunctionalDropoutCNN", "RowScrambleMLP"]


class RowScrambleMLP(nn.Module):
    """An MLP whose hidden activations ``[N, H]`` are reshaped to ``[H, N]`` and transposed back.

    With ``scramble=False`` the hidden layer is left alone. The bug mixes the
    examples of a batch: ``h.reshape(H, N).t()`` has the right shape but each
    row now holds values of several examples.
    """

    def __init__(
        self, features: int = 8, hidden: int = 32, classes: int = 4, *, scramble: bool = True
    ) -> None:
        super().__init__()
        self.scramble = scramble
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.scramble:
            h = h.reshape(h.shape[1], h.shape[0]).t()
        return self.fc2(h)


class FunctionalDropoutCNN(SmallCNN):
    """:class:`SmallCNN` with ``F.dropout(h, p)`` called in ``forward`` (no ``nn.Dropout`` module)."""

    def __init__(self, classes: int = 10, *, p: float = 0.9) -> None:
        super().__init__(classes)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, p=self.p, training=self.training))


def _gaussian(n: int = 1200, features: int = 8, classes: int = 4, weights: Any = None, sep: float = 1.0):
    return make_classification(n, features, classes, seed=data_seed(), separation=sep, weights=weights)


def _tabular(
    train: TensorDataset,
    val: TensorDataset,
    model: nn.Module,
    *,
    lr: float = 3e-3,
    batch: int = 64,
    loss_fn: Any = None,
) -> dict[str, Any]:
    train_loader, val_loader = loaders(train, val, batch_size=batch)
    return make_parts(
        model, torch.optim.Adam(model.parameters(), lr=lr), train_loader, val_loader, loss_fn=loss_fn
    )


def _split(ds: TensorDataset, frac: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    return train_val_split(*ds.tensors, val_fraction=frac, seed=data_seed())


def _rgb(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    hwc, y = make_rgb_digits(data_seed(), size=size)
    return hwc.permute(0, 3, 1, 2).contiguous(), y


class _RGBNet(RGBNet):
    """RGBNet for any square size (adaptive pooling before the head)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(classes)
        self.squeeze = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.squeeze(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


# ---------------------------------------------------------------------- data-leakage
def _leak_tabular_rounded(seed: int) -> dict[str, Any]:
    train, val = _split(_gaussian(1500, 12, 3, sep=1.5))
    xt, yt = train.tensors
    xv, yv = val.tensors
    k = len(xv) * 3 // 10  # the bug: 30% of validation rows are training rows, saved with 3 decimals
    leaked = torch.round(xt[-k:] * 1000) / 1000
    val = TensorDataset(torch.cat([leaked, xv[k:]]), torch.cat([yt[-k:], yv[k:]]))
    return _tabular(train, val, mlp([12, 32, 3], flatten=False))


def _leak_images(seed: int) -> dict[str, Any]:
    x, y = _rgb(12)
    train, val = train_val_split(x, y, val_fraction=0.25, seed=data_seed())
    xt, yt = train.tensors
    xv, yv = val.tensors
    k = len(xv) // 5  # the bug: a fifth of the validation images are training images
    val = TensorDataset(torch.cat([xv[k:], xt[:k]]), torch.cat([yv[k:], yt[:k]]))
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = _RGBNet(10)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


# ---------------------------------------------------------------------- train-val-shift
def _shift_tabular(seed: int) -> dict[str, Any]:
    x, y = _gaussian(1200, 10, 3, sep=1.5).tensors
    x = x * 4 + 7  # raw features, mean ~7, std ~4 or more
    train, val = _split(TensorDataset(x, y))
    xv, yv = val.tensors
    # The bug: the training features are left raw, the validation ones standardized with their own statistics.
    val = TensorDataset((xv - xv.mean(0)) / xv.std(0), yv)
    return _tabular(train, val, mlp([10, 32, 3], flatten=False), lr=3e-3)


def _shift_images(seed: int) -> dict[str, Any]:
    x, y = _rgb(16)
    train, val = train_val_split(x, y, val_fraction=0.2, seed=data_seed())
    xv, yv = val.tensors
    # The bug: validation images min-max scaled to [0, 1], not standardized like the training ones.
    lo, hi = xv.amin(), xv.amax()
    val = TensorDataset((xv - lo) / (hi - lo), yv)
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = RGBNet(10)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


def _healthy_small_shift(seed: int) -> dict[str, Any]:
    x, y = _gaussian(1200, 10, 3, sep=1.5).tensors
    train, val = _split(TensorDataset(x, y))
    xv, yv = val.tensors
    g = torch.Generator().manual_seed(data_seed() + 7)
    drift = 0.2 * torch.randn(xv.shape[1], generator=g)  # a small natural shift: 0.2 std, 10% wider
    val = TensorDataset(xv * 1.1 + drift, yv)
    return _tabular(train, val, mlp([10, 32, 3], flatten=False), lr=3e-3)


# ---------------------------------------------------------------------- channel-order
def _channel_order_24(seed: int) -> dict[str, Any]:
    hwc, y = make_rgb_digits(data_seed(), size=24)
    n, h, w, c = hwc.shape
    x = hwc.reshape(n, c, h, w)  # the bug: reshape instead of permute
    train, val = train_val_split(x, y, val_fraction=0.2, seed=data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = _RGBNet(10)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


# ---------------------------------------------------------------------- class-imbalance
def _imbalance_binary(seed: int) -> dict[str, Any]:
    x, y = _gaussian(1600, 6, 2, weights=[0.92, 0.08], sep=1.5).tensors
    train, val = _split(TensorDataset(x, y.float()[:, None]))
    return _tabular(train, val, mlp([6, 16, 1], flatten=False), loss_fn=nn.BCEWithLogitsLoss())


def _imbalance_digits(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    x, y = train.tensors
    g = torch.Generator().manual_seed(data_seed())
    keep = (y == 3) | (torch.rand(len(y), generator=g) < 0.03)  # ~85% of what is left are threes
    train_loader, val_loader = loaders(TensorDataset(x[keep], y[keep]), val, batch_size=32)
    model = mlp([64, 64, 10])
    return make_parts(
        model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train_loader, val_loader
    )


def _healthy_mild_imbalance(seed: int) -> dict[str, Any]:
    train, val = _split(_gaussian(1200, 8, 3, weights=[0.6, 0.2, 0.2], sep=1.5))  # 3:1
    return _tabular(train, val, mlp([8, 32, 3], flatten=False), lr=3e-3)


def _healthy_binary_3to1(seed: int) -> dict[str, Any]:
    x, y = _gaussian(1600, 6, 2, weights=[0.75, 0.25], sep=1.5).tensors
    train, val = _split(TensorDataset(x, y.float()[:, None]))
    return _tabular(train, val, mlp([6, 16, 1], flatten=False), lr=3e-3, loss_fn=nn.BCEWithLogitsLoss())


# ---------------------------------------------------------------------- labels-decoupled
def _decoupled_regression(seed: int) -> dict[str, Any]:
    x, y = make_regression(1024, 1, noise=0.01, seed=data_seed()).tensors
    train, val = train_val_split(x, y, val_fraction=0.2, seed=data_seed())
    xt, yt = train.tensors
    g = torch.Generator().manual_seed(data_seed() + 1)
    train = TensorDataset(xt, yt[torch.randperm(len(yt), generator=g)])  # the bug: targets shuffled alone
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([1, 128, 128, 1], flatten=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    return make_parts(model, opt, train_loader, val_loader, loss_fn=nn.MSELoss())


def _decoupled_images(seed: int) -> dict[str, Any]:
    x, y = _rgb(16)
    train, val = train_val_split(x, y, val_fraction=0.2, seed=data_seed())
    g = torch.Generator().manual_seed(data_seed() + 1)
    xt, _ = train.tensors
    train = TensorDataset(xt, torch.randint(0, 10, (len(xt),), generator=g))  # the bug: random labels
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = RGBNet(10)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


# ---------------------------------------------------------------------- batch-mixing
def _mixing_tabular(seed: int, scramble: bool = True) -> dict[str, Any]:
    train, val = _split(_gaussian(1200, 8, 4, sep=1.5))
    return _tabular(train, val, RowScrambleMLP(8, 32, 4, scramble=scramble), lr=3e-3)


# ---------------------------------------------------------------------- dropout
def _dropout_functional(seed: int, p: float = 0.9) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = FunctionalDropoutCNN(10, p=p)
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=1e-3), train_loader, val_loader)


def _dropout_2d(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.75), nn.Flatten(), nn.Linear(16 * 64, 10)
    )
    return make_parts(model, torch.optim.Adam(model.parameters(), lr=1e-3), train_loader, val_loader)


def _healthy_dropout_half(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([64, 128, 10], dropout=0.5)
    return make_parts(
        model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train_loader, val_loader
    )


# ---------------------------------------------------------------------- registry
_BROKEN = (
    (
        "data-leakage-tabular",
        _leak_tabular_rounded,
        "data-leakage",
        "near-duplicate-free-tabular",
        "30% of the validation rows of a tabular set are training rows saved with 3 decimals "
        "(near-identical).",
        "Split once into disjoint sets before any rounding or export.",
    ),
    (
        "data-leakage-images",
        _leak_images,
        "data-leakage",
        "rgb-cnn",
        "A fifth of the 12x12 RGB validation images are copies of training images.",
        "Split once into disjoint sets.",
    ),
    (
        "train-val-shift-tabular",
        _shift_tabular,
        "train-val-shift",
        "small-natural-shift",
        "Raw tabular training features (mean ~7, std ~4) but validation features standardized with their own "
        "statistics.",
        "Fit one scaler on the training set and apply it to both.",
    ),
    (
        "train-val-shift-images",
        _shift_images,
        "train-val-shift",
        "rgb-cnn",
        "Standardized RGB training images but validation images min-max scaled to [0, 1].",
        "Apply the training normalization to the validation images.",
    ),
    (
        "channel-order-24px",
        _channel_order_24,
        "channel-order",
        "rgb-cnn",
        "24x24 channels-last RGB images turned into [N, C, H, W] with .reshape instead of .permute.",
        "Use x.permute(0, 3, 1, 2).",
    ),
    (
        "class-imbalance-binary",
        _imbalance_binary,
        "class-imbalance",
        "binary-3to1",
        "A binary BCE classifier whose labels are 92% negative.",
        "Weight the positives (pos_weight) or resample.",
    ),
    (
        "class-imbalance-digits",
        _imbalance_digits,
        "class-imbalance",
        "mild-imbalance",
        "Digits where about 85% of the training images are threes (the other digits a few each).",
        "Balance the classes (resample or weight the loss).",
    ),
    (
        "labels-decoupled-regression",
        _decoupled_regression,
        "labels-decoupled",
        "regression-mlp",
        "Regression targets shuffled apart from their inputs.",
        "Shuffle inputs and targets together.",
    ),
    (
        "labels-decoupled-images",
        _decoupled_images,
        "labels-decoupled",
        "rgb-cnn",
        "RGB digit images with random labels.",
        "Use the images' real labels.",
    ),
    (
        "batch-mixing-mlp",
        _mixing_tabular,
        "batch-mixing",
        "row-independent-mlp",
        "A tabular MLP reshapes its hidden activations [N, H] to [H, N] and transposes back, "
        "mixing examples.",
        "Keep the batch dimension first: no reshape across it.",
    ),
    (
        "dropout-functional",
        _dropout_functional,
        "dropout-too-high",
        "dropout-half",
        "A CNN calls F.dropout(x, p=0.9) on its input in forward (no nn.Dropout module).",
        "Use p <= 0.5.",
    ),
    (
        "dropout2d-too-high",
        _dropout_2d,
        "dropout-too-high",
        "dropout-half",
        "nn.Dropout2d(0.75) after a convolution drops three quarters of the feature maps.",
        "Use p <= 0.5.",
    ),
)

for _name, _builder, _code, _twin, _desc, _fix in _BROKEN:
    register(Setup(_name, _desc, _builder, expected=(_code,), twin=_twin, run={"epochs": 1}, fix=_fix))

_HEALTHY = (
    (
        "near-duplicate-free-tabular",
        lambda seed: _tabular(*_split(_gaussian(1500, 12, 3, sep=1.5)), mlp([12, 32, 3], flatten=False)),
        "Gaussian clusters split once into disjoint train and validation rows.",
        "data-leakage-tabular",
    ),
    (
        "small-natural-shift",
        _healthy_small_shift,
        "Validation features drift by 0.2 standard deviations and are 10% wider: a natural shift.",
        "train-val-shift-tabular",
    ),
    (
        "mild-imbalance",
        _healthy_mild_imbalance,
        "Three Gaussian classes in proportions 3:1:1.",
        "class-imbalance-digits",
    ),
    (
        "binary-3to1",
        _healthy_binary_3to1,
        "A binary BCE classifier with 75% negatives.",
        "class-imbalance-binary",
    ),
    (
        "row-independent-mlp",
        lambda seed: _mixing_tabular(seed, scramble=False),
        "The same tabular MLP without the reshape.",
        "batch-mixing-mlp",
    ),
    ("dropout-half", _healthy_dropout_half, "An MLP with nn.Dropout(0.5) on digits.", "dropout-too-high"),
)

for _name, _builder, _desc, _twin in _HEALTHY:
    register(Setup(_name, _desc, _builder, healthy=True, twin=_twin, run={"epochs": 2}))
del _name, _builder, _code, _twin, _desc, _fix
