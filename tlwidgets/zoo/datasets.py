"""Small offline data sets for the zoo (digits variants, sequences, RGB images), all seeded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tlwidgets.zoo.digits import load_digits_tensors, train_val_split

__all__ = ["digits_datasets", "loaders", "make_rgb_digits", "make_sequences"]


def digits_datasets(
    seed: int = 0, *, standardize: bool = True, val_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """All ten digits, ``N x 1 x 8 x 8``, split into disjoint train and validation sets."""
    x, y = load_digits_tensors(standardize=standardize)
    return train_val_split(x, y, val_fraction=val_fraction, seed=seed)


def loaders(
    train: TensorDataset,
    val: TensorDataset | None,
    *,
    batch_size: int = 64,
    shuffle: bool = True,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (shuffled by the global RNG, so a Runner's rewind replays it) and validation loader."""
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    val_loader = DataLoader(val, batch_size=256) if val is not None else None
    return train_loader, val_loader


def make_sequences(
    n: int = 768, *, steps: int = 12, classes: int = 3, noise: float = 0.3, seed: int = 0
) -> TensorDataset:
    """Noisy 2-D oscillations ``[n, steps, 2]``; the class is the frequency.

    Each example is ``(sin(w t + phi), cos(w t + phi)) + noise`` with
    ``w = (class + 1) * 0.5`` and a random phase, so a model must look along
    the time axis of *its own* sequence to classify it.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    t = torch.arange(steps, dtype=torch.float32)
    w = (y.float() + 1) * 0.5
    phase = torch.rand(n, generator=g) * 2 * math.pi
    angle = w[:, None] * t[None, :] + phase[:, None]
    x = torch.stack([angle.sin(), angle.cos()], dim=2)
    x = x + noise * torch.randn(x.shape, generator=g)
    return TensorDataset(x, y.long())


def make_rgb_digits(seed: int = 0, *, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as smooth RGB images stored channels-last: ``[N, size, size, 3]`` and labels.

    Each digit is upsampled (bilinear) and painted with a random colour on a
    random smooth colour gradient, then standardized per channel. The layout
    is channels-last on purpose (like arrays from PIL, OpenCV or numpy):
    convert with ``x.permute(0, 3, 1, 2)``, not ``x.view(N, 3, size, size)``.
    """
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_tensors(standardize=False)
    n = len(x)
    ink = F.interpolate(x / 16.0, size=(size, size), mode="bilinear", align_corners=False)  # N,1,S,S
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.7 + 0.3
    ramp = torch.linspace(0, 1, size)
    gy, gx = torch.meshgrid(ramp, ramp, indexing="ij")
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) * 0.4 for _ in range(3))
    background = a + b * gx + c * gy
    img = background * (1 - ink) + colour * ink
    mean = img.mean(dim=(0, 2, 3), keepdim=True)
    std = img.std(dim=(0, 2, 3), keepdim=True)
    img = (img - mean) / std
    return img.permute(0, 2, 3, 1).contiguous(), y
