"""Trend rules over a window of steps or epochs: each bug injected into a small run, with its healthy twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rules_support import classification, codes, digits, find, loader, mlp, problems, regression, run
from torch import nn

import tlwidgets as tlw
from tlwidgets.diagnostics.derived import binom_tail
from tlwidgets.diagnostics.rules import trend


def _cls(n: int = 512, **kw) -> torch.utils.data.DataLoader:
    x, y = classification(n=n)
    return loader(x, y, **kw)


def _sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(lr: float, weight_decay: float = 0.0, cls=torch.optim.Adam):
    return lambda m: cls(m.parameters(), lr=lr, weight_decay=weight_decay)


def _ratio_median(r: tlw.Runner, names: tuple[str, ...], rows: int = 20) -> float:
    """Naive reference: median over steps of the median update/weight ratio of ``names``."""
    h = r.history
    cols = [h.param_names.index(n) for n in names]
    ratio = h.update_norm[-rows:, cols] / h.weight_norm[-rows:, cols]
    return float(np.median(np.median(ratio, axis=1)))


# ------------------------------------------------------------------ lr-too-high
@pytest.mark.parametrize("opt", [_sgd(3.0, momentum=0.9), _adam(1.0)], ids=["sgd-lr3-momentum", "adam-lr1"])
def test_lr_too_high(opt) -> None:
    r = run(mlp(), _cls(), opt=opt, steps=30)
    (f,) = find(r, "lr-too-high")
    assert f.params == ("0.weight", "2.weight")
    assert f.first_step <= 20
    assert f.evidence["update_ratio"] > trend.LR_HIGH_RATIO


def test_lr_too_high_ratio_matches_a_naive_computation() -> None:
    r = run(mlp(), _cls(), opt=_sgd(3.0, momentum=0.9), steps=20)
    (f,) = find(r, "lr-too-high")
    # Evaluated right after step 20 over the last 20 rows: the same numbers as the naive median.
    assert f.evidence["update_ratio"] == pytest.approx(_ratio_median(r, f.params), rel=1e-6)


def test_lr_too_high_per_param_group() -> None:
    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [{"params": m[0].parameters(), "lr": 1.0}, {"params": m[2].parameters()}], lr=1e-3
        )

    r = run(mlp(), _cls(), opt=opt, steps=30)
    found = find(r, "lr-too-high")
    assert [f.params for f in found] == [("0.weight",)]
    assert found[0].evidence["group"] == 0 and "group 0" in found[0].message


def test_nan_after_huge_steps_names_the_lr() -> None:
    r = run(mlp(), _cls(), opt=_sgd(30.0, momentum=0.9), steps=60)
    found = codes(r)
    assert found[0] == "lr-too-high"  # the cause ranks before the NaN it produced (#12)
    nan = next(f for f in r.findings if f.code.startswith("non-finite"))
    assert "lr-too-high" in nan.likely_causes


# ------------------------------------------------------------------ lr-too-low
def test_lr_spike_that_kills_the_relus_names_the_lr_first() -> None:
    # SGD at lr=1 with momentum on a batch-norm CNN: the loss jumps ~30x after the first step, the
    # ReLUs die and the update ratios collapse, so the windowed LR rule alone would see only tiny
    # ratios and a flat loss; the spike right after huge updates names the cause.
    from tlwidgets.zoo import healthy

    torch.manual_seed(0)
    parts = healthy.build_cnn_bn_digits(0)
    model = parts["model"]
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9)  # noqa: E731
    r = run(model, parts["train_data"], opt=opt, steps=40)
    losses = r.history.loss
    spike = int(np.argmax(losses[1:] > trend.LOSS_SPIKE * losses[0])) + 1
    assert losses[spike] > trend.LOSS_SPIKE * np.median(losses[max(0, spike - 5) : spike])
    (f,) = find(r, "lr-too-high")
    # Named at the spike; later evaluations of the window keep it (the blow-up: steps above 50% of
    # the weights' norm and the loss many times its first value), never turning it into lr-too-low.
    assert (
        f.first_step == spike and "jumped" in f.message and f.evidence["update_ratio"] > trend.LR_HIGH_RATIO
    )
    assert "lr-too-low" not in codes(r)
    assert codes(r)[0] == "lr-too-high"


def test_noisy_batch_losses_are_no_spike() -> None:
    # Heavy-tailed regression targets: batch losses vary by an order of magnitude from step to step;
    # with a sane LR that is no reason to blame it.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 8, generator=g)
    torch.manual_seed(3)  # StudentT samples from the global generator
    y = x @ torch.randn(8, 1, generator=g) + torch.distributions.StudentT(1.5).sample((1024, 1)) * 0.5
    r = run(mlp((8, 32, 1)), loader(x, y, batch_size=32), loss_fn=nn.MSELoss(), opt=_adam(1e-3), steps=60)
    batch = np.asarray(r.history.loss)
    assert batch.max() > 10 * np.median(batch)  # the noise this test is about
    assert "lr-too-high" not in codes(r)


@pytest.mark.parametrize("opt", [_sgd(1e-6), _adam(1e-7)], ids=["sgd-1e-6", "adam-1e-7"])
def test_lr_too_low(opt) -> None:
    r = run(mlp(), _cls(), opt=opt, steps=30)
    (f,) = find(r, "lr-too-low")
    assert f.params == ("0.weight", "2.weight") and f.first_step <= 25
    assert f.evidence["update_ratio"] < trend.LR_LOW_RATIO


def test_lr_too_low_for_one_group_that_lags_far_behind() -> None:
    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [{"params": m[0].parameters(), "lr": 1e-8}, {"params": m[2].parameters()}], lr=1e-2
        )

    r = run(mlp(), _cls(), opt=opt, steps=30)
    (f,) = find(r, "lr-too-low")
    assert f.params == ("0.weight",) and f.evidence["lagging"]


def test_vanishing_gradients_are_not_blamed_on_the_lr() -> None:
    # Most layers barely move because their gradients vanish, but the last ones move at a healthy pace.
    r = run(mlp((20, 32, 32, 32, 32, 32, 32, 32, 4), act=nn.Sigmoid), _cls(), opt=_sgd(0.1), steps=30)
    assert "vanishing-gradients" in codes(r)
    assert "lr-too-low" not in codes(r)


# ------------------------------------------------------------------ scheduler-too-fast
def test_epoch_scheduler_stepped_per_batch() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.1)
    r = run(model, _cls(), opt=opt, scheduler=sched, scheduler_interval="step", steps=40)
    (f,) = find(r, "scheduler-too-fast")
    assert f.params == ("lr[0]",) and f.first_step <= 35
    assert f.evidence["collapse_epoch"] == 0
    assert "lr-too-low" not in codes(r)  # the collapse explains the tiny steps; no "raise the LR"


def test_periodic_cosine_with_a_batch_sized_period() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    r = run(model, _cls(), opt=opt, scheduler=sched, scheduler_interval="step", steps=40)
    assert find(r, "scheduler-too-fast")[0].evidence["dips"] >= 2


@pytest.mark.parametrize(
    "make, interval",
    [
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=64), "step"),
        (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=64), "step"),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), "epoch"),
    ],
    ids=["cosine-over-the-run", "onecycle", "steplr-per-epoch"],
)
def test_schedules_that_end_with_the_run_are_fine(make, interval) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = run(model, _cls(), opt=opt, scheduler=make(opt), scheduler_interval=interval, steps=64)
    assert find(r, "scheduler-too-fast") == [] and problems(r) == []


# ------------------------------------------------------------------ exploding / vanishing
def test_gradients_growing_by_orders_of_magnitude() -> None:
    r = run(mlp(), _cls(), opt=_sgd(3.0, momentum=0.9), steps=30)
    (f,) = find(r, "exploding-gradients")
    assert f.evidence["growth"] > trend.EXPLODE_GROWTH
    # The LR is the cause, the exploding gradients its consequence.
    assert codes(r).index("lr-too-high") < codes(r).index("exploding-gradients")


def test_gradients_overflowing_from_a_too_large_init() -> None:
    model = mlp((20, 64, 64, 64, 64, 64, 64, 64, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=1.0)
    r = run(model, _cls(), opt=_sgd(0.01), steps=5)
    assert "exploding-gradients" in codes(r)
    assert find(r, "exploding-gradients")[0].first_step <= 2


def test_a_loss_on_a_huge_scale_under_adam_is_not_exploding() -> None:
    # Style-transfer style: the terms are weighed by 1e5-1e10, so the gradients are ~1e3-1e5x the
    # weights from the first step; Adam's steps do not depend on that scale (fast_neural_style, #11).
    def scaled(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target) * 1e7

    r = run(mlp(), _cls(), opt=_adam(1e-3), loss_fn=scaled, steps=30)
    assert np.nanmedian(r.history.grad_norm[:3] / r.history.weight_norm[:3]) > trend.EXPLODE_INIT_RATIO
    assert find(r, "exploding-gradients") == [] and problems(r) == []


def test_vanishing_gradients_in_a_deep_sigmoid_stack() -> None:
    r = run(mlp((20, 32, 32, 32, 32, 32, 32, 32, 4), act=nn.Sigmoid), _cls(), opt=_sgd(0.1), steps=10)
    (f,) = find(r, "vanishing-gradients")
    assert f.params == ("0.weight",) and f.evidence["ratio"] < trend.VANISH_RATIO
    # Reference: the first matrix's grad/weight ratio against the last one's, from the history.
    h = r.history
    first = np.median(h.column("grad_norm", "0.weight")[-10:] / h.column("weight_norm", "0.weight")[-10:])
    last = np.median(h.column("grad_norm", "14.weight")[-10:] / h.column("weight_norm", "14.weight")[-10:])
    assert first / last < trend.VANISH_RATIO


def test_deep_relu_stack_does_not_vanish() -> None:
    r = run(mlp((20, 32, 32, 32, 32, 32, 4)), _cls(), opt=_adam(1e-3), steps=40)
    assert find(r, "vanishing-gradients") == [] and problems(r) == []


# ------------------------------------------------------------------ dead-relu
def test_relu_layer_that_never_fires() -> None:
    model = mlp()
    nn.init.constant_(model[0].bias, -20.0)
    r = run(model, _cls(), steps=3)
    (f,) = find(r, "dead-relu")
    assert f.params == ("1",) and f.evidence["dead_frac"] == 1.0 and f.first_step <= 2


def test_partly_dead_relu_layer_is_fine() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].bias[:16] = -20.0  # half of the units dead: below the 90% threshold
    r = run(model, _cls(), steps=12)
    assert find(r, "dead-relu") == []


# ------------------------------------------------------------------ over-regularization
@pytest.mark.parametrize(
    "opt",
    [_sgd(0.05, momentum=0.9, weight_decay=1.0), _adam(1e-3, 50.0, torch.optim.AdamW)],
    ids=["sgd", "adamw"],
)
def test_weight_decay_that_dominates(opt) -> None:
    r = run(mlp(), _cls(), opt=opt, steps=40)
    (f,) = find(r, "over-regularization")
    assert f.params == ("0.weight", "2.weight")
    assert f.evidence["share"] > trend.REG_SHARE and f.evidence["shrink"] < 1


def _penalized(model: nn.Module, lam: float):
    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        return nn.functional.cross_entropy(out, target) + lam * l2

    return loss_fn


def test_explicit_penalty_in_the_loss_that_dominates() -> None:
    model = mlp()
    r = run(model, _cls(), loss_fn=_penalized(model, 1.0), opt=_sgd(0.05, momentum=0.9), steps=60)
    (f,) = find(r, "over-regularization")
    assert f.evidence["weight_decay"] == 0.0 and f.evidence["shrink"] < trend.REG_PENALTY_SHRINK
    assert "penalty" in f.cause
    # The penalty makes the loss exceed any mean cross-entropy, but it does not scale with the batch.
    assert find(r, "loss-sum-reduction") == []


def test_small_explicit_penalty_is_fine() -> None:
    model = mlp()
    r = run(model, _cls(), loss_fn=_penalized(model, 1e-3), opt=_sgd(0.05, momentum=0.9), steps=60)
    assert find(r, "over-regularization") == [] and problems(r) == []


@pytest.mark.parametrize(
    "opt",
    [_sgd(0.05, momentum=0.9, weight_decay=5e-4), _adam(1e-3, 0.05, torch.optim.AdamW)],
    ids=["sgd", "adamw"],
)
def test_usual_weight_decay_is_fine(opt) -> None:
    r = run(mlp(), _cls(), opt=opt, steps=60)
    assert find(r, "over-regularization") == [] and problems(r) == []


# ------------------------------------------------------------------ loss-plateau
def test_loss_stuck_at_chance_level() -> None:
    # Labels unrelated to the inputs: nothing to learn, the loss stays at ln(4), the uniform guess.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2048, 20, generator=g), torch.randint(0, 4, (2048,), generator=g)
    model = nn.Linear(20, 4)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    # The data audits name random labels (labels-decoupled, tested in test_data_audits.py); with
    # them off, the plateau rule is what is left to say the loss does not move.
    from tlwidgets.diagnostics.engine import RuleDiagnoser

    r = run(
        model,
        loader(x, y, batch_size=64),
        opt=_sgd(0.05),
        steps=160,
        diagnoser=RuleDiagnoser(disable=["data-audits"]),
    )
    (f,) = find(r, "loss-plateau")
    assert f.severity == "warning" and codes(r) == ["loss-plateau"]
    assert f.first_step == 3 * trend.PLATEAU_WINDOW
    # The finding carries the numbers of its latest evaluation (after step 160): the last 50 losses.
    assert f.evidence["recent"] == pytest.approx(np.median(r.history.loss[-50:]))


def test_plateau_stays_silent_when_a_specific_cause_is_known() -> None:
    r = run(mlp(), _cls(), opt=_sgd(1e-7), steps=160)
    assert "lr-too-low" in codes(r) and "loss-plateau" not in codes(r)


# ------------------------------------------------------------------ overfitting
def test_validation_loss_rising_while_training_loss_falls() -> None:
    # 32 noisy training examples and a wide MLP: it memorizes the noise, validation MSE climbs.
    x, y = regression(32)
    y = y + 0.5 * torch.randn(32, 1, generator=torch.Generator().manual_seed(3))
    xv, yv = regression(256, seed=1)
    model = mlp((10, 256, 256, 1))
    r = tlw.Runner(
        model,
        nn.MSELoss(),
        torch.optim.Adam(model.parameters(), lr=3e-3),
        loader(x, y, batch_size=8),
        val_data=loader(xv, yv, shuffle=False),
    )
    r.run(epochs=12)
    (f,) = find(r, "overfitting")
    val = f.evidence["val"]
    assert f.severity == "warning"
    assert val[0] < val[1] < val[2] and val[2] > (1 + trend.OVERFIT_MARGIN) * f.evidence["best_val"]
    assert f.evidence["train"][-1] < f.evidence["train"][0]
    assert val == [e.val_loss for e in r.history.epochs][-3:] or f.step > f.first_step


def test_rising_validation_loss_with_best_accuracy_is_a_note() -> None:
    # Validation loss rises from over-confidence while validation accuracy is still at its best.
    x, y = digits(64)
    xv, yv = digits(300, offset=1000)
    model = mlp((64, 256, 10))
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(model.parameters(), lr=1e-2),
        loader(x, y, batch_size=16),
        val_data=loader(xv, yv, shuffle=False),
    )
    r.run(epochs=8)
    (f,) = find(r, "overfitting")
    acc = f.evidence["accuracy"]
    assert (
        f.severity == "info" and acc[-1] >= max(e.val_metrics["accuracy"] for e in r.history.epochs) - 0.005
    )


def test_validation_improving_is_not_overfitting() -> None:
    x, y = digits(600)
    xv, yv = digits(300, offset=1000)
    model = mlp((64, 32, 10))
    r = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        loader(x, y),
        val_data=loader(xv, yv, shuffle=False),
    )
    r.run(epochs=4)
    assert find(r, "overfitting") == [] and problems(r) == []


# ------------------------------------------------------------------ class-imbalance / unshuffled-data
def test_heavily_skewed_labels() -> None:
    x, y = classification(n=1024)
    y = torch.where(torch.rand(1024, generator=torch.Generator().manual_seed(0)) < 0.95, 0, y)
    r = run(mlp(), loader(x, y), steps=40)
    (f,) = find(r, "class-imbalance")
    assert f.evidence["majority"] == 0 and f.evidence["ratio"] > trend.IMBALANCE_RATIO


def test_weighted_loss_handles_the_imbalance() -> None:
    x, y = classification(n=1024)
    y = torch.where(torch.rand(1024, generator=torch.Generator().manual_seed(0)) < 0.95, 0, y)
    r = run(
        mlp(), loader(x, y), loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([0.05, 1.0, 1.0, 1.0])), steps=40
    )
    assert find(r, "class-imbalance") == []


@pytest.mark.parametrize("pos_weight, expected", [(None, True), (19.0, False)], ids=["plain", "pos_weight"])
def test_rare_positives_with_a_binary_loss(pos_weight, expected) -> None:
    x, _ = classification(n=1024)
    y = (torch.rand(1024, 1, generator=torch.Generator().manual_seed(0)) < 0.04).float()
    weight = None if pos_weight is None else torch.tensor([pos_weight])
    r = run(mlp((20, 16, 1)), loader(x, y), loss_fn=nn.BCEWithLogitsLoss(pos_weight=weight), steps=40)
    found = find(r, "class-imbalance")
    assert bool(found) is expected
    if expected:
        assert found[0].evidence["majority"] == 0 and found[0].evidence["ratio"] > trend.IMBALANCE_RATIO


def test_balanced_binary_labels_are_fine() -> None:
    x, _ = classification(n=1024)
    y = (x[:, :1] > 0).float()
    r = run(mlp((20, 16, 1)), loader(x, y), loss_fn=nn.BCEWithLogitsLoss(), steps=40)
    assert find(r, "class-imbalance") == [] and problems(r) == []


class _TokenModel(nn.Module):
    """Token ids in, logits out: per token (``(seq, batch)`` -> ``(seq*batch, V)``, a language model)
    or per sequence (``(batch, seq)`` -> ``(batch, C)``, a text classifier)."""

    def __init__(self, vocab: int, out: int, per_token: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, out)
        self.per_token = per_token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)
        return self.head(e).view(-1, self.head.out_features) if self.per_token else self.head(e.mean(1))


def _zipf_tokens(n: int, vocab: int = 50) -> torch.Tensor:
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=torch.Generator().manual_seed(0))


def test_next_token_targets_are_words_not_class_labels() -> None:
    # A language model's targets follow the word frequencies (Zipf): no class-imbalance (#11).
    n = 20 * 32
    text = _zipf_tokens(n * 60 + 1)
    batches = [
        (text[i : i + n].view(20, 32), text[i + 1 : i + n + 1]) for i in range(0, n * 60, n)
    ]  # (seq, batch) ids and the next token of each
    model = _TokenModel(50, 50, per_token=True)
    r = run(model, batches, opt=_adam(1e-2), steps=60)
    assert find(r, "class-imbalance") == [] and problems(r) == []


def test_skewed_labels_of_token_sequences_are_still_found() -> None:
    tokens = _zipf_tokens(1024 * 12).view(1024, 12)
    y = torch.where(torch.rand(1024, generator=torch.Generator().manual_seed(1)) < 0.95, 0, tokens[:, 0] % 4)
    r = run(_TokenModel(50, 4, per_token=False), loader(tokens, y), opt=_adam(1e-2), steps=40)
    (f,) = find(r, "class-imbalance")
    assert f.evidence["majority"] == 0 and f.evidence["ratio"] > trend.IMBALANCE_RATIO


def test_batches_sorted_by_class() -> None:
    x, y = classification(n=1024)
    order = torch.argsort(y, stable=True)
    r = run(mlp(), loader(x[order], y[order], shuffle=False), steps=40)
    (f,) = find(r, "unshuffled-data")
    assert f.evidence["observed_single_class"] >= 0.5 and f.evidence["p_value"] < trend.PURE_P_VALUE
    assert "class-imbalance" not in codes(r)  # the sorted stream is not mistaken for skewed labels


def test_shuffled_balanced_batches_are_fine() -> None:
    r = run(mlp(), _cls(1024), steps=60)
    assert find(r, "unshuffled-data") == [] and find(r, "class-imbalance") == []


def test_binomial_tail_matches_a_direct_sum() -> None:
    from math import comb

    p = np.array([0.1, 0.5, 0.9])
    direct = [sum(comb(12, k) * q**k * (1 - q) ** (12 - k) for k in range(10, 13)) for q in p]
    assert binom_tail(12, p, 10) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lr_too_low_with_momentum_where_the_loss_stays_at_a_guess(seed):
    """SGD with momentum 0.9 at lr 1e-4 on the digits MLP: steps of ~2e-4 of the weights (inside the
    old band, so no finding came) while the loss stays at a uniform guess and accuracy at chance. Named
    lr-too-low, and its action repairs the run to 0.9x the healthy twin's accuracy."""
    from tlwidgets import zoo

    parts = zoo.get("mlp-digits").build(seed, data_seed=seed)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=1e-4, momentum=0.9)
    runner = tlw.Runner(**parts)
    runner.run(epochs=2)
    assert runner.evaluate()["accuracy"] < 0.3  # at chance (0.1): the bug is real
    first = runner.findings[0]
    assert first.code == "lr-too-low"
    first.actions[0].apply()
    runner.run(epochs=3)
    twin = zoo.get("mlp-digits").runner(seed, data_seed=seed)
    twin.run(epochs=5)
    assert runner.evaluate()["accuracy"] >= 0.9 * twin.evaluate()["accuracy"]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 65, 200, 1001])
@pytest.mark.parametrize("nan_share", [0.0, 0.3, 1.0])
def test_rules_median_matches_numpys_nanmedian_on_short_and_long_windows(n: int, nan_share: float) -> None:
    # Short windows sort in Python, long ones (a sparse phase's loss window) partition in numpy.
    from tlwidgets.diagnostics.rules.base import nanmedian

    rng = np.random.default_rng(n)
    values = rng.lognormal(size=n)
    values[rng.random(n) < nan_share] = np.nan
    got = nanmedian(values)
    if np.isnan(values).all():
        assert np.isnan(got)
    else:
        assert got == pytest.approx(float(np.nanmedian(values)), rel=0, abs=0)
