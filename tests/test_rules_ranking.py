"""Ranking: the most likely root cause first, one finding per code and parameter group."""

from __future__ import annotations

import pytest
import torch
from test_rules_support import classification, codes, find, loader, mlp, run
from torch import nn

from tlwidgets.core.catalog import make_finding
from tlwidgets.core.findings import Code
from tlwidgets.diagnostics.engine import RuleDiagnoser
from tlwidgets.diagnostics.ranking import CAUSAL_ORDER, rank_findings, rank_of


def _f(code: str, first_step: int = 0, severity: str | None = None, params=()):
    f = make_finding(code, code, step=first_step, params=params, severity=severity)
    return f


def test_every_code_has_exactly_one_rank() -> None:
    listed = [c for tier in CAUSAL_ORDER for c in tier]
    assert sorted(c.value for c in listed) == sorted(c.value for c in Code)
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize(
    "cause, consequence",
    [
        ("non-finite-input", "non-finite-loss"),
        ("non-finite-loss", "non-finite-grad"),
        ("lr-too-high", "exploding-gradients"),
        ("lr-too-high", "dead-relu"),
        ("scheduler-too-fast", "lr-too-low"),
        ("grad-clipping-too-strong", "lr-too-low"),
        ("input-not-normalized", "lr-too-high"),
        ("zero-init", "dead-relu"),
        ("vanishing-gradients", "loss-plateau"),
        ("grads-not-zeroed", "lr-too-high"),
        ("param-not-in-optimizer", "disconnected-param"),
        ("nothing-trainable", "loss-plateau"),
        ("unshuffled-data", "lr-too-high"),
    ],
)
def test_cause_ranks_before_its_consequence(cause: str, consequence: str) -> None:
    # Reported in the "wrong" order (the consequence first, and seen earlier): ranking fixes it.
    ranked = rank_findings([_f(consequence, first_step=0), _f(cause, first_step=5)])
    assert [f.code for f in ranked] == [cause, consequence]
    assert rank_of(cause) < rank_of(consequence)


def test_within_a_rank_errors_then_earliest_first() -> None:
    a = _f("disconnected-param", first_step=7, params=("a",))
    b = _f("param-not-updating", first_step=3, params=("b",))
    c = _f("disconnected-param", first_step=1, severity="error", params=("c",))
    assert rank_findings([a, b, c]) == [c, b, a]


def test_info_notes_come_after_every_warning() -> None:
    note = _f("dropout-too-high", first_step=0)
    assert note.severity == "info"
    ranked = rank_findings([note, _f("overfitting", first_step=50)])
    assert [f.code for f in ranked] == ["overfitting", "dropout-too-high"]


def test_ranking_is_stable_and_total() -> None:
    items = [_f(c.value, first_step=i) for i, c in enumerate(Code)]
    once = rank_findings(items)
    assert rank_findings(list(reversed(items))) == once
    assert len(once) == len(items)


@pytest.mark.parametrize(
    "sizes, consequence", [((20, 32, 4), "exploding-gradients"), ((20, 32, 32, 4), "dead-relu")]
)
def test_runner_findings_come_ranked(sizes, consequence) -> None:
    # Too high an LR makes the gradients explode (or kills ReLUs); the LR is named first.
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=3.0, momentum=0.9)  # noqa: E731
    r = run(mlp(sizes), loader(*classification()), opt=opt, steps=60)
    got = codes(r)
    assert got[0] == "lr-too-high" and consequence in got
    # Seen later, listed later; and listed later even if it had been seen first.
    assert find(r, consequence)[0].first_step > find(r, "lr-too-high")[0].first_step
    assert isinstance(r.diagnoser, RuleDiagnoser)


def test_recurring_problem_is_one_finding_updated_with_the_latest_step() -> None:
    r = run(
        mlp(), loader(*classification()), opt=lambda m: torch.optim.SGD(m.parameters(), lr=1e-7), steps=60
    )
    (f,) = find(r, "lr-too-low")
    assert f.count > 1 and f.step > f.first_step
    assert f.params == ("0.weight", "2.weight")


def test_one_finding_per_param_group() -> None:
    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": m[0].parameters(), "lr": 1e-8}, {"params": m[2].parameters(), "lr": 1e-8}]
        )

    r = run(mlp(), loader(*classification()), opt=opt, steps=40)
    assert sorted(f.params for f in find(r, "lr-too-low")) == [("0.weight",), ("2.weight",)]


def test_lr_far_too_high_comes_before_the_clipping_it_forces() -> None:
    # Clipping ranks in an earlier tier than the LR (it makes an LR look too low), but an LR far too
    # high grows the gradients until a healthy max_norm cuts them on every step: the edge decides.
    clip, lr = _f("grad-clipping-too-strong", first_step=0), _f("lr-too-high", first_step=5)
    assert rank_of("grad-clipping-too-strong") < rank_of("lr-too-high")
    assert [f.code for f in rank_findings([clip, lr])] == ["lr-too-high", "grad-clipping-too-strong"]
    assert clip.likely_causes == ("lr-too-high",) and lr.likely_causes == ()
    # Without the LR, clipping still comes first and explains the tiny steps (lr-too-low).
    low = _f("lr-too-low", first_step=0)
    assert [f.code for f in rank_findings([low, _f("grad-clipping-too-strong", first_step=3)])] == [
        "grad-clipping-too-strong",
        "lr-too-low",
    ]
