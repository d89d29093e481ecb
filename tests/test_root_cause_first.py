"""Root cause first (DESIGN section 6): when a cause produces a symptom, ``findings`` names the cause first.

End to end through ``Runner(...).run()`` on 3 seeds (a sum-reduced loss, a bad init, batch norm on a
batch of one, an LR far too high), then the ordering on synthetic findings.
"""

from __future__ import annotations

import pytest
import torch
from test_rules_support import classification, codes, digits, loader, mlp, run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tlwidgets.core.catalog import make_finding
from tlwidgets.core.findings import Code
from tlwidgets.diagnostics.ranking import CAUSES, GENERIC_CODES, can_cause, rank_findings

SEEDS = (0, 1, 2)


def _before(got: list[str], cause: str, symptom: str) -> None:
    assert cause in got and symptom in got, got
    assert got.index(cause) < got.index(symptom), got


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("seed", SEEDS)
def test_sum_reduced_loss_is_named_before_the_non_finite_gradients(seed: int) -> None:
    # reduction='sum' on batches of 512 multiplies the gradient by 512: at an LR meant for a mean the
    # steps explode and the gradients go NaN/Inf.
    x, y = classification(n=1024, seed=seed)
    r = run(
        mlp((20, 64, 64, 4), seed=seed),
        loader(x, y, batch_size=512, seed=seed),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.2),
        steps=60,
    )
    got = codes(r)
    assert got[0] == "loss-sum-reduction", got
    symptoms = [c for c in got if c in ("non-finite-grad", "non-finite-loss")]
    assert symptoms, got
    top = r.findings[0]
    for f in r.findings[1:]:
        if f.code in ("non-finite-grad", "non-finite-loss", "exploding-gradients", "lr-too-high"):
            assert "loss-sum-reduction" in f.likely_causes, f
    assert top.likely_causes == ()
    assert "likely caused by: loss-sum-reduction" in str(r.findings[got.index(symptoms[0])])


def _scaled_mlp(seed: int, depth: int, scale: float) -> nn.Sequential:
    m = mlp((20,) + (64,) * depth + (4,), seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return m


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_init_is_named_before_the_non_finite_loss(seed: int) -> None:
    # Weights 100x their default scale in a 5-layer MLP: activations and gradients blow up from step 0,
    # the first steps throw the weights far away and the loss goes NaN/Inf.
    x, y = classification(n=1024, seed=seed)
    r = run(
        _scaled_mlp(seed, 4, 100.0),
        loader(x, y, batch_size=32, seed=seed),
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        steps=60,
    )
    got = codes(r)
    assert got[0] == "exploding-gradients", got
    assert "grad_to_weight" in r.findings[0].evidence  # the from-initialization form
    symptom = next(c for c in got if c in ("non-finite-loss", "non-finite-grad"))
    _before(got, "exploding-gradients", symptom)
    # An LR named too high at the blow-up is a consequence of the init here, not its cause.
    if "lr-too-high" in got:
        _before(got, "exploding-gradients", "lr-too-high")


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_init_in_a_deeper_net_goes_nan_before_the_init_is_named(seed: int) -> None:
    # 8 layers at 100x: the loss is NaN at step 1, before the trend rule's two steps; the first step's
    # gradients (orders of magnitude above the weights) name the init at the NaN.
    x, y = classification(n=1024, seed=seed)
    r = run(
        _scaled_mlp(seed, 8, 100.0),
        loader(x, y, batch_size=32, seed=seed),
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        steps=60,
    )
    got = codes(r)
    assert got[0] == "exploding-gradients", got
    assert "grad_to_weight" in r.findings[0].evidence
    _before(got, "exploding-gradients", "non-finite-loss")


def _bn_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("form", ["last-batch-of-one", "batch-size-one"])
def test_batchnorm_fed_a_batch_of_one_is_bn_small_batch_not_a_stage_error(seed: int, form: str) -> None:
    # BatchNorm1d in training mode cannot normalize one example: "Expected more than 1 value per channel
    # when training". 65 examples in batches of 32 end with a batch of one; or batch_size=1 throughout.
    x, y = digits(n=65, offset=100 * seed)
    batch = 32 if form == "last-batch-of-one" else 1
    data = DataLoader(
        TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    r = run(_bn_mlp(seed), data, epochs=1)
    got = codes(r)
    assert got[0] == "bn-small-batch", got
    assert "stage-error" not in got, got
    top = r.findings[0]
    assert top.severity == "error" and "drop_last=True" in top.fix
    assert "Expected more than 1 value per channel" in top.message


@pytest.mark.parametrize("seed", SEEDS)
def test_lr_far_too_high_is_named_before_the_dead_relus(seed: int) -> None:
    x, y = classification(seed=seed)
    r = run(
        mlp((20, 32, 32, 4), seed=seed),
        loader(x, y, seed=seed),
        opt=lambda m: torch.optim.SGD(m.parameters(), lr=3.0, momentum=0.9),
        steps=100,
    )
    got = codes(r)
    assert got[0] == "lr-too-high", got
    _before(got, "lr-too-high", "dead-relu")
    (dead,) = [f for f in r.findings if f.code == "dead-relu"]
    assert dead.likely_causes[0] == "lr-too-high"  # (then exploding-gradients, where seen)


# ---------------------------------------------------------------------------------------- synthetic


def _f(code: str, first_step: int = 0, severity: str | None = None, params=(), evidence=None):
    return make_finding(code, code, step=first_step, params=params, severity=severity, evidence=evidence)


def test_every_edge_names_real_codes_and_the_graph_has_no_cycle() -> None:
    known = {c.value for c in Code}
    for cause, consequences in CAUSES.items():
        assert cause.split("@")[0] in known
        assert consequences <= known | {"exploding-gradients@init"}
        for c in consequences:
            assert not can_cause(c, cause), (cause, c)


@pytest.mark.parametrize(
    "cause, symptom",
    [
        ("loss-sum-reduction", "non-finite-grad"),
        ("loss-sum-reduction", "non-finite-loss"),
        ("loss-sum-reduction", "exploding-gradients"),
        ("loss-sum-reduction", "lr-too-high"),
        ("input-not-normalized", "non-finite-loss"),
        ("input-not-normalized", "dead-relu"),
        ("zero-init", "dead-relu"),
        ("missing-activation", "non-finite-grad"),
        ("lr-too-high", "non-finite-loss"),
        ("lr-too-high", "non-finite-grad"),
        ("lr-too-high", "loss-plateau"),
        ("bn-small-batch", "stage-error"),
        ("scheduler-too-fast", "loss-plateau"),
        ("grads-not-zeroed", "exploding-gradients"),
        ("unshuffled-data", "loss-plateau"),
        ("class-imbalance", "loss-plateau"),
        ("labels-decoupled", "overfitting"),
        ("train-val-shift", "overfitting"),
        ("exploding-gradients", "non-finite-loss"),
    ],
)
def test_a_cause_comes_first_and_is_shown_on_its_symptom(cause: str, symptom: str) -> None:
    # The symptom is an error seen first; the cause a warning seen later: the cause still leads.
    s = _f(symptom, first_step=0, severity="error")
    c = _f(cause, first_step=9)
    ranked = rank_findings([s, c])
    assert [f.code for f in ranked] == [cause, symptom]
    assert s.likely_causes == (cause,) and c.likely_causes == ()
    assert f"likely caused by: {cause}" in str(s)
    assert "likely caused by" in s._repr_html_() and cause in s._repr_html_()


def test_exploding_gradients_from_init_comes_before_the_lr_it_makes_look_too_high() -> None:
    init = _f("exploding-gradients", first_step=2, evidence={"grad_to_weight": 1e4, "update_ratio": 3.0})
    grown = _f("exploding-gradients", first_step=2, evidence={"growth": 500.0}, params=("x",))
    lr = _f("lr-too-high", first_step=1)
    nan = _f("non-finite-loss", first_step=2, severity="error")
    assert [f.code for f in rank_findings([nan, lr, init])] == [
        "exploding-gradients",
        "lr-too-high",
        "non-finite-loss",
    ]
    assert lr.likely_causes == ("exploding-gradients",)
    # Gradients that grew during training: the LR is the cause.
    assert [f.code for f in rank_findings([nan, grown, lr])] == [
        "lr-too-high",
        "exploding-gradients",
        "non-finite-loss",
    ]
    assert grown.likely_causes == ("lr-too-high",)


def test_without_a_causal_link_the_tiers_decide() -> None:
    # non-finite-input and lr-too-low are unrelated: the blocking NaN stays first.
    ranked = rank_findings(
        [_f("lr-too-low", first_step=0), _f("non-finite-input", first_step=5, severity="error")]
    )
    assert [f.code for f in ranked] == ["non-finite-input", "lr-too-low"]
    assert all(f.likely_causes == () for f in ranked)


def test_a_transitive_cause_leads_even_when_the_link_between_is_missing() -> None:
    # input-not-normalized -> lr-too-high -> dead-relu; with lr-too-high absent the input is still named.
    dead, inp = _f("dead-relu", first_step=0), _f("input-not-normalized", first_step=5)
    assert rank_findings([dead, inp]) == [inp, dead]
    lr = _f("lr-too-high", first_step=3)
    assert [f.code for f in rank_findings([dead, lr, inp])] == [
        "input-not-normalized",
        "lr-too-high",
        "dead-relu",
    ]
    assert dead.likely_causes == ("input-not-normalized", "lr-too-high")


def test_specific_explanations_outrank_the_generic_codes() -> None:
    assert {"stage-error", "loss-plateau"} <= set(GENERIC_CODES)
    # A specific exception code before a generic stage-error seen earlier.
    ranked = rank_findings([_f("stage-error", first_step=0), _f("shape-mismatch", first_step=4)])
    assert [f.code for f in ranked] == ["shape-mismatch", "stage-error"]
    # A stage-error whose explainer names a related code present in the run: that code is its cause.
    err = _f("stage-error", first_step=3, evidence={"related": "nothing-trainable"})
    nt = _f("nothing-trainable", first_step=0)
    assert rank_findings([err, nt]) == [nt, err] and err.likely_causes == ("nothing-trainable",)


def test_an_info_note_that_explains_a_warning_is_pulled_before_it() -> None:
    note = _f("dropout-too-high", first_step=0)
    assert note.severity == "info"
    plateau = _f("loss-plateau", first_step=200)
    other = _f("lr-too-low", first_step=10)
    assert [f.code for f in rank_findings([plateau, other, note])] == [
        "lr-too-low",
        "dropout-too-high",
        "loss-plateau",
    ]
    # A note that explains nothing present stays after the warnings.
    assert [f.code for f in rank_findings([note, other])] == ["lr-too-low", "dropout-too-high"]


def test_likely_causes_do_not_change_equality_keys_or_the_stored_order() -> None:
    s, c = _f("non-finite-grad", severity="error"), _f("loss-sum-reduction", first_step=3)
    before = (s.key, c.key)
    twin = _f("non-finite-grad", severity="error")
    items = [s, c]
    rank_findings(items)
    assert items == [s, c]  # the input list is not reordered
    assert (s.key, c.key) == before and s == twin and s.likely_causes != twin.likely_causes
    # Recomputed on every ranking: once the cause is gone, so is the link.
    rank_findings([s])
    assert s.likely_causes == ()


def test_ranking_is_deterministic_on_every_code() -> None:
    items = [_f(c.value, first_step=i) for i, c in enumerate(Code)]
    once = [f.code for f in rank_findings(items)]
    assert [f.code for f in rank_findings(list(reversed(items)))] == once
    assert sorted(once) == sorted(c.value for c in Code)
    position = {code: i for i, code in enumerate(once)}
    for cause, consequences in CAUSES.items():
        for c in consequences:
            if cause in position and c in position:
                assert position[cause] < position[c], (cause, c)


def test_the_dashboard_finding_card_says_what_likely_caused_it() -> None:
    from tlwidgets.ui.findings import FindingsPanel

    class Session:
        findings = rank_findings([_f("non-finite-grad", severity="error"), _f("loss-sum-reduction", 3)])

    panel = FindingsPanel(lambda name: lambda fn: fn, lambda finding: None)
    panel.draw(Session())
    assert panel.finding(0).code == "loss-sum-reduction"
    cards = [row.children[0].value for row in panel.list.children]
    assert "likely caused by" not in cards[0]
    assert "tlw-likely-causes" in cards[1] and "<code>loss-sum-reduction</code>" in cards[1]
