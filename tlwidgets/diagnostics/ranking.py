"""Rank findings so the most likely root cause comes first.

A finding's place is set by a causal order of codes: what blocks training
outright (setup errors, exceptions, NaN/Inf in the order input, loss,
gradient), then process bugs in the loop or its wiring, then causes (data
scale, initialization, learning rate and its schedule, regularization, data
order), then their consequences (exploding/vanishing gradients, dead ReLUs,
plateau, overfitting). A cause sits before what it produces: a too-high LR
before the exploding gradients and dead ReLUs it leads to, unnormalized inputs
before the LR that looks too high because of them. Within one rank: severity
(error first), then the step the problem was first seen. Info findings (notes
that need no action on their own) come after every warning and error.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlwidgets.core.findings import Code, Finding, Severity

__all__ = ["CAUSAL_ORDER", "rank_findings", "rank_of"]

_C = Code

#: Codes from most to least "root"; codes in one inner tuple share a rank.
CAUSAL_ORDER: tuple[tuple[Code, ...], ...] = (
    # Training cannot happen at all.
    (_C.NOTHING_TRAINABLE, _C.PARAM_NOT_IN_OPTIMIZER),
    (
        _C.SHAPE_MISMATCH,
        _C.DEVICE_MISMATCH,
        _C.DTYPE_MISMATCH,
        _C.INPLACE_MODIFICATION,
        _C.OUT_OF_MEMORY,
        _C.TARGET_OUT_OF_RANGE,
        _C.STAGE_ERROR,
    ),
    # NaN/Inf, in the order it propagates.
    (_C.NON_FINITE_INPUT,),
    (_C.NON_FINITE_LOSS,),
    (_C.NON_FINITE_GRAD,),
    # Process bugs: the loop or the wiring does something other than intended.
    (_C.OPTIMIZER_NOT_STEPPING, _C.GRADS_NOT_ZEROED, _C.FROZEN_PARAM_CHANGED),
    (_C.DISCONNECTED_PARAM, _C.PARAM_NOT_UPDATING),
    (_C.LABELS_DECOUPLED, _C.BATCH_MIXING, _C.CHANNEL_ORDER),
    (_C.SHAPE_BROADCAST, _C.SOFTMAX_BEFORE_LOSS, _C.EVAL_MODE_TRAINING),
    # Causes: data and its order, scale of inputs and of the loss, initialization, architecture ...
    (_C.INPUT_NOT_NORMALIZED, _C.LOSS_SUM_REDUCTION),
    (_C.ZERO_INIT, _C.MISSING_ACTIVATION),
    (_C.UNSHUFFLED_DATA, _C.CLASS_IMBALANCE, _C.DATA_LEAKAGE, _C.TRAIN_VAL_SHIFT),
    # ... then the learning rate: a scheduler collapsing it or clipping that cuts every step
    # explains an LR that looks too low ...
    (_C.SCHEDULER_TOO_FAST, _C.GRAD_CLIPPING_TOO_STRONG),
    (_C.LR_TOO_HIGH, _C.LR_TOO_LOW),
    (_C.OVER_REGULARIZATION,),
    (_C.BN_SMALL_BATCH, _C.FROZEN_BN_STATS_DRIFT, _C.DROPOUT_TOO_HIGH),
    # Consequences.
    (_C.EXPLODING_GRADIENTS, _C.VANISHING_GRADIENTS),
    (_C.DEAD_RELU,),
    (_C.LOSS_PLATEAU,),
    (_C.OVERFITTING,),
)

_RANK: dict[str, int] = {code.value: i for i, tier in enumerate(CAUSAL_ORDER) for code in tier}

missing = {c.value for c in Code} - set(_RANK)
if missing:  # every code must have a place (checked at import so a new code cannot slip through)
    raise RuntimeError(f"codes without a rank: {sorted(missing)}")
del missing


def rank_of(code: str) -> int:
    """Causal rank of ``code`` (lower = more likely a root cause)."""
    return _RANK.get(str(code), len(CAUSAL_ORDER))


def _key(f: Finding) -> tuple[bool, int, int, int]:
    first = f.first_step if f.first_step is not None else (f.step if f.step is not None else -1)
    severity = Severity(f.severity)
    return (severity is Severity.INFO, rank_of(f.code), severity.rank, first)


def rank_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Most likely root cause first: causal rank, then severity, then earliest first seen (stable).

    Info findings follow all warnings and errors (in the same order among themselves).
    """
    return sorted(findings, key=_key)
