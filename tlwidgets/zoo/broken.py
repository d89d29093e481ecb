"""Broken setups: one classic bug each, on top of a healthy twin (see :mod:`tlwidgets.zoo.healthy`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlwidgets.testing import make_regression
from tlwidgets.zoo._parts import data_seed, finetune_setup, make_parts
from tlwidgets.zoo.datasets import digits_datasets, loaders
from tlwidgets.zoo.digits import DigitsBackbone, train_val_split
from tlwidgets.zoo.healthy import (
    _split,
    build_cnn_bn_digits,
    build_gaussian_rmsprop,
    build_mlp_digits,
    build_regression,
    build_rgb,
    build_sequence,
)
from tlwidgets.zoo.models import DetachedMLP, InplaceMLP, SqrtMLP, mlp
from tlwidgets.zoo.registry import Setup, register

__all__ = ["InPlaceZeroGradSGD"]


class InPlaceZeroGradSGD(torch.optim.SGD):
    """SGD whose ``zero_grad()`` zeroes gradients in place (``set_to_none=False``), as PyTorch < 2.0 did.

    A parameter frozen with ``requires_grad=False`` then keeps a zero gradient
    tensor, so SGD still applies weight decay and momentum to it.
    """

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none=set_to_none)


def _sgd(model: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD over all of ``model``'s parameters, by default the mlp-digits recipe.

    Parameters
    ----------
    model
        The module whose ``parameters()`` the optimizer updates.
    lr
        Learning rate.
    momentum
        Momentum factor.

    Returns
    -------
    torch.optim.SGD
        A fresh optimizer.
    """
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _mlp_parts(
    model: nn.Module, optimizer: torch.optim.Optimizer, train_data: Any = None, val_data: Any = None
) -> dict[str, Any]:
    """:func:`make_parts` with cross-entropy, on the mlp-digits data unless loaders are given.

    Parameters
    ----------
    model, optimizer
        As for :func:`~tlwidgets.zoo._parts.make_parts`.
    train_data, val_data
        The loaders; without ``train_data`` both are the mlp-digits loaders
        (batches of 64), built here, after the model and the optimizer.

    Returns
    -------
    dict
        The ``Runner`` keywords of the setup.
    """
    if train_data is None:
        train, val = digits_datasets(data_seed())
        train_data, val_data = loaders(train, val, batch_size=64)
    return make_parts(model, optimizer, train_data, val_data)


# ---------------------------------------------------------------------- optimizer / trainability
def _head_not_in_optimizer(seed: int) -> dict[str, Any]:
    model, train_loader, val_loader = finetune_setup(head_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.head = nn.Linear(DigitsBackbone.out_features, 5)  # the bug: replaced after the optimizer was built
    return make_parts(model, optimizer, train_loader, val_loader)


def _frozen_but_moving(seed: int) -> dict[str, Any]:
    model, train_loader, val_loader = finetune_setup()
    optimizer = InPlaceZeroGradSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
        p.grad = torch.zeros_like(p)  # left over from an earlier backward, zeroed in place
    model.backbone.eval()
    return make_parts(model, optimizer, train_loader, val_loader)


def _frozen_bn_drift(seed: int) -> dict[str, Any]:
    model, train_loader, val_loader = finetune_setup()
    model.backbone.requires_grad_(False)  # the bug: the backbone stays in train mode, so BN stats drift
    return make_parts(model, _sgd(model.head), train_loader, val_loader)


def _nothing_trainable(seed: int) -> dict[str, Any]:
    model, train_loader, val_loader = finetune_setup()
    optimizer = _sgd(model)
    model.requires_grad_(False)  # the bug: meant model.backbone.requires_grad_(False)
    model.backbone.eval()
    return make_parts(model, optimizer, train_loader, val_loader)


def _head_lr_zero(seed: int) -> dict[str, Any]:
    model, train_loader, val_loader = finetune_setup()
    optimizer = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": 3e-4},
            {"params": model.head.parameters(), "lr": 0.0},  # the bug: the head's group has lr 0
        ]
    )
    return make_parts(model, optimizer, train_loader, val_loader)


def _detached(seed: int) -> dict[str, Any]:
    model = DetachedMLP(64, 64, 10)
    return _mlp_parts(model, _sgd(model))


# ---------------------------------------------------------------------- learning rate
def _lr_too_high(seed: int) -> dict[str, Any]:
    return build_mlp_digits(seed, lr=2.0)


def _lr_too_low(seed: int) -> dict[str, Any]:
    parts = build_mlp_digits(seed)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=1e-5)
    return parts


def _scheduler_too_fast(seed: int) -> dict[str, Any]:
    parts = build_mlp_digits(seed)
    # Meant as "divide by 10 every 5 epochs", but stepped after every batch.
    parts["scheduler"] = torch.optim.lr_scheduler.StepLR(parts["optimizer"], step_size=5, gamma=0.1)
    parts["scheduler_interval"] = "step"
    return parts


def _over_regularization(seed: int) -> dict[str, Any]:
    parts = build_mlp_digits(seed)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=0.05, momentum=0.9, weight_decay=1.0)
    return parts


# ---------------------------------------------------------------------- numerics
def _nan_loss(seed: int) -> dict[str, Any]:
    x, y = make_regression(1024, 1, noise=0.01, seed=data_seed()).tensors
    counts = torch.round((y + 1) * 3)  # count targets 0..6, about one in twelve is 0
    train, val = train_val_split(x, counts, val_fraction=0.2, seed=data_seed())
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([1, 64, 64, 1], flatten=False)

    def rmsle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The bug: log instead of log1p, of a zero count (and of raw, possibly negative predictions).
        return (torch.log(pred) - torch.log(target)).pow(2).mean()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return make_parts(model, optimizer, train_loader, val_loader, loss_fn=rmsle)


def _non_finite_input(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    x, y = train.tensors
    x = x.clone()
    gen = torch.Generator().manual_seed(data_seed())
    rows = torch.randperm(len(x), generator=gen)[: len(x) // 10]
    x[rows, 0, 3, 3] = float("nan")  # missing values never cleaned
    train_loader, val_loader = loaders(TensorDataset(x, y), val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


def _nan_grad(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed(), standardize=False)  # raw counts 0..16, many exact zeros
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = SqrtMLP(64, 64, 10)
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


def _typo_in_loss(seed: int) -> dict[str, Any]:
    parts = build_mlp_digits(seed)

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target.lables)  # the bug: a typo, raises AttributeError

    parts["loss_fn"] = loss_fn
    return parts


def _exploding(seed: int) -> dict[str, Any]:
    model = mlp([64] + [64] * 12 + [10])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(
                m.weight, std=3.5 / m.in_features**0.5
            )  # 2.5x Kaiming: activations grow per layer
            nn.init.zeros_(m.bias)
    return _mlp_parts(model, torch.optim.SGD(model.parameters(), lr=1e-4))


def _vanishing(seed: int) -> dict[str, Any]:
    model = mlp([64] + [64] * 10 + [10], act="sigmoid")
    return _mlp_parts(model, _sgd(model))


def _dead_relu(seed: int) -> dict[str, Any]:
    model = mlp([64, 128, 10])
    nn.init.constant_(model.fc1.bias, -4.0)  # every hidden unit starts (and stays) below zero
    return _mlp_parts(model, _sgd(model))


def _zero_init(seed: int) -> dict[str, Any]:
    model = mlp([64, 64, 64, 10])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    return _mlp_parts(model, _sgd(model))


# ---------------------------------------------------------------------- loss wiring
def _softmax_before_ce(seed: int) -> dict[str, Any]:
    model = mlp([64, 64, 10], final=nn.Softmax(dim=1))
    return _mlp_parts(model, _sgd(model))


def _shape_broadcast(seed: int) -> dict[str, Any]:
    return build_regression(seed, flat_targets=True)  # the bug: targets [N] against predictions [N, 1]


def _sum_reduction(seed: int) -> dict[str, Any]:
    parts = build_mlp_digits(seed, lr=0.002)
    parts["loss_fn"] = nn.CrossEntropyLoss(reduction="sum")
    return parts


# ---------------------------------------------------------------------- architecture
def _missing_activation(seed: int) -> dict[str, Any]:
    model = mlp([64, 64, 64, 10], act=None)  # Linear -> Linear -> Linear: one linear map
    return _mlp_parts(model, _sgd(model))


def _dropout_too_high(seed: int) -> dict[str, Any]:
    model = mlp([64, 128, 10], dropout=0.8)
    return _mlp_parts(model, _sgd(model))


def _eval_mode(seed: int) -> dict[str, Any]:
    parts = build_cnn_bn_digits(seed, dropout=0.3)
    parts["model"].eval()  # the bug: left in eval mode after a validation pass
    return parts


def _bn_small_batch(seed: int) -> dict[str, Any]:
    return build_cnn_bn_digits(seed, batch_size=2)


# ---------------------------------------------------------------------- data
def _unnormalized(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed(), standardize=False)
    # Raw 0..16 pixels scaled to 0..256, like uint8 images fed without ToTensor/Normalize.
    train = TensorDataset(train.tensors[0] * 16, train.tensors[1])
    val = TensorDataset(val.tensors[0] * 16, val.tensors[1])
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, torch.optim.SGD(model.parameters(), lr=1e-3), train_loader, val_loader)


def _unshuffled(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    x, y = train.tensors
    order = torch.argsort(y, stable=True)  # the bug: sorted by label and never shuffled
    train_loader, val_loader = loaders(TensorDataset(x[order], y[order]), val, batch_size=32, shuffle=False)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


def _class_imbalance(seed: int) -> dict[str, Any]:
    return build_gaussian_rmsprop(seed, weights=[0.94, 0.02, 0.02, 0.02])


def _overfitting(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    x, y = train.tensors
    small = TensorDataset(x[:50], y[:50])  # 50 training examples for a 300k-parameter model
    train_loader, val_loader = loaders(small, val, batch_size=25)
    model = mlp([64, 512, 512, 10])
    return _mlp_parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), train_loader, val_loader)


def _batch_mixing(seed: int) -> dict[str, Any]:
    return build_sequence(seed, mix_batch=True)


def _channel_order(seed: int) -> dict[str, Any]:
    return build_rgb(seed, reshape_bug=True)


def _labels_decoupled(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    x, y = train.tensors
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed()))]
    train_loader, val_loader = loaders(
        TensorDataset(x, shuffled), val, batch_size=64
    )  # labels shuffled alone
    model = mlp([64, 64, 10])
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


def _data_leakage(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    xt, yt = train.tensors
    xv, yv = val.tensors
    # The bug: the validation set was drawn from the full data after training examples were chosen.
    k = len(xv) // 2
    leaky_val = TensorDataset(torch.cat([xt[:k], xv[k:]]), torch.cat([yt[:k], yv[k:]]))
    train_loader, val_loader = loaders(train, leaky_val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


def _train_val_shift(seed: int) -> dict[str, Any]:
    train, _ = digits_datasets(data_seed())
    _, raw_val = digits_datasets(data_seed(), standardize=False)  # the bug: validation never normalized
    raw_val = TensorDataset(raw_val.tensors[0] * 16, raw_val.tensors[1])
    train_loader, val_loader = loaders(train, raw_val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, _sgd(model), train_loader, val_loader)


# ---------------------------------------------------------------------- stage errors
def _target_out_of_range(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    train = TensorDataset(train.tensors[0], train.tensors[1] + 1)  # labels 1..10 for 10 outputs
    val = TensorDataset(val.tensors[0], val.tensors[1] + 1)
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, torch.optim.SGD(model.parameters(), lr=0.05), train_loader, val_loader)


def _shape_mismatch(seed: int) -> dict[str, Any]:
    model = mlp([32, 64, 10])  # expects 32 features; digits have 64
    return _mlp_parts(model, torch.optim.SGD(model.parameters(), lr=0.05))


def _dtype_mismatch(seed: int) -> dict[str, Any]:
    train, val = digits_datasets(data_seed())
    train = TensorDataset(train.tensors[0].double(), train.tensors[1])  # float64 from numpy
    train_loader, val_loader = loaders(train, val, batch_size=64)
    model = mlp([64, 64, 10])
    return _mlp_parts(model, torch.optim.SGD(model.parameters(), lr=0.05), train_loader, val_loader)


def _inplace(seed: int) -> dict[str, Any]:
    model = InplaceMLP(64, 64, 10)
    return _mlp_parts(model, _sgd(model))


def _loss_plateau(seed: int) -> dict[str, Any]:
    train, val = _split(make_regression(1024, 1, noise=0.01, seed=data_seed()))
    train_loader, val_loader = loaders(train, val, batch_size=32)
    model = nn.Sequential(nn.Linear(1, 1))  # a straight line cannot follow sin(8x): stuck at the variance
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    return make_parts(model, optimizer, train_loader, val_loader, loss_fn=nn.MSELoss())


# ---------------------------------------------------------------------- registry
_BROKEN: tuple[tuple[str, Any, tuple[str, ...], str, str, str, dict[str, Any], tuple[str, ...]], ...] = (
    # name, builder, expected codes, twin, description, fix, run, checks
    (
        "head-not-in-optimizer",
        _head_not_in_optimizer,
        ("param-not-in-optimizer",),
        "finetune-digits",
        "Fine-tuning where the optimizer was built from model.parameters() before model.head was replaced, "
        "so the new head is in no optimizer group and never trains.",
        "Build the optimizer after replacing the head.",
        {"epochs": 1},
        (),
    ),
    (
        "frozen-but-moving",
        _frozen_but_moving,
        ("frozen-param-changed",),
        "finetune-frozen-digits",
        "The backbone is frozen with requires_grad=False but stays in an SGD optimizer with momentum and "
        "weight decay whose zero_grad() zeroes in place, so its stale zero gradients still move it.",
        "Build the optimizer from the head's parameters only (or zero_grad(set_to_none=True)).",
        {"steps": 20},
        (),
    ),
    (
        "frozen-bn-stats-drift",
        _frozen_bn_drift,
        ("frozen-bn-stats-drift",),
        "finetune-frozen-digits",
        "The backbone's weights are frozen but its batch-norm layers stay in train mode, so their running "
        "statistics drift away from the pretrained ones.",
        "Call model.backbone.eval() (after every model.train()).",
        {"steps": 20},
        (),
    ),
    (
        "nothing-trainable",
        _nothing_trainable,
        ("nothing-trainable",),
        "finetune-frozen-digits",
        "model.requires_grad_(False) froze everything, the new head included, so nothing can learn.",
        "Freeze only the backbone: model.backbone.requires_grad_(False).",
        {"steps": 5},
        (),
    ),
    (
        "head-lr-zero",
        _head_lr_zero,
        ("param-not-updating",),
        "finetune-digits",
        "The head's optimizer group has lr=0, so the head gets gradients but never changes.",
        "Give the head's group a learning rate, e.g. 3e-3.",
        {"steps": 20},
        (),
    ),
    (
        "detached",
        _detached,
        ("disconnected-param",),
        "mlp-digits",
        "forward() calls .detach() on the hidden features, so the first layer gets no gradient.",
        "Remove the .detach() from forward().",
        {"steps": 20},
        (),
    ),
    (
        "lr-too-high",
        _lr_too_high,
        ("lr-too-high",),
        "mlp-digits",
        "The MLP on digits with SGD at lr 2.0 (momentum 0.9): every step overshoots (and kills ReLU units).",
        "Lower the learning rate to about 0.05.",
        {"epochs": 2},
        (),
    ),
    (
        "lr-too-low",
        _lr_too_low,
        ("lr-too-low",),
        "mlp-digits",
        "The MLP on digits with plain SGD at lr 1e-5: the weights barely move.",
        "Raise the learning rate to about 0.05 (with momentum 0.9).",
        {"epochs": 2},
        (),
    ),
    (
        "scheduler-too-fast",
        _scheduler_too_fast,
        ("scheduler-too-fast",),
        "mlp-digits",
        "StepLR(step_size=5, gamma=0.1), meant per epoch, is stepped after every batch: the LR is 1e-9 of "
        "its start within the first epoch.",
        "Step the scheduler once per epoch (scheduler_interval='epoch').",
        {"epochs": 2},
        (),
    ),
    (
        "over-regularization",
        _over_regularization,
        ("over-regularization",),
        "mlp-digits",
        "SGD with weight_decay=1.0: the decay pulls the weights to zero harder than the data gradient.",
        "Use weight_decay around 1e-4.",
        {"epochs": 2},
        (),
    ),
    (
        "nan-loss",
        _nan_loss,
        ("non-finite-loss",),
        "regression-mlp",
        "A hand-written RMSLE on count targets uses log instead of log1p: log(0) = -inf for zero counts (and "
        "log of a negative raw prediction is NaN), so the loss is not finite.",
        "Use torch.log1p on targets and on predictions made non-negative (e.g. softplus), or use MSE.",
        {"steps": 5},
        (),
    ),
    (
        "non-finite-input",
        _non_finite_input,
        ("non-finite-input",),
        "mlp-digits",
        "One in ten training images has a NaN pixel (missing values never cleaned).",
        "Clean the data: drop or impute the NaN values.",
        {"steps": 5},
        (),
    ),
    (
        "nan-grad",
        _nan_grad,
        ("non-finite-grad",),
        "mlp-digits",
        "A learnable square-root transform of raw pixel counts, sqrt(gain * x), without an eps: the forward "
        "pass is finite, but at the zero counts the gradient of gain is 0 * inf = NaN.",
        "Add an eps inside the sqrt: torch.sqrt(gain * x + 1e-6).",
        {"steps": 5},
        (),
    ),
    (
        "exploding-gradients",
        _exploding,
        ("exploding-gradients",),
        "mlp-digits",
        "A 13-layer ReLU MLP initialized at 2.5 times the Kaiming scale: activations and gradients grow "
        "with every layer (the initial loss is in the tens of thousands or more).",
        "Use PyTorch's default (or Kaiming) initialization, normalization layers, or gradient clipping.",
        {"steps": 30},
        (),
    ),
    (
        "vanishing-gradients",
        _vanishing,
        ("vanishing-gradients",),
        "mlp-digits",
        "An 11-layer sigmoid MLP: each sigmoid shrinks the gradient, so the first layers barely learn.",
        "Use ReLU activations (with Kaiming init) or add batch norm / residual connections.",
        {"steps": 40},
        (),
    ),
    (
        "dead-relu",
        _dead_relu,
        ("dead-relu",),
        "mlp-digits",
        "The hidden layer's biases start at -4, so almost every ReLU unit outputs zero for every input.",
        "Initialize biases at zero (PyTorch's default init).",
        {"steps": 30},
        (),
    ),
    (
        "zero-init",
        _zero_init,
        ("zero-init",),
        "mlp-digits",
        "Every Linear weight is initialized to zero, so all units of a layer stay identical.",
        "Use random initialization (PyTorch's default).",
        {"steps": 20},
        (),
    ),
    (
        "softmax-before-ce",
        _softmax_before_ce,
        ("softmax-before-loss",),
        "mlp-digits",
        "The model ends with nn.Softmax and feeds probabilities to nn.CrossEntropyLoss, which expects "
        "logits.",
        "Remove the final Softmax.",
        {"epochs": 1},
        (),
    ),
    (
        "shape-broadcast",
        _shape_broadcast,
        ("shape-broadcast",),
        "regression-mlp",
        "MSELoss gets predictions of shape [N, 1] and targets of shape [N], which broadcast to [N, N].",
        "Keep targets as [N, 1] (or squeeze the output).",
        {"epochs": 2},
        (),
    ),
    (
        "sum-reduction",
        _sum_reduction,
        ("loss-sum-reduction",),
        "mlp-digits",
        "CrossEntropyLoss(reduction='sum'): the gradient, and so the effective learning rate, scales with "
        "the batch size.",
        "Use reduction='mean' (the default).",
        {"epochs": 1},
        (),
    ),
    (
        "missing-activation",
        _missing_activation,
        ("missing-activation",),
        "mlp-digits",
        "Three Linear layers with no nonlinearity between them collapse into one linear map.",
        "Put nn.ReLU() between the Linear layers.",
        {"epochs": 1},
        (),
    ),
    (
        "dropout-too-high",
        _dropout_too_high,
        ("dropout-too-high",),
        "mlp-digits",
        "nn.Dropout(p=0.8) after the hidden layer drops most units at every step.",
        "Use p between 0.1 and 0.5.",
        {"epochs": 1},
        (),
    ),
    (
        "eval-mode-training",
        _eval_mode,
        ("eval-mode-training",),
        "cnn-bn-digits",
        "The CNN (batch norm, dropout) was left in eval mode: batch norm normalizes with its running "
        "statistics and dropout is off during training.",
        "Call model.train() before training.",
        {"steps": 20},
        (),
    ),
    (
        "bn-small-batch",
        _bn_small_batch,
        ("bn-small-batch",),
        "cnn-bn-digits",
        "The batch-norm CNN trains on batches of 2, so the batch statistics are noise.",
        "Use batches of 16 or more (or GroupNorm).",
        {"steps": 30},
        (),
    ),
    (
        "unnormalized-input",
        _unnormalized,
        ("input-not-normalized",),
        "mlp-digits",
        "Raw pixel values 0..256 are fed to the MLP without normalization.",
        "Standardize the inputs (subtract the mean, divide by the standard deviation).",
        {"epochs": 1},
        (),
    ),
    (
        "unshuffled-data",
        _unshuffled,
        ("unshuffled-data",),
        "mlp-digits",
        "The training set is sorted by label and the loader does not shuffle, so each batch holds one class.",
        "Pass shuffle=True to the training DataLoader.",
        {"epochs": 1},
        (),
    ),
    (
        "class-imbalance",
        _class_imbalance,
        ("class-imbalance",),
        "gaussian-rmsprop",
        "94% of the Gaussian-cluster labels are class 0.",
        "Balance the classes (resample or weight the loss).",
        {"epochs": 1},
        (),
    ),
    (
        "overfitting",
        _overfitting,
        ("overfitting",),
        "mlp-digits",
        "A 300k-parameter MLP trained for many epochs on 50 digits: training loss falls, validation loss "
        "rises.",
        "Use more data, fewer epochs (early stopping) or regularization.",
        {"epochs": 30},
        (),
    ),
    (
        "batch-mixing",
        _batch_mixing,
        ("batch-mixing",),
        "sequence-gru",
        "The GRU's input is made time-major with x.view(T, N, F) instead of x.transpose(0, 1), so each "
        "sequence is stitched together from several examples.",
        "Use x.transpose(0, 1) (or nn.GRU(..., batch_first=True)).",
        {"epochs": 1},
        ("batch-independence",),
    ),
    (
        "channel-order",
        _channel_order,
        ("channel-order",),
        "rgb-cnn",
        "RGB images stored [N, H, W, C] are turned into [N, C, H, W] with .view instead of .permute, so each "
        "channel holds interleaved pixels.",
        "Use x.permute(0, 3, 1, 2).",
        {"epochs": 1},
        ("channel-order",),
    ),
    (
        "labels-decoupled",
        _labels_decoupled,
        ("labels-decoupled",),
        "mlp-digits",
        "The training labels were shuffled separately from the images, so they say nothing about the inputs.",
        "Shuffle inputs and labels together (one index permutation).",
        {"epochs": 1},
        ("labels-decoupled",),
    ),
    (
        "data-leakage",
        _data_leakage,
        ("data-leakage",),
        "mlp-digits",
        "Half of the validation examples are copies of training examples.",
        "Split once into disjoint sets.",
        {"epochs": 1},
        ("data-leakage",),
    ),
    (
        "train-val-shift",
        _train_val_shift,
        ("train-val-shift",),
        "mlp-digits",
        "The training images are standardized but the validation images are raw 0..256 pixels.",
        "Apply the same normalization to both sets.",
        {"epochs": 1},
        ("train-val-shift",),
    ),
    (
        "target-out-of-range",
        _target_out_of_range,
        ("target-out-of-range",),
        "mlp-digits",
        "Labels run 1..10 for a model with 10 outputs (valid class indices are 0..9).",
        "Subtract 1 from the labels.",
        {"steps": 1},
        (),
    ),
    (
        "shape-mismatch",
        _shape_mismatch,
        ("shape-mismatch",),
        "mlp-digits",
        "The first Linear layer expects 32 features but the flattened digits have 64.",
        "Use nn.Linear(64, ...).",
        {"steps": 1},
        (),
    ),
    (
        "dtype-mismatch",
        _dtype_mismatch,
        ("dtype-mismatch",),
        "mlp-digits",
        "The training images are float64 (straight from numpy) while the model is float32.",
        "Convert the inputs with .float().",
        {"steps": 1},
        (),
    ),
    (
        "inplace-modification",
        _inplace,
        ("inplace-modification",),
        "mlp-digits",
        "forward() subtracts in place (h -= 0.5) from a sigmoid output that autograd saved for backward, so "
        "backward() fails.",
        "Use the out-of-place form: h = h - 0.5.",
        {"steps": 1},
        (),
    ),
    (
        "loss-typo",
        _typo_in_loss,
        ("stage-error",),
        "mlp-digits",
        "The loss function reads target.lables (a typo), so the LOSS stage raises AttributeError.",
        "Fix the typo: use the target tensor itself.",
        {"steps": 1},
        (),
    ),
    (
        "loss-plateau",
        _loss_plateau,
        ("loss-plateau",),
        "regression-mlp",
        "A single Linear(1, 1) regresses sin(8 (x - 1.2)): the loss drops to the target variance and stays.",
        "Use a model with enough capacity (a hidden layer with a nonlinearity).",
        {"epochs": 8},
        (),
    ),
)

for _name, _builder, _codes, _twin, _desc, _fix, _run, _checks in _BROKEN:
    register(
        Setup(
            _name,
            _desc,
            _builder,
            expected=_codes,
            healthy=False,
            twin=_twin,
            checks=_checks,
            run=_run,
            fix=_fix,
        )
    )
del _name, _builder, _codes, _twin, _desc, _fix, _run, _checks
