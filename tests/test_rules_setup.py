"""Setup-audit rules: nothing-trainable, missing-activation, dropout-too-high, frozen params left in the optimizer."""

from __future__ import annotations

import pytest
import torch
from test_rules_support import classification, codes, find, loader, mlp, problems
from torch import nn

import tlwidgets as tlw
from tlwidgets.diagnostics.engine import RuleDiagnoser
from tlwidgets.diagnostics.rules import DEFAULT_RULES, Rule
from tlwidgets.diagnostics.rules.setup import SETUP_RULES


def _runner(model: nn.Module, params=None, **kw) -> tlw.Runner:
    x, y = classification()
    opt = torch.optim.SGD(list(params if params is not None else model.parameters()), lr=0.05)
    return tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(x, y), **kw)


def _audit(model: nn.Module) -> list:
    """Findings of the setup rules alone on ``model`` (the audit runs at construction)."""
    diag = RuleDiagnoser(rules=SETUP_RULES)
    r = _runner(model, diagnoser=diag)
    return r.findings


# ------------------------------------------------------------------ nothing-trainable
def test_nothing_trainable_when_every_parameter_is_frozen() -> None:
    model = mlp()
    head = list(model.parameters())
    model.requires_grad_(False)
    r = _runner(model, params=head)
    (f,) = find(r, "nothing-trainable")
    assert f.severity == "error" and f.step == 0
    assert "none of the model's 4 parameters" in f.message


def test_nothing_trainable_when_only_norm_layers_train() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    model.requires_grad_(False)
    model[1].requires_grad_(True)
    r = _runner(model)
    (f,) = find(r, "nothing-trainable")
    assert set(f.params) == {"1.weight", "1.bias"}
    assert "only normalization layers" in f.message


def test_nothing_trainable_follows_freeze_and_unfreeze() -> None:
    r = _runner(mlp())
    assert find(r, "nothing-trainable") == []
    r.freeze("")
    assert len(find(r, "nothing-trainable")) == 1
    r.unfreeze("2")
    # The audit runs again after every control: the finding is resolved once something trains.
    assert [f.resolved for f in find(r, "nothing-trainable")] == [True]


def test_partly_frozen_model_is_not_nothing_trainable() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    assert "nothing-trainable" not in [f.code for f in _audit(model)]


# ------------------------------------------------------------------ missing-activation
@pytest.mark.parametrize(
    "layers, pair",
    [
        (lambda: [nn.Linear(20, 16), nn.Linear(16, 4)], ("0", "1")),
        (
            lambda: [nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(0.2), nn.Linear(16, 4)],
            ("2", "4"),
        ),
        (
            lambda: [
                nn.Unflatten(1, (5, 4)),
                nn.Conv1d(5, 6, 3),
                nn.BatchNorm1d(6),
                nn.Conv1d(6, 4, 2),
                nn.Flatten(),
            ],
            ("1", "3"),
        ),
    ],
    ids=["linear-linear", "linear-dropout-linear", "conv-bn-conv"],
)
def test_missing_activation_names_the_two_layers(layers, pair) -> None:
    torch.manual_seed(0)
    found = [f for f in _audit(nn.Sequential(*layers())) if f.code == "missing-activation"]
    assert [f.params for f in found] == [pair]
    assert found[0].severity == "warning"


def test_missing_activation_across_nested_sequentials() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8)), nn.Linear(8, 4))
    found = [f.params for f in _audit(model) if f.code == "missing-activation"]
    assert found == [("0.2", "1")]


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)],
        lambda: [nn.Linear(20, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 4)],
        lambda: [nn.Linear(20, 16), nn.LayerNorm(16), nn.Linear(16, 4)],  # LayerNorm is not affine in x
        # Depthwise-separable convolution: a deliberate factorization, not a forgotten activation.
        lambda: [nn.Unflatten(1, (4, 5)), nn.Conv1d(4, 4, 3, groups=4), nn.Conv1d(4, 4, 1), nn.Flatten()],
    ],
    ids=["relu", "gelu-dropout", "layernorm", "depthwise-separable"],
)
def test_no_missing_activation_in_healthy_stacks(layers) -> None:
    torch.manual_seed(0)
    assert [f for f in _audit(nn.Sequential(*layers())) if f.code == "missing-activation"] == []


def test_custom_module_between_linears_is_not_judged() -> None:
    class Block(nn.Module):  # its forward is unknown: it may well be nonlinear
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), Block(), nn.Linear(16, 4))
    assert [f for f in _audit(model) if f.code == "missing-activation"] == []


# ------------------------------------------------------------------ dropout-too-high
def test_dropout_above_half_is_reported_per_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.8), nn.Linear(16, 4))
    (f,) = [f for f in _audit(model) if f.code == "dropout-too-high"]
    assert f.params == ("2",) and f.severity == "info"
    assert f.evidence["p"] == pytest.approx(0.8)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_up_to_half_is_fine(p: float) -> None:
    assert [f for f in _audit(mlp(dropout=p)) if f.code == "dropout-too-high"] == []


# ------------------------------------------------------------------ frozen params left in the optimizer
def _stale_frozen_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = classification(n=32)
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()  # momentum buffers now exist
    opt.zero_grad(set_to_none=False)  # zero gradient tensors stay
    model[0].requires_grad_(False)
    return model, opt


def test_watch_warns_about_frozen_params_an_optimizer_can_still_move() -> None:
    model, opt = _stale_frozen_model()
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss()) as w:
        (f,) = find(w, "frozen-param-changed")
        assert f.severity == "warning" and f.params == ("0",)
        assert set(f.evidence["params"]) == {"0.weight", "0.bias"}


def test_no_frozen_warning_when_frozen_params_hold_no_gradient() -> None:
    model = mlp()
    model[0].requires_grad_(False)  # frozen before any backward: grads stay None, optimizers skip them
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with tlw.watch(model, opt, loss_fn=nn.CrossEntropyLoss()) as w:
        assert find(w, "frozen-param-changed") == []


def test_runner_clears_stale_grads_so_it_does_not_warn_at_setup() -> None:
    model, opt = _stale_frozen_model()
    x, y = classification()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(x, y))
    assert find(r, "frozen-param-changed") == []
    r.run(steps=3)
    # The runner's zero_grad sets the frozen grads to None, so nothing moves them.
    assert find(r, "frozen-param-changed") == []


# ------------------------------------------------------------------ the rule set itself
def test_every_default_rule_declares_known_codes_and_kind() -> None:
    names = [r.name for r in DEFAULT_RULES]
    assert len(names) == len(set(names))
    for r in DEFAULT_RULES:
        assert isinstance(r, Rule) and r.codes and r.kind in ("setup", "stage", "trend", "epoch", "loop")


def test_every_rule_owned_code_is_declared_by_a_default_rule() -> None:
    from tlwidgets.core.findings import Code

    not_rules = {
        # the core's own checks (runner / watcher)
        "param-not-in-optimizer", "non-finite-input", "non-finite-loss", "non-finite-grad",
        # explicit checks (tlwidgets.diagnostics.checks)
        "batch-mixing", "channel-order", "labels-decoupled", "data-leakage", "train-val-shift",
        # exceptions explained by tlwidgets.diagnostics.explain
        "shape-mismatch", "device-mismatch", "dtype-mismatch", "inplace-modification", "out-of-memory",
        "target-out-of-range", "stage-error",
    }  # fmt: skip
    declared = {c for r in DEFAULT_RULES for c in r.codes}
    assert declared == {c.value for c in Code} - not_rules


def test_rule_rejects_unknown_code_and_kind() -> None:
    with pytest.raises(ValueError):
        Rule("x", ("no-such-code",), "setup", lambda ctx: [])
    with pytest.raises(ValueError):
        Rule("x", ("dead-relu",), "sometimes", lambda ctx: [])
    with pytest.raises(ValueError):
        Rule("x", ("dead-relu",), "stage", lambda ctx: [])  # a stage rule must name its stages


def test_a_raising_rule_is_recorded_and_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlwidgets.diagnostics import engine

    monkeypatch.setattr(engine, "_STRICT", False)  # the quiet path users get (tests run strict)

    def broken(ctx):
        raise RuntimeError("boom")

    diag = RuleDiagnoser(rules=[Rule("broken", ("dead-relu",), "setup", broken), *SETUP_RULES])
    model = nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 4))
    r = _runner(model, diagnoser=diag)
    assert "missing-activation" in codes(r)
    assert any("broken" in e and "boom" in e for e in r.diagnostic_errors)


def test_disable_leaves_out_rules_by_code() -> None:
    diag = RuleDiagnoser(disable=["missing-activation"])
    r = _runner(nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 4)), diagnoser=diag)
    assert "missing-activation" not in codes(r)


def test_healthy_setup_audit_is_silent() -> None:
    assert problems(_runner(mlp(dropout=0.3))) == []


def test_rewind_forgets_step_ordered_state() -> None:
    x, y = classification()
    model = mlp()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=1e-7), loader(x, y))
    start = r.checkpoint()
    r.run(steps=30)
    st = r.diagnoser.state(r)
    assert st.last_step == 30 and st.rules  # trend rules hold counters and windows now
    r.rewind(start)
    assert st.last_step == 0 and st.derived.labels.counts.size == 0 and "lr-rate" not in st.rules
    r.run(steps=30)
    assert find(r, "lr-too-low") and r.diagnostic_errors == []


def test_one_diagnoser_keeps_separate_state_per_session() -> None:
    diag = RuleDiagnoser()
    x, y = classification()
    slow, fine = mlp(), mlp(seed=1)
    a = tlw.Runner(
        slow, nn.CrossEntropyLoss(), torch.optim.SGD(slow.parameters(), lr=1e-7), loader(x, y), diagnoser=diag
    )
    b = tlw.Runner(
        fine, nn.CrossEntropyLoss(), torch.optim.SGD(fine.parameters(), lr=0.05), loader(x, y), diagnoser=diag
    )
    for _ in range(3):  # interleaved, as two notebooks' runners would be
        a.run(steps=10)
        b.run(steps=10)
    assert diag.state(a) is not diag.state(b)
    assert "lr-too-low" in codes(a) and problems(b) == []
