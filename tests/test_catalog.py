"""The finding catalog: one spec per code, well-formed sentences, make_finding defaults."""

from __future__ import annotations

import dataclasses
import html
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlwidgets.core.catalog import CATALOG, KINDS, Spec, get_spec, make_finding
from tlwidgets.core.findings import Code, Finding, Severity
from tlwidgets.core.stages import Stage

ALL_CODES = list(Code)

STAGE_EXCEPTION_CODES = {
    Code.SHAPE_MISMATCH,
    Code.DEVICE_MISMATCH,
    Code.DTYPE_MISMATCH,
    Code.INPLACE_MODIFICATION,
    Code.OUT_OF_MEMORY,
    Code.TARGET_OUT_OF_RANGE,
    Code.STAGE_ERROR,
}

EXPECTED_ERRORS = STAGE_EXCEPTION_CODES | {
    Code.PARAM_NOT_IN_OPTIMIZER,
    Code.FROZEN_PARAM_CHANGED,
    Code.NOTHING_TRAINABLE,
    Code.NON_FINITE_INPUT,
    Code.NON_FINITE_LOSS,
    Code.NON_FINITE_GRAD,
    Code.OPTIMIZER_NOT_STEPPING,
    Code.GRADS_NOT_ZEROED,
    Code.LABELS_DECOUPLED,
    Code.DATA_LEAKAGE,
    Code.BATCH_MIXING,
    Code.CHANNEL_ORDER,
    Code.RANK_DIVERGENCE,
}

EXPECTED_WARNINGS = {
    Code.DISCONNECTED_PARAM,
    Code.PARAM_NOT_UPDATING,
    Code.LR_TOO_HIGH,
    Code.LR_TOO_LOW,
    Code.EXPLODING_GRADIENTS,
    Code.VANISHING_GRADIENTS,
    Code.DEAD_RELU,
    Code.ZERO_INIT,
    Code.SOFTMAX_BEFORE_LOSS,
    Code.SHAPE_BROADCAST,
    Code.LOSS_SUM_REDUCTION,
    Code.EVAL_MODE_TRAINING,
    Code.FROZEN_BN_STATS_DRIFT,
    Code.SCHEDULER_TOO_FAST,
    Code.GRAD_CLIPPING_TOO_STRONG,
    Code.OVER_REGULARIZATION,
    Code.BN_SMALL_BATCH,
    Code.INPUT_NOT_NORMALIZED,
    Code.UNSHUFFLED_DATA,
    Code.CLASS_IMBALANCE,
    Code.TRAIN_VAL_SHIFT,
    Code.MISSING_ACTIVATION,
    Code.OVERFITTING,
    Code.LOSS_PLATEAU,
}

EXPECTED_INFO = {Code.DROPOUT_TOO_HIGH}

_ABBREVIATIONS = re.compile(r"\b(?:e\.g|i\.e|etc|vs)\.")
_PLACEHOLDERS = re.compile(r"\bTODO\b|\bTBD\b|\bFIXME\b|\bXXX\b|lorem ipsum|\{\w*\}|<[a-z_]+>", re.IGNORECASE)


def _sentence_count(text: str) -> int:
    """Sentences in ``text``: a terminal . ! ? followed by whitespace and a capital, or the end."""
    stripped = _ABBREVIATIONS.sub("", text)
    return len(re.findall(r"[.!?](?=\s+[A-Z]|\s*$)", stripped))


# ---- coverage ---------------------------------------------------------------------------------


def test_every_code_has_a_spec():
    assert set(CATALOG) == {code.value for code in Code}
    assert len(CATALOG) == len(Code)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_spec_is_keyed_by_its_own_code(code):
    spec = CATALOG[code.value]
    assert isinstance(spec, Spec)
    assert spec.code is code
    assert get_spec(code) is spec
    assert get_spec(code.value) is spec


def test_get_spec_rejects_unknown_code():
    with pytest.raises(ValueError):
        get_spec("not-a-code")


# ---- severities and kinds -----------------------------------------------------------------------


def test_severity_table_covers_every_code_once():
    assert set(Code) == EXPECTED_ERRORS | EXPECTED_WARNINGS | EXPECTED_INFO
    assert not (EXPECTED_ERRORS & EXPECTED_WARNINGS)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_default_severity(code):
    spec = CATALOG[code.value]
    assert isinstance(spec.severity, Severity)
    if code in EXPECTED_ERRORS:
        assert spec.severity is Severity.ERROR
    elif code in EXPECTED_INFO:
        assert spec.severity is Severity.INFO
    else:
        assert spec.severity is Severity.WARNING


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_kind_is_valid(code):
    spec = CATALOG[code.value]
    assert spec.kind in KINDS
    assert (spec.kind == "error") == (code in STAGE_EXCEPTION_CODES)


def test_spec_validates_and_is_frozen():
    with pytest.raises(ValueError):
        Spec(Code.STAGE_ERROR, Severity.ERROR, "t", "Cause.", "Fix.", "sometimes")
    with pytest.raises(ValueError):
        Spec("no-such-code", Severity.ERROR, "t", "Cause.", "Fix.", "error")
    spec = Spec("stage-error", "warning", "t", "Cause.", "Fix.", "error")
    assert spec.code is Code.STAGE_ERROR and spec.severity is Severity.WARNING
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.title = "other"  # type: ignore[misc]


# ---- wording ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_title_is_a_few_words(code):
    title = CATALOG[code.value].title
    assert title.strip() == title and title
    assert 1 <= len(title.split()) <= 6
    assert not title.endswith(".")
    assert title[0].isupper()


@pytest.mark.parametrize("field", ["cause", "fix"])
@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_cause_and_fix_are_one_plain_sentence(code, field):
    text = getattr(CATALOG[code.value], field)
    assert text.strip() == text and text, f"{code}: empty or padded {field}"
    assert "\n" not in text
    assert text.endswith("."), f"{code}: {field} does not end a sentence: {text!r}"
    assert text[0].isupper() or text[0] in "'`" or re.match(r"[a-z_.]+\(", text), text
    assert _sentence_count(text) == 1, f"{code}: {field} is not one sentence: {text!r}"
    assert not _PLACEHOLDERS.search(text), f"{code}: placeholder text in {field}: {text!r}"
    assert len(text) <= 260, f"{code}: {field} too long ({len(text)} chars)"


def test_causes_and_fixes_are_distinct():
    causes = [spec.cause for spec in CATALOG.values()]
    fixes = [spec.fix for spec in CATALOG.values()]
    assert len(set(causes)) == len(causes)
    assert len(set(fixes)) == len(fixes)


@pytest.mark.parametrize(
    "code",
    [c for c in ALL_CODES if c not in (Code.STAGE_ERROR, Code.LABELS_DECOUPLED, Code.DATA_LEAKAGE)],
    ids=lambda c: c.value,
)
def test_fix_names_something_concrete(code):
    """Fixes name a call, an argument or a class, not just advice ("check your model")."""
    fix = CATALOG[code.value].fix
    assert re.search(r"\w\(|\w=|\bnn\.|torch\.|\.\w+\(", fix), fix


def test_sentence_counter_sanity():
    assert _sentence_count("One sentence, e.g. with an abbreviation.") == 1
    assert _sentence_count("Call model.train() first.") == 1
    assert _sentence_count("First. Second.") == 2


# ---- make_finding -----------------------------------------------------------------------------------


def test_make_finding_fills_defaults_from_catalog():
    f = make_finding(Code.PARAM_NOT_IN_OPTIMIZER, "fc.weight is in no optimizer group")
    spec = CATALOG["param-not-in-optimizer"]
    assert isinstance(f, Finding)
    assert f.code == "param-not-in-optimizer"
    assert f.severity == "error"
    assert f.message == "fc.weight is in no optimizer group"
    assert f.cause == spec.cause
    assert f.fix == spec.fix
    assert f.step is None and f.stage is None and f.first_step is None
    assert f.params == ()
    assert f.evidence == {}
    assert f.count == 1


def test_make_finding_accepts_string_code_and_stage():
    f = make_finding("lr-too-high", "ratio 0.2", step=7, stage="step", params=["fc.weight", "fc.bias"])
    assert f.code == "lr-too-high"
    assert f.severity == "warning"
    assert f.step == 7 and f.first_step == 7
    assert f.stage is Stage.STEP
    assert f.params == ("fc.weight", "fc.bias")


def test_make_finding_overrides():
    evidence = {"ratio": 0.2}
    f = make_finding(
        Code.DEAD_RELU,
        "92% of units never fire",
        stage=Stage.FORWARD,
        params=("features.3",),
        evidence=evidence,
        severity="error",
        cause="In features.3, most units never activate.",
        fix="Use nn.LeakyReLU in features.3.",
    )
    assert f.severity == "error"
    assert f.cause == "In features.3, most units never activate."
    assert f.fix == "Use nn.LeakyReLU in features.3."
    assert f.params == ("features.3",)
    assert f.evidence == {"ratio": 0.2}
    evidence["ratio"] = 99.0
    assert f.evidence == {"ratio": 0.2}, "evidence must be copied"


def test_make_finding_empty_override_is_kept():
    f = make_finding(Code.LOSS_PLATEAU, "flat", cause="", fix="")
    assert f.cause == "" and f.fix == ""


def test_make_finding_rejects_bad_values():
    with pytest.raises(ValueError):
        make_finding("no-such-code", "x")
    with pytest.raises(ValueError):
        make_finding(Code.LR_TOO_LOW, "x", severity="fatal")
    with pytest.raises(ValueError):
        make_finding(Code.LR_TOO_LOW, "x", stage="optimize")


@given(
    code=st.sampled_from(ALL_CODES),
    severity=st.sampled_from([None, *Severity]),
    step=st.none() | st.integers(0),
)
def test_make_finding_any_code(code, severity, step):
    f = make_finding(code, "observed", step=step, severity=severity)
    assert f.code == code.value
    expected = CATALOG[code.value].severity if severity is None else severity
    assert f.severity == Severity(expected).value
    assert f.step == step


# ---- display ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.value)
def test_finding_text_and_html_show_code_cause_fix(code):
    f = make_finding(code, "what was seen", step=3, stage=Stage.LOSS, params=("fc.weight",))
    text = str(f)
    assert code.value in text
    assert f.cause in text
    assert f.fix in text
    page = f._repr_html_()
    assert code.value in page
    assert html.escape(f.cause) in page
    assert html.escape(f.fix) in page
    assert html.escape("what was seen") in page
