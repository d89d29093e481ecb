"""zoo.digits: offline digits tensors, class splits, the backbone, and its pretrained weights
(shipped file, user cache with atomic writes, deterministic training, weights_only loading)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tlwidgets.diagnostics.checks_data import check_data_leakage
from tlwidgets.zoo import digits

torch.set_num_threads(1)


def test_digits_tensors_match_scikit_learn_and_are_standardized():
    from sklearn.datasets import load_digits

    raw, labels = digits.load_digits_tensors(standardize=False)
    ref = load_digits()
    assert raw.shape == (1797, 1, 8, 8) and raw.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(raw[:, 0], torch.tensor(ref.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(ref.target))
    x, _ = digits.load_digits_tensors()
    naive = (raw - raw.mean()) / raw.std()
    assert torch.allclose(x, naive) and abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0)
    x[0] = 99.0  # callers get their own copy
    assert float(digits.load_digits_tensors()[0][0].max()) < 99


def test_split_by_class_for_transfer_learning():
    split = digits.split_digits(pretrain_classes=(0, 1, 2, 3, 4), val_fraction=0.25, seed=0)
    x, y = digits.load_digits_tensors()
    assert split.pretrain_classes == (0, 1, 2, 3, 4) and split.finetune_classes == (5, 6, 7, 8, 9)
    assert len(split.pretrain) == int((y < 5).sum())
    n_ft = len(split.finetune_train) + len(split.finetune_val)
    assert n_ft == int((y >= 5).sum()) and len(split.finetune_val) == round(n_ft * 0.25)
    for ds, k in ((split.pretrain, 5), (split.finetune_train, 5), (split.finetune_val, 5)):
        labels = ds.tensors[1]
        assert set(labels.tolist()) == set(range(k))
    assert check_data_leakage(split.finetune_train.tensors, split.finetune_val.tensors) is None
    assert check_data_leakage(split.pretrain.tensors, split.finetune_val.tensors) is None
    # a digit 5 image is labelled 0 in the fine-tuning part
    five = x[y == 5][0]
    ft_x = torch.cat([split.finetune_train.tensors[0], split.finetune_val.tensors[0]])
    ft_y = torch.cat([split.finetune_train.tensors[1], split.finetune_val.tensors[1]])
    match = (ft_x.flatten(1) == five.flatten()).all(1)
    assert ft_y[match].tolist() == [0]
    with pytest.raises(ValueError):
        digits.split_digits(pretrain_classes=range(10))


def test_backbone_shape_size_and_batch_norm():
    backbone = digits.DigitsBackbone()
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 3000 <= n_params <= 10000
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    out = backbone(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, digits.DigitsBackbone.out_features)
    net = digits.DigitsNet(backbone, nn.Linear(128, 5))
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    assert {n.split(".")[0] for n, _ in net.named_parameters()} == {"backbone", "head"}


def _linear_probe(backbone: nn.Module, split: digits.DigitsSplit) -> tuple[float, float]:
    """Validation (loss, accuracy) of a linear head trained 2 epochs on frozen features."""
    torch.manual_seed(0)
    backbone.eval()
    with torch.no_grad():
        ft = backbone(split.finetune_train.tensors[0])
        fv = backbone(split.finetune_val.tensors[0])
    yt, yv = split.finetune_train.tensors[1], split.finetune_val.tensors[1]
    head = nn.Linear(digits.DigitsBackbone.out_features, 5)
    opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        perm = torch.randperm(len(ft))
        for i in range(0, len(ft), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(head(ft[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        out = head(fv)
    return float(nn.functional.cross_entropy(out, yv)), float((out.argmax(1) == yv).float().mean())


def test_shipped_backbone_is_loaded_safely_and_transfers():
    assert digits.BACKBONE_FILE.exists() and digits.BACKBONE_FILE.stat().st_size < 100 * 1024
    state = torch.load(digits.BACKBONE_FILE, map_location="cpu", weights_only=True)
    backbone = digits.pretrained_backbone()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k])
    assert backbone.training and backbone is not digits.pretrained_backbone()  # fresh objects
    split = digits.split_digits()
    loss, accuracy = _linear_probe(backbone, split)
    torch.manual_seed(1)
    random_loss, random_accuracy = _linear_probe(digits.DigitsBackbone(), split)
    # features learnt on digits 0-4 serve the unseen digits 5-9: a short linear probe on them works,
    # the same probe on a randomly initialized backbone does not
    assert accuracy > 0.9 and loss < 0.3
    assert random_accuracy < accuracy - 0.2 and random_loss > 3 * loss


def test_training_is_deterministic_cached_atomically_and_leaves_the_rng_alone(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_pretrained", os.path.join(os.path.dirname(__file__), "..", "scripts", "build_pretrained.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "from_script.pt"
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    assert script.main(["--out", str(out)]) == 0
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    scripted = torch.load(out, map_location="cpu", weights_only=True)

    cache = tmp_path / "cache"
    trained = digits.pretrained_backbone(cache, use_packaged=False)  # no cache yet: trains and writes it
    files = sorted(p.name for p in cache.iterdir())
    assert files == ["digits_backbone-v1.pt"]  # no temporary file left behind
    for k, v in trained.state_dict().items():
        assert torch.equal(v, scripted[k]), f"training is not deterministic ({k})"

    def no_training(**_):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(digits, "train_backbone", no_training)
    cached = digits.pretrained_backbone(cache, use_packaged=False)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), trained.state_dict().values()))
    monkeypatch.setenv("TLWIDGETS_CACHE", str(cache))
    assert digits.default_cache_dir() == cache
    digits.pretrained_backbone(use_packaged=False)  # found through the environment variable


def test_a_corrupt_cache_is_replaced(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "digits_backbone-v1.pt").write_bytes(b"not a checkpoint")
    calls = []
    real = digits.DigitsBackbone

    def fake_training(**_):
        calls.append(1)
        torch.manual_seed(7)
        return real(), 1.0

    monkeypatch.setattr(digits, "train_backbone", fake_training)
    model = digits.pretrained_backbone(cache, use_packaged=False)
    assert calls == [1]
    reloaded = torch.load(cache / "digits_backbone-v1.pt", weights_only=True)
    assert all(torch.equal(v, reloaded[k]) for k, v in model.state_dict().items())
