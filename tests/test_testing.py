"""tlwidgets.testing: assertions pass on healthy code, raise with names on broken code, restore state;
synthetic data generators match their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlwidgets import testing, zoo
from tlwidgets.zoo.broken import InPlaceZeroGradSGD
from tlwidgets.zoo.models import DetachedMLP, mlp

torch.set_num_threads(1)


@pytest.fixture
def batch():
    x, y = zoo.load_digits_tensors()
    return x[:64], y[:64]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))


# ---------------------------------------------------------------------- assert_params_update
def test_params_update_passes_on_a_healthy_model_and_restores(batch):
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = _weights(model)
    testing.assert_params_update(model, nn.CrossEntropyLoss(), batch, opt)
    testing.assert_params_update(model, nn.CrossEntropyLoss(), batch)  # default optimizer
    assert _unchanged(model, before) and opt.state_dict()["state"] == {}


def test_params_update_names_each_stuck_parameter_and_why(batch):
    torch.manual_seed(0)
    detached = DetachedMLP()
    with pytest.raises(AssertionError) as info:
        testing.assert_params_update(detached, nn.CrossEntropyLoss(), batch)
    text = str(info.value)
    assert "fc1.weight" in text and "fc1.bias" in text and "no gradient" in text and "fc2" not in text

    model = mlp([64, 32, 10])
    opt = torch.optim.SGD(model.fc1.parameters(), lr=0.1)  # fc2 left out of the optimizer
    with pytest.raises(AssertionError, match=r"fc2\.weight: not in any optimizer group"):
        testing.assert_params_update(model, nn.CrossEntropyLoss(), batch, opt)

    opt = torch.optim.SGD(
        [{"params": model.fc1.parameters()}, {"params": model.fc2.parameters(), "lr": 0.0}], lr=0.1
    )
    with pytest.raises(AssertionError, match=r"fc2\.bias: its optimizer group has lr=0"):
        testing.assert_params_update(model, nn.CrossEntropyLoss(), batch, opt)

    dead = mlp([64, 32, 10])
    nn.init.constant_(dead.fc1.bias, -100.0)  # every ReLU off: fc1 gets exactly zero gradient
    with pytest.raises(AssertionError, match=r"fc1\.weight: its gradient is exactly zero"):
        testing.assert_params_update(dead, nn.CrossEntropyLoss(), batch)

    model.fc1.weight.requires_grad_(False)
    with pytest.raises(AssertionError, match=r"fc1\.weight: requires_grad=False"):
        testing.assert_params_update(model, nn.CrossEntropyLoss(), batch, params=["fc1"])
    assert not model.fc1.weight.requires_grad  # flags restored as they were


# ---------------------------------------------------------------------- assert_frozen_unchanged
def _finetune():
    torch.manual_seed(0)
    return zoo.DigitsNet(zoo.pretrained_backbone(), nn.Linear(128, 10))


def test_frozen_unchanged_passes_when_frozen_params_are_left_out(batch):
    model = _finetune()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt)
    testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt, frozen=["backbone"])


def test_frozen_unchanged_catches_weight_decay_on_stale_zero_grads(batch):
    model = _finetune()
    opt = InPlaceZeroGradSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
        p.grad = torch.zeros_like(p)
    before = _weights(model)
    with pytest.raises(AssertionError) as info:
        testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt)
    text = str(info.value)
    assert (
        "backbone.conv1.weight: changed by" in text and "weight_decay=0.01" in text and "momentum=0.9" in text
    )
    assert _unchanged(model, before) and all(bool((p.grad == 0).all()) for p in model.backbone.parameters())
    # with set_to_none=True the same optimizer leaves them alone (grads become None)
    testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt, set_to_none=True)


def test_frozen_unchanged_rejects_names_that_are_not_frozen(batch):
    model = _finetune()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AssertionError, match="still have requires_grad=True"):
        testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt, frozen=["head"])
    with pytest.raises(AssertionError, match="no parameter is frozen"):
        testing.assert_frozen_unchanged(model, nn.CrossEntropyLoss(), batch, opt)


# ---------------------------------------------------------------------- assert_finite
class _LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


class _SqrtLoss(nn.Module):
    def forward(self, out, target):
        return torch.sqrt((out - out.detach()).pow(2).sum())  # value 0, gradient 0/0


def test_finite_passes_and_names_the_first_bad_module(batch):
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    testing.assert_finite(model, batch, loss_fn=nn.CrossEntropyLoss())
    testing.assert_finite(model, batch[0])
    assert all(p.grad is None for p in model.parameters())
    bad = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), _LogLayer(), nn.Linear(8, 10))
    with pytest.raises(AssertionError, match=r"first appear in the output of 2"):
        testing.assert_finite(bad, batch)
    with pytest.raises(AssertionError, match="NaN/Inf gradients"):
        testing.assert_finite(model, batch, loss_fn=_SqrtLoss())


def test_finite_reports_a_non_finite_loss(batch):
    model = mlp([64, 32, 10])
    with pytest.raises(AssertionError, match="the loss is nan"):
        testing.assert_finite(model, batch, loss_fn=lambda out, y: out.sum() * float("nan"))


# ---------------------------------------------------------------------- assert_output_range
def test_output_range(batch):
    torch.manual_seed(0)
    probs = mlp([64, 32, 10], final=nn.Softmax(dim=1))
    testing.assert_output_range(probs, batch[0], 0.0, 1.0)
    logits = mlp([64, 32, 10])
    with torch.no_grad():
        out = logits(batch[0])
    with pytest.raises(AssertionError) as info:
        testing.assert_output_range(logits, batch[0], 0.0, 1.0)
    outside = int(((out < 0) | (out > 1)).sum())
    assert f"{outside} of 640 output values" in str(info.value) and f"{float(out.min()):.4g}" in str(
        info.value
    )
    with pytest.raises(ValueError):
        testing.assert_output_range(probs, batch[0], 1.0, 0.0)


# ---------------------------------------------------------------------- assert_loss_decreases
class _BiasOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10)


def test_loss_decreases(batch):
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    before = _weights(model)
    testing.assert_loss_decreases(model, nn.CrossEntropyLoss(), batch, steps=20)
    assert _unchanged(model, before)
    with pytest.raises(AssertionError, match="the loss on one batch went from"):
        testing.assert_loss_decreases(_BiasOnly(), nn.CrossEntropyLoss(), batch, steps=20)
    with pytest.raises(AssertionError, match="lr-too-low"):
        testing.assert_loss_decreases(model, nn.CrossEntropyLoss(), batch, steps=10, lr=1e-9)


# ---------------------------------------------------------------------- assert_no_findings
def test_no_findings_on_runners():
    healthy = zoo.get("mlp-digits").runner()
    broken = zoo.get("head-not-in-optimizer").runner()  # found by the setup audit, before any step
    try:
        testing.assert_no_findings(healthy)
        with pytest.raises(AssertionError, match="param-not-in-optimizer"):
            testing.assert_no_findings(broken)
        testing.assert_no_findings(broken, ignore=["param-not-in-optimizer"])
        testing.assert_no_findings([f for f in broken.findings if f.severity == "info"], severity="info")
        # Fixed by the finding's own action: the finding stays listed, resolved, and is no problem.
        (finding,) = broken.findings_with("param-not-in-optimizer")
        finding.actions[0].apply()
        assert broken.resolved_findings and not broken.findings_with("param-not-in-optimizer")
        testing.assert_no_findings(broken)
    finally:
        healthy.close()
        broken.close()


def test_no_findings_on_a_watched_loop(batch):
    import tlwidgets as tlw

    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = zoo.load_digits_tensors()
    with tlw.watch(model, opt, loss_fn=loss_fn) as w:
        for i in range(0, 640, 64):
            opt.zero_grad()
            loss_fn(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    testing.assert_no_findings(w)
    lazy = mlp([64, 32, 10])
    opt2 = torch.optim.SGD(lazy.parameters(), lr=0.05)
    with tlw.watch(lazy, opt2, loss_fn=loss_fn) as w2:
        for i in range(0, 640, 64):
            loss_fn(lazy(x[i : i + 64]), y[i : i + 64]).backward()  # never steps, never zeroes
    with pytest.raises(AssertionError, match="finding"):
        testing.assert_no_findings(w2)


# ---------------------------------------------------------------------- generators
def test_make_regression_follows_its_formula():
    x, y = testing.make_regression(200, 1, noise=0.0, seed=3, as_dataset=False)
    assert x.shape == (200, 1) and y.shape == (200, 1) and x.dtype == torch.float32
    assert bool((x >= -1).all() and (x <= 1).all())
    assert torch.allclose(y[:, 0], torch.sin(8 * (x[:, 0] - 1.2)), atol=1e-6)
    noisy = testing.make_regression(4000, 1, noise=0.1, seed=3)
    xn, yn = noisy.tensors
    assert float((yn[:, 0] - torch.sin(8 * (xn[:, 0] - 1.2))).std()) == pytest.approx(0.1, rel=0.05)
    multi = testing.make_regression(100, 5, seed=1).tensors
    assert multi[0].shape == (100, 5)
    assert torch.equal(
        testing.make_regression(50, 2, seed=9).tensors[1], testing.make_regression(50, 2, seed=9).tensors[1]
    )


def test_make_classification_balance_and_separation():
    x, y = testing.make_classification(600, 4, 3, seed=0, as_dataset=False)
    assert x.shape == (600, 4) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [200, 200, 200]
    centroids = torch.stack([x[y == c].mean(0) for c in range(3)])
    nearest = torch.cdist(x, centroids).argmin(1)
    assert float((nearest == y).float().mean()) > 0.9  # separation=3: clusters barely overlap
    _xi, yi = testing.make_classification(2000, 2, 3, seed=0, weights=[0.8, 0.1, 0.1], as_dataset=False)
    share = torch.bincount(yi, minlength=3).float() / 2000
    assert share[0] == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ValueError):
        testing.make_classification(10, 2, 3, weights=[1.0, 0.0])


def test_make_patches_draws_the_box_it_returns():
    images, boxes = testing.make_patches(40, 16, seed=2, noise=0.0, as_dataset=False)
    assert images.shape == (40, 1, 16, 16) and boxes.shape == (40, 4)
    assert bool((boxes >= 0).all() and (boxes <= 1).all())
    for img, box in zip(images, boxes):
        x0, y0, x1, y1 = (round(float(v) * 16) for v in box)
        assert x1 - x0 == y1 - y0 >= 3  # a square of at least min_box pixels
        inside = img[0, y0:y1, x0:x1]
        assert bool((inside == 1.0).all()) and float(img.sum()) == inside.numel()
    ds = testing.make_patches(30, 12, seed=1, classes=3, noise=0.0)
    imgs, bxs, labels = ds.tensors
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2} and bxs.shape == (30, 4)
    peak = imgs.amax(dim=(1, 2, 3))
    assert torch.allclose(peak, (labels.float() + 1) / 3)  # class-specific brightness
