"""Data checks: data-leakage, train-val-shift and channel-order, on injected bugs and their healthy twins."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tlwidgets.diagnostics.checks_data import (
    as_batches,
    check_channel_order,
    check_data_leakage,
    check_train_val_shift,
)
from tlwidgets.zoo import load_digits_tensors
from tlwidgets.zoo.datasets import make_rgb_digits


def _rng_state():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _rng_equal(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ---------------------------------------------------------------------- layouts
def test_as_batches_accepts_the_usual_layouts():
    x, y = torch.randn(600, 3), torch.arange(600)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    for data in (loader, TensorDataset(x, y), (x, y), [(x[:300], y[:300]), (x[300:], y[300:])]):
        xs = torch.cat([b[0] for b in as_batches(data)])
        assert torch.equal(xs, x)
    only_inputs = list(as_batches(x))
    assert torch.equal(torch.cat([b for b, _ in only_inputs]), x) and only_inputs[0][1] is None
    dicts = [{"image": x[:10], "label": y[:10]}]
    assert torch.equal(next(iter(as_batches(dicts)))[0], x[:10])
    with pytest.raises(TypeError):
        as_batches(3)


# ---------------------------------------------------------------------- leakage
def test_leakage_counts_copied_validation_examples():
    x, y = load_digits_tensors()
    train = TensorDataset(x[:1000], y[:1000])
    val = TensorDataset(torch.cat([x[:37], x[1000:1300]]), torch.cat([y[:37], y[1000:1300]]))
    f = check_data_leakage(DataLoader(train, batch_size=64, shuffle=True), val)
    assert f is not None and f.code == "data-leakage" and f.severity == "error"
    assert f.evidence["leaked"] == 37 and f.evidence["val_examples"] == 337
    assert f.evidence["fraction"] == pytest.approx(37 / 337)
    assert f.evidence["val_indices"][:3] == [0, 1, 2]


def test_leakage_is_silent_on_disjoint_splits_and_mild_on_a_few_duplicates():
    x, y = load_digits_tensors()
    assert check_data_leakage((x[:1000], y[:1000]), (x[1000:], y[1000:])) is None
    # one shared example in 797: below min_fraction, reported as info only
    f = check_data_leakage((x[:1000], y[:1000]), (torch.cat([x[:1], x[1001:]]), torch.cat([y[:1], y[1001:]])))
    assert f is not None and f.severity == "info" and f.evidence["leaked"] == 1


def test_leakage_hashes_exact_values_dtype_and_all_input_tensors():
    a = torch.zeros(4, 3)
    b = a.clone()
    b[2, 1] = -0.0  # the same value
    assert check_data_leakage((a, torch.zeros(4)), (b[2:3], torch.zeros(1))) is not None
    c = a.clone()
    c[0, 0] = 1e-7  # one ulp-scale change is a different example
    assert check_data_leakage((a[1:], torch.zeros(3)), (c[:1], torch.zeros(1))) is None
    assert check_data_leakage((a, torch.zeros(4)), (a.double()[:2], torch.zeros(2))) is None  # other dtype
    # dict inputs: both tensors count; equal images with different metadata are different examples
    train = [{"img": a, "meta": torch.arange(4.0)[:, None], "label": torch.zeros(4)}]
    val = [{"img": a[:2], "meta": torch.tensor([[0.0], [9.0]]), "label": torch.zeros(2)}]
    f = check_data_leakage(train, val)
    assert f is not None and f.evidence["leaked"] == 1 and f.evidence["val_indices"] == [0]


def test_data_checks_leave_the_global_rng_alone():
    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    before = _rng_state()
    check_data_leakage(loader, loader)
    check_train_val_shift(loader, loader)
    check_channel_order(loader)
    assert _rng_equal(before, _rng_state())


# ---------------------------------------------------------------------- shift
def test_shift_flags_a_validation_set_left_unnormalized():
    x, y = load_digits_tensors()
    raw, _ = load_digits_tensors(standardize=False)
    f = check_train_val_shift((x[:1400], y[:1400]), (raw[1400:] * 16, y[1400:]))
    assert f is not None and f.code == "train-val-shift" and f.severity == "warning"
    # one channel: the scale ratio is the ratio of standard deviations (naive computation)
    expected = float((raw[1400:] * 16).std() / x[:1400].std())
    assert f.evidence["val_over_train_scale"] == pytest.approx(expected, rel=1e-4)
    assert "scale" in f.message


def test_shift_is_silent_on_a_random_split():
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    x, y = x[perm], y[perm]
    assert check_train_val_shift((x[:1400], y[:1400]), (x[1400:], y[1400:])) is None
    flat = x.flatten(1)  # per-pixel features (64 columns, several constant ones)
    assert check_train_val_shift((flat[:1400], y[:1400]), (flat[1400:], y[1400:])) is None


def test_shift_standardized_mean_difference_per_feature():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(2000, 6, generator=g)
    val = torch.randn(500, 6, generator=g)
    val[:, :4] += 3.0  # 4 of 6 features moved by 3 standard deviations
    f = check_train_val_shift(train, val)
    assert f is not None and f.evidence["shifted_features"] == 4 and f.evidence["features"] == 6
    smd = (train.double().mean(0) - val.double().mean(0)).abs() / torch.sqrt(
        (train.double().var(0) + val.double().var(0)) / 2
    )
    assert f.evidence["max_smd"] == pytest.approx(float(smd.max()), rel=1e-9)
    val2 = torch.randn(500, 6, generator=g)
    val2[:, :2] += 3.0  # only a third shifted: below min_fraction
    assert check_train_val_shift(train, val2) is None
    # a feature constant in both sets at different values counts as shifted
    t, v = torch.zeros(50, 2), torch.zeros(50, 2)
    v[:, 0] = 1.0
    v[:, 1] = torch.randn(50, generator=g)
    t[:, 1] = torch.randn(50, generator=g)
    f = check_train_val_shift(t, v, min_fraction=0.5)
    assert f is not None and f.evidence["constant_features_differing"] == 1


# ---------------------------------------------------------------------- channel order
def _smooth_rgb(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields [N, H, W, 3] (channels-last, correlated channels like photos)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])
    coarse = torch.einsum("ij,njhw->nihw", mix, coarse)  # correlated channels
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fields.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("size", [8, 16, 32])
def test_channel_order_on_smooth_colour_fields(size):
    hwc = _smooth_rgb(64, size, seed=size)
    n = hwc.shape[0]
    good = hwc.permute(0, 3, 1, 2)
    bad = hwc.view(n, 3, size, size)
    assert check_channel_order(good) is None
    f = check_channel_order(bad)
    assert f is not None and f.code == "channel-order" and f.severity == "error"
    assert f.evidence["ratio"] < 0.5 and f.evidence["shape"] == (n, 3, size, size)
    # the same bug with reshape, and uint8 images
    u8 = ((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255).to(torch.uint8)
    assert check_channel_order(u8.reshape(n, 3, size, size)) is not None
    assert check_channel_order(u8.permute(0, 3, 1, 2)) is None


def test_channel_order_on_rgb_digits_and_channels_last_models():
    hwc, _ = make_rgb_digits(0)
    n, h, w, c = hwc.shape
    assert check_channel_order(hwc.permute(0, 3, 1, 2)) is None
    assert check_channel_order(hwc.view(n, c, h, w)) is not None
    # A channels-last model (channel_dim=3) fed correct NHWC data is fine.
    assert check_channel_order(hwc, channel_dim=3) is None
    # Grey digits replicated into three channels (R = G = B) and wrongly viewed.
    grey, _ = load_digits_tensors()
    up = F.interpolate(grey, size=(16, 16), mode="bilinear", align_corners=False)
    rgb_hwc = up.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous()
    assert check_channel_order(rgb_hwc.view(len(up), 3, 16, 16)) is not None
    assert check_channel_order(rgb_hwc.permute(0, 3, 1, 2)) is None


def test_channel_order_ignores_what_it_cannot_judge():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 3, 16, 16, generator=g)
    assert check_channel_order(noise) is None  # no spatial structure either way
    grey, _ = load_digits_tensors()
    assert check_channel_order(grey) is None  # one channel: a view cannot interleave
    assert check_channel_order(torch.randn(8, 64)) is None  # not images
    loader = DataLoader(TensorDataset(grey, torch.zeros(len(grey))), batch_size=32)
    assert check_channel_order(loader) is None
