"""Small models for the zoo: each one is a few thousand parameters and trains in seconds on a CPU."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "DetachedMLP",
    "InplaceMLP",
    "PatchNet",
    "RGBNet",
    "SequenceNet",
    "SmallCNN",
    "SqrtMLP",
    "mlp",
]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def mlp(
    sizes: Sequence[int],
    *,
    act: str | None = "relu",
    dropout: float = 0.0,
    flatten: bool = True,
    final: nn.Module | None = None,
) -> nn.Sequential:
    """A multilayer perceptron with readable layer names (``fc1``, ``relu1``, ``drop1``, ``fc2``, ...).

    Parameters
    ----------
    sizes
        ``[in_features, hidden..., out_features]``.
    act
        Activation between layers (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"gelu"``), or
        ``None`` for none at all (a stack of linear maps).
    dropout
        Dropout probability after each hidden activation (0: no dropout layer).
    flatten
        Start with ``nn.Flatten()`` so image batches can be fed directly.
    final
        An extra module after the last layer (e.g. ``nn.Softmax(dim=1)``).
    """
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())] if flatten else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append((f"fc{i}", nn.Linear(a, b)))
        if i < len(sizes) - 1:
            if act is not None:
                layers.append((f"{act}{i}", _ACTS[act]()))
            if dropout:
                layers.append((f"drop{i}", nn.Dropout(dropout)))
    if final is not None:
        layers.append(("final", final))
    return nn.Sequential(collections.OrderedDict(layers))


class DetachedMLP(nn.Module):
    """A two-layer MLP whose forward detaches the hidden features: ``fc1`` never gets a gradient."""

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1))).detach()  # the bug: cuts fc1 out of the graph
        return self.fc2(h)


class InplaceMLP(nn.Module):
    """A two-layer MLP whose forward shifts the sigmoid output in place: backward() then fails.

    ``torch.sigmoid`` saves its output for the backward pass; ``h += ...``
    overwrites it, so autograd raises "modified by an inplace operation".
    """

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.fc1(x.flatten(1)))
        h -= 0.5  # the bug: in place on a tensor autograd saved (write h = h - 0.5)
        return self.fc2(h)


class SqrtMLP(nn.Module):
    """An MLP on raw counts with a learnable square-root transform, ``sqrt(gain * x)``, without an eps.

    The forward pass is finite (``sqrt(0) = 0``), but where a count is 0 the
    derivative of ``sqrt`` is infinite and the chain rule multiplies it by
    ``x = 0``: ``gain`` gets a NaN gradient.
    """

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 10) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sqrt(self.gain * x.flatten(1))  # the bug: no eps inside the sqrt, and x has zeros
        return self.fc2(torch.relu(self.fc1(h)))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear classifier for 8x8 single-channel images.

    Parameters
    ----------
    classes
        Output logits.
    batch_norm
        Add ``BatchNorm2d`` after each convolution.
    dropout
        Dropout before the classifier (0: none).
    """

    def __init__(self, classes: int = 10, *, batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(self.drop(x.flatten(1)))


class RGBNet(nn.Module):
    """A small CNN for 3-channel 16x16 images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class PatchNet(nn.Module):
    """Regress the box ``(x0, y0, x1, y1)`` of the bright square in a 16x16 patch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class SequenceNet(nn.Module):
    """Classify ``[N, T, F]`` sequences with a time-major GRU.

    ``nn.GRU`` defaults to ``batch_first=False`` and wants ``[T, N, F]``.
    With ``mix_batch=True`` the forward uses ``x.view(T, N, F)`` instead of
    ``x.transpose(0, 1)``: the shapes fit, but each "sequence" the GRU sees is
    stitched together from several examples (the ``batch-mixing`` bug).
    """

    def __init__(
        self, features: int = 2, hidden: int = 32, classes: int = 3, *, mix_batch: bool = False
    ) -> None:
        super().__init__()
        self.mix_batch = mix_batch
        self.gru = nn.GRU(features, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, f = x.shape
        x = x.view(t, n, f) if self.mix_batch else x.transpose(0, 1)
        _, h = self.gru(x)
        return self.fc(h[-1])
