"""Per-stage rules: each bug injected into a small setup, and the healthy twin that must stay silent.

Process bugs (frozen but moving, lr 0 ...) must be reported within two steps; a disconnected
parameter within the first ten (a window of checks: a branch may be skipped in a step or two).
"""

from __future__ import annotations

import pytest
import torch
from test_rules_support import classification, cnn_bn, codes, find, loader, mlp, problems, regression, run
from torch import nn
from torch.nn import functional as F

import tlwidgets as tlw


def _cls(n: int = 256, **kw) -> torch.utils.data.DataLoader:
    x, y = classification(n=n)
    return loader(x, y, **kw)


# ------------------------------------------------------------------ input-not-normalized
def test_raw_pixel_scale_inputs_are_reported() -> None:
    x, y = classification(n=128, features=64)
    pixels = (x * 40 + 120).clamp(0, 255)  # like raw 0-255 images
    r = run(mlp((64, 16, 4)), loader(pixels, y), steps=3)
    (f,) = find(r, "input-not-normalized")
    assert f.params == ("inputs",) and f.first_step == 0
    assert f.evidence["max"] > 100


def test_inputs_scaled_down_twice_are_reported() -> None:
    x, y = classification(n=128)
    r = run(mlp(), loader(x.abs() / 255 / 255, y), steps=2)
    assert find(r, "input-not-normalized")[0].evidence["max"] < 1e-2


def test_normalization_layer_first_accepts_raw_inputs() -> None:
    x, y = classification(n=128)
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    r = run(model, loader(x * 50 + 300, y), steps=3)
    assert find(r, "input-not-normalized") == []


def test_unit_scale_and_zero_one_inputs_are_fine() -> None:
    x, y = classification(n=128)
    assert find(run(mlp(), loader(x, y), steps=3), "input-not-normalized") == []
    assert find(run(mlp(), loader(torch.sigmoid(x), y), steps=3), "input-not-normalized") == []


# ------------------------------------------------------------------ softmax-before-loss
@pytest.mark.parametrize("final", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1)], ids=["softmax", "log_softmax"])
def test_probabilities_fed_to_cross_entropy(final: nn.Module) -> None:
    r = run(nn.Sequential(mlp(), final), _cls(), steps=2)
    (f,) = find(r, "softmax-before-loss")
    assert f.first_step == 0 and f.evidence["loss_fn"] == "CrossEntropyLoss"


def test_softmax_fed_to_nll_loss() -> None:
    r = run(nn.Sequential(mlp(), nn.Softmax(dim=1)), _cls(), loss_fn=nn.NLLLoss(), steps=2)
    (f,) = find(r, "softmax-before-loss")
    assert "log_softmax" in f.fix


def test_sigmoid_fed_to_bce_with_logits() -> None:
    x, y = classification(n=256, classes=2)
    data = loader(x, y.float().unsqueeze(1))
    r = run(nn.Sequential(mlp((20, 16, 1)), nn.Sigmoid()), data, loss_fn=nn.BCEWithLogitsLoss(), steps=5)
    assert find(r, "softmax-before-loss")[0].first_step <= 3


@pytest.mark.parametrize(
    "make, loss_fn, binary",
    [
        (lambda: mlp(), nn.CrossEntropyLoss(), False),
        (lambda: nn.Sequential(mlp(), nn.LogSoftmax(dim=1)), nn.NLLLoss(), False),
        (lambda: nn.Sequential(mlp((20, 16, 1)), nn.Sigmoid()), nn.BCELoss(), True),
        (lambda: mlp((20, 16, 1)), nn.BCEWithLogitsLoss(), True),
    ],
    ids=["logits-ce", "logsoftmax-nll", "sigmoid-bce", "logits-bcewithlogits"],
)
def test_matching_output_and_loss_is_silent(make, loss_fn, binary) -> None:
    x, y = classification(n=256, classes=2 if binary else 4)
    data = loader(x, y.float().unsqueeze(1) if binary else y)
    r = run(make(), data, loss_fn=loss_fn, steps=60)
    assert find(r, "softmax-before-loss") == []
    assert problems(r) == []


# ------------------------------------------------------------------ shape-broadcast
@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # torch warns too; the rule explains
def test_n1_prediction_against_n_target_broadcasts() -> None:
    x, y = regression()
    r = run(mlp((10, 16, 1)), loader(x, y.squeeze(1)), loss_fn=nn.MSELoss(), steps=2)
    (f,) = find(r, "shape-broadcast")
    assert f.evidence["output_shape"] == (32, 1) and f.evidence["broadcast_shape"] == (32, 32)
    assert f.first_step == 0


def test_matching_regression_shapes_are_silent() -> None:
    x, y = regression()
    r = run(mlp((10, 16, 1)), loader(x, y), loss_fn=nn.MSELoss(), steps=60)
    assert find(r, "shape-broadcast") == [] and problems(r) == []


def test_class_targets_are_not_a_broadcast() -> None:
    assert find(run(mlp(), _cls(), steps=2), "shape-broadcast") == []


# ------------------------------------------------------------------ loss-sum-reduction
def test_sum_reduction_attribute() -> None:
    r = run(
        mlp(),
        _cls(),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3),
        steps=1,
    )
    (f,) = find(r, "loss-sum-reduction")
    assert f.evidence["batch_size"] == 32


def test_summed_functional_cross_entropy_exceeds_any_mean() -> None:
    def summed(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, reduction="sum")

    r = run(mlp(), _cls(), loss_fn=summed, opt=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3), steps=1)
    (f,) = find(r, "loss-sum-reduction")
    assert f.evidence["loss"] > 2 * f.evidence["bound"]


def test_mean_functional_cross_entropy_is_silent() -> None:
    r = run(mlp(), _cls(), loss_fn=lambda o, t: F.cross_entropy(o, t), steps=5)
    assert find(r, "loss-sum-reduction") == []


# ------------------------------------------------------------------ bn-small-batch
def test_batch_norm_on_batches_of_two() -> None:
    x, y = classification(n=64, features=64)
    r = run(cnn_bn(), loader(x, y, batch_size=2), steps=2)
    (f,) = find(r, "bn-small-batch")
    assert set(f.params) == {"2", "5"} and f.first_step == 0


def test_batch_norm_in_eval_on_small_batches_is_fine() -> None:
    x, y = classification(n=64, features=64)
    model = cnn_bn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.requires_grad_(False)
    r = run(model, loader(x, y, batch_size=2), steps=2)
    assert find(r, "bn-small-batch") == []


# ------------------------------------------------------------------ disconnected-param
class _Detached(nn.Module):
    """The features are detached before the head: the body never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(20, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).detach())


def test_detached_body_is_reported_within_the_first_steps() -> None:
    # One check (or two) without a gradient says nothing (a routed expert, a skipped block):
    # a window of checks, all of the first steps, is needed.
    r = run(_Detached(), _cls(), steps=12)
    (f,) = find(r, "disconnected-param")
    assert f.params == ("body.weight", "body.bias")
    assert f.first_step <= 10 and f.severity == "warning"
    assert f.evidence["checks"] >= 10 and f.evidence["varying_code_path"] is False


def test_unused_branch_is_reported() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.used = nn.Linear(20, 4)
            self.aux = nn.Linear(20, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    # 'aux' is a twin of 'used' (as an expert a router has not picked yet would be): a longer window.
    r = run(Unused(), _cls(), steps=22)
    (f,) = find(r, "disconnected-param")
    assert f.params == ("aux.weight", "aux.bias") and f.first_step <= 20


def test_frozen_params_outside_the_optimizer_are_not_disconnected() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    r = run(model, _cls(), opt=lambda m: torch.optim.SGD(m[2].parameters(), lr=0.05), steps=5)
    assert find(r, "disconnected-param") == [] and problems(r) == []


# ------------------------------------------------------------------ param-not-updating
def test_group_with_lr_zero_is_reported_within_two_steps() -> None:
    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.0}], lr=0.05
        )

    r = run(mlp(), _cls(), opt=opt, steps=3)
    (f,) = find(r, "param-not-updating")
    assert f.params == ("2.weight", "2.bias") and f.first_step <= 1
    assert f.evidence["zero_lr_groups"] == [1]


def test_updates_rounding_away_under_a_tiny_lr_are_left_to_the_lr_rules() -> None:
    r = run(mlp(), _cls(), opt=lambda m: torch.optim.SGD(m.parameters(), lr=1e-12), steps=8)
    assert find(r, "param-not-updating") == []


# ------------------------------------------------------------------ frozen-param-changed
class _InPlaceZeroSGD(torch.optim.SGD):
    """An optimizer whose zero_grad keeps (zeroed) gradient tensors, as ``set_to_none=False`` does."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=False)


def test_frozen_param_moved_by_momentum_is_an_error_at_once() -> None:
    model = mlp()
    opt = _InPlaceZeroSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for p in model[0].parameters():
        p.requires_grad_(False)
        p.grad = torch.zeros_like(p)  # a stale gradient from an earlier backward, zeroed in place
    x, y = classification()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(x, y))
    result = r.run(steps=5)
    (f,) = find(r, "frozen-param-changed")
    assert f.severity == "error" and f.first_step == 0
    assert f.params == ("0.weight", "0.bias")
    assert result.stopped_by == "finding" and result.finding.code == "frozen-param-changed"


def test_runner_freeze_keeps_frozen_params_still() -> None:
    model = mlp()
    x, y = classification()
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
        loader(x, y),
    )
    r.run(steps=3)
    r.freeze("0")
    r.run(steps=10)
    assert find(r, "frozen-param-changed") == [] and problems(r) == []


# ------------------------------------------------------------------ eval-mode-training
def test_model_left_in_eval_mode_with_dropout() -> None:
    model = mlp(dropout=0.3)
    model.eval()
    r = run(model, _cls(), steps=2)
    (f,) = find(r, "eval-mode-training")
    assert f.params == ("2",) and f.severity == "warning" and f.first_step == 0


def test_model_in_eval_mode_without_mode_dependent_layers_is_info() -> None:
    model = mlp()
    model.eval()
    r = run(model, _cls(), steps=2)
    (f,) = find(r, "eval-mode-training")
    assert f.severity == "info" and f.params == ("<model>",)


def test_frozen_batch_norm_in_eval_mode_is_deliberate() -> None:
    x, y = classification(n=128, features=64)
    model = cnn_bn()
    for m in list(model.modules())[1:6]:
        m.requires_grad_(False)
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    r = run(model, loader(x, y), steps=5)
    assert find(r, "eval-mode-training") == [] and find(r, "frozen-bn-stats-drift") == []


def test_runner_freeze_with_bn_eval_is_not_eval_mode_training() -> None:
    x, y = classification(n=128, features=64)
    r = tlw.Runner(
        model := cnn_bn(), nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.05), loader(x, y)
    )
    r.freeze("1", "2", bn_eval=True)
    r.run(steps=5)
    assert find(r, "eval-mode-training") == [] and find(r, "frozen-bn-stats-drift") == []


# ------------------------------------------------------------------ frozen-bn-stats-drift
def test_frozen_batch_norm_in_train_mode_drifts() -> None:
    x, y = classification(n=128, features=64)
    model = cnn_bn()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.05), loader(x, y))
    r.freeze("1", "2", "4", "5")  # conv and BN layers frozen, BN left in train mode
    r.run(steps=2)
    (f,) = find(r, "frozen-bn-stats-drift")
    assert f.params == ("2", "5") and f.first_step == 0
    assert "bn_eval=True" in f.fix


# ------------------------------------------------------------------ zero-init
def test_all_zero_hidden_layer_is_reported_and_zero_last_layer_is_not() -> None:
    model = mlp((20, 16, 16, 4))
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    r = run(model, _cls(), steps=3)
    names = {f.params for f in find(r, "zero-init")}
    assert names == {("0.weight",), ("2.weight",)}
    assert all(f.first_step <= 1 for f in find(r, "zero-init"))


def test_constant_init_is_symmetric() -> None:
    model = mlp((20, 16, 16, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.constant_(layer.weight, 0.05)
            nn.init.zeros_(layer.bias)
    r = run(model, _cls(), steps=3)
    assert ("0.weight",) in {f.params for f in find(r, "zero-init")}


def test_zero_last_layer_and_zero_biases_are_healthy() -> None:
    model = mlp()
    nn.init.zeros_(model[2].weight)
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.bias)
    r = run(model, _cls(), steps=60)
    assert find(r, "zero-init") == [] and problems(r) == []


# ------------------------------------------------------------------ dead-relu through gradients (functional relu)
def test_dead_units_behind_functional_relu() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(20, 32)
            self.fc2 = nn.Linear(32, 4)
            nn.init.constant_(self.fc1.bias, -20.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x)))

    r = run(Net(), _cls(), steps=3)
    (f,) = find(r, "dead-relu")
    assert f.params == ("fc1",) and f.evidence["zero_grad_frac"] == 1.0


def test_codes_of_a_healthy_small_run_are_empty() -> None:
    assert codes(run(mlp(), _cls(), steps=30)) == []
