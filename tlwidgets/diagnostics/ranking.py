"""Rank findings so the most likely root cause comes first.

Two things decide a finding's place.

1. **Causal links** (:data:`CAUSES`): an explicit directed graph of which codes can produce which,
   each edge with the mechanism. When a cause and one of its possible consequences are both
   present (directly or through a chain, e.g. unnormalized inputs -> an LR that looks too high ->
   dead ReLUs), the cause comes first, whatever the severities and the steps they were seen at,
   and the consequence names it in ``Finding.likely_causes`` ("likely caused by: ...").
2. **Tiers** (:data:`CAUSAL_ORDER`) for everything the graph does not relate: what blocks
   training outright (setup errors, specific exceptions, then the generic ``stage-error``, NaN/Inf
   in the order input, loss, gradient), then process bugs in the loop or its wiring, then causes
   (data scale, initialization, data, learning rate and its schedule, regularization), then their
   consequences (exploding/vanishing gradients, dead ReLUs, plateau, overfitting). Within one
   tier: severity (error first), then the step the problem was first seen. Info findings (notes
   that need no action on their own) come after every warning and error, unless they are a likely
   cause of one, in which case they are ranked as a cause.

Generic codes (:data:`GENERIC_CODES`) are consequences of every specific explanation that can
produce them, so a specific explanation outranks them. An exception the explainer relates to a
code (``evidence["related"]``) counts that code, when present, as its cause.

``likely_causes`` describes the finding's relation to the *other findings of the list ranked*;
:func:`rank_findings` recomputes it on every call (in place on the given findings, which keeps
their identity: ``likely_causes`` takes no part in equality nor in the finding's key).
"""

from __future__ import annotations

from collections.abc import Sequence

from tlwidgets.core.findings import Code, Finding, Severity

__all__ = [
    "CAUSAL_ORDER",
    "CAUSES",
    "GENERIC_CODES",
    "INIT_EXPLOSION",
    "can_cause",
    "likely_causes",
    "rank_findings",
    "rank_of",
]

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
    ),
    (_C.STAGE_ERROR,),  # generic: after the specific exception codes
    # NaN/Inf, in the order it propagates.
    (_C.NON_FINITE_INPUT,),
    (_C.NON_FINITE_LOSS,),
    (_C.NON_FINITE_GRAD,),
    # Process bugs: the loop or the wiring does something other than intended.
    (_C.OPTIMIZER_NOT_STEPPING, _C.GRADS_NOT_ZEROED, _C.FROZEN_PARAM_CHANGED, _C.RANK_DIVERGENCE),
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


#: Exploding gradients seen *from initialization* (the from-init branch of the rule, evidence
#: ``grad_to_weight``): a graph node of its own, because its links differ from gradients that grew
#: during training. Before any step the LR cannot have caused them; they make it look too high.
INIT_EXPLOSION = "exploding-gradients@init"

#: Codes that say *that* something went wrong, not why: any specific explanation that can
#: produce them outranks them (edges below).
GENERIC_CODES: tuple[str, ...] = (_C.STAGE_ERROR.value, _C.LOSS_PLATEAU.value)

_NF_LOSS, _NF_GRAD = _C.NON_FINITE_LOSS.value, _C.NON_FINITE_GRAD.value
_EXPLODE, _VANISH = _C.EXPLODING_GRADIENTS.value, _C.VANISHING_GRADIENTS.value
_LR_HIGH, _LR_LOW = _C.LR_TOO_HIGH.value, _C.LR_TOO_LOW.value
_DEAD, _PLATEAU, _OVERFIT = _C.DEAD_RELU.value, _C.LOSS_PLATEAU.value, _C.OVERFITTING.value
_STAGE_ERROR = _C.STAGE_ERROR.value

#: cause -> the codes it can produce (a direct mechanism each; chains are followed by
#: :func:`can_cause`). Keys and values are code values, plus :data:`INIT_EXPLOSION`.
CAUSES: dict[str, frozenset[str]] = {
    k: frozenset(v)
    for k, v in {
        # Nothing trains: the loss cannot move; a loss with no grad_fn makes backward() raise.
        "nothing-trainable": {_PLATEAU, _STAGE_ERROR},
        # Parameters the optimizer never steps (or the loss never reaches, or a step never moves)
        # leave the model as it was: the loss stalls.
        "param-not-in-optimizer": {_PLATEAU},
        "disconnected-param": {_PLATEAU},
        "param-not-updating": {_PLATEAU},
        "optimizer-not-stepping": {_PLATEAU},
        # NaN/Inf propagates forward into the loss, backward into every gradient.
        "non-finite-input": {_NF_LOSS, _NF_GRAD},
        "non-finite-loss": {_NF_GRAD},
        # The loss is N x the mean: gradients (and, for SGD, steps) are N x larger, an LR tuned for a
        # mean is N x too high: huge updates, gradients growing with the weights, then Inf/NaN; from
        # the first step on.
        "loss-sum-reduction": {_LR_HIGH, _EXPLODE, INIT_EXPLOSION, _NF_LOSS, _NF_GRAD},
        # Gradients that accumulate grow every step (N steps: N x): the update ratio looks like a
        # too-high LR and the gradient norm grows without bound.
        "grads-not-zeroed": {_LR_HIGH, _EXPLODE},
        # Inputs on a scale of 100s: first-layer gradients and pre-activations scale with them
        # (huge updates, large activations overflowing, units pushed into the dead zone), or
        # saturate tanh/sigmoid units (vanishing gradients); an ill-conditioned problem stalls.
        "input-not-normalized": {
            _LR_HIGH,
            _EXPLODE,
            INIT_EXPLOSION,
            _NF_LOSS,
            _NF_GRAD,
            _DEAD,
            _VANISH,
            _PLATEAU,
        },
        # Symmetric (zero) weights: units stay identical; zero weights pass no gradient back
        # (vanishing), ReLUs on zero pre-activations never fire; the model cannot learn.
        "zero-init": {_DEAD, _VANISH, _PLATEAU},
        # A stack of linear maps is one linear map (it underfits) whose product of weight matrices
        # multiplies (or shrinks) the signal and its gradient layer by layer.
        "missing-activation": {INIT_EXPLOSION, _EXPLODE, _VANISH, _PLATEAU},
        # Gradients huge from initialization: the first steps throw the weights far away (an LR
        # that looks too high, units knocked dead) and the next forward overflows.
        INIT_EXPLOSION: {_LR_HIGH, _NF_LOSS, _NF_GRAD, _DEAD},
        # Gradients that grew during training overflow into Inf/NaN and knock units dead.
        _EXPLODE: {_NF_LOSS, _NF_GRAD, _DEAD},
        # Steps too large: the loss diverges (Inf/NaN), the weights and gradients grow together,
        # ReLUs pushed into the negative zone for good, or the loss bounces without improving. A
        # clip at a healthy max_norm (the Hugging Face Trainer's default 1.0) then cuts those grown
        # gradients by orders of magnitude on every step: clipping too strong is what that looks
        # like, and "raise max_norm" would be the wrong fix.
        _LR_HIGH: {_EXPLODE, _DEAD, _NF_LOSS, _NF_GRAD, _PLATEAU, "grad-clipping-too-strong"},
        # Steps too small: the loss barely moves.
        _LR_LOW: {_PLATEAU},
        # A schedule that collapses the LR (or clipping that cuts every step) makes the LR look too
        # low and stalls the loss.
        "scheduler-too-fast": {_LR_LOW, _PLATEAU},
        "grad-clipping-too-strong": {_LR_LOW, _PLATEAU},
        # Decay dominating the data gradient holds the weights near zero: the loss stalls.
        "over-regularization": {_PLATEAU},
        # Probabilities fed to a loss expecting logits: gradients squashed by the extra softmax.
        "softmax-before-loss": {_VANISH, _PLATEAU},
        # Prediction and target broadcast: the loss compares every prediction to every target, so
        # the best the model can do is the mean.
        "shape-broadcast": {_PLATEAU},
        # Training in eval mode: no dropout (the model memorizes), batch norm on running stats.
        "eval-mode-training": {_OVERFIT, _PLATEAU},
        # BatchNorm in training mode on one example per channel raises ("Expected more than 1
        # value per channel when training"); on 2 examples its statistics are noise (the loss
        # stalls, the running statistics used at evaluation do not match training).
        "bn-small-batch": {_STAGE_ERROR, _PLATEAU, _OVERFIT},
        # Running statistics that drift on frozen batch norm: evaluation normalizes differently
        # from what the frozen layers expect, so the validation loss rises.
        "frozen-bn-stats-drift": {_OVERFIT},
        # Dropping most units: the model underfits.
        "dropout-too-high": {_PLATEAU},
        # Data bugs. Class-sorted batches: each step fits one class (the loss jumps from batch to
        # batch as if the LR were too high, and does not settle), validation suffers.
        "unshuffled-data": {_LR_HIGH, _PLATEAU, _OVERFIT},
        # A skewed label distribution: the model settles on the majority class.
        "class-imbalance": {_PLATEAU, _OVERFIT},
        # Labels unrelated to inputs: nothing generalizes (train loss can only fall by memorizing).
        "labels-decoupled": {_PLATEAU, _OVERFIT},
        # Validation inputs distributed differently: the fit to training does not carry over.
        "train-val-shift": {_OVERFIT},
        # Pixels interleaved across channels: the spatial structure is scrambled, learning stalls.
        "channel-order": {_PLATEAU},
        # Outputs mixing examples: the model fits the batch composition, not the example.
        "batch-mixing": {_PLATEAU, _OVERFIT},
        # Dead units pass no gradient to the layers below, and stop contributing: the loss stalls.
        _DEAD: {_VANISH, _PLATEAU},
        # Tiny gradients in early layers: those layers do not learn.
        _VANISH: {_PLATEAU},
        # Not linked (no mechanism producing another code): data-leakage (it hides overfitting,
        # it does not cause it), the specific exceptions, frozen-param-changed, overfitting,
        # loss-plateau, stage-error.
    }.items()
}


def _closure() -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for start in CAUSES:
        seen: set[str] = set()
        todo = list(CAUSES[start])
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(CAUSES.get(c, ()))
        if start in seen:  # checked at import: a cycle would make "cause first" meaningless
            raise RuntimeError(f"causal graph has a cycle through {start}")
        out[start] = frozenset(seen)
    return out


_REACH = _closure()
_bad = {n for k, v in CAUSES.items() for n in (k, *v)} - set(_RANK) - {INIT_EXPLOSION}
if _bad:
    raise RuntimeError(f"causal graph names unknown codes: {sorted(_bad)}")
del _bad


def can_cause(cause: str, consequence: str) -> bool:
    """Can ``cause`` produce ``consequence`` (directly or through a chain of :data:`CAUSES`)?"""
    return str(consequence) in _REACH.get(str(cause), ())


def _node(f: Finding) -> str:
    """The graph node of a finding: its code, or :data:`INIT_EXPLOSION` for the from-init form."""
    if f.code == _EXPLODE and "grad_to_weight" in (f.evidence or {}):
        return INIT_EXPLOSION
    return f.code


def _causes(a: Finding, b: Finding, na: str, nb: str) -> bool:
    """Is ``a`` a likely cause of ``b``?"""
    if a is b or na == nb:
        return False
    related = (b.evidence or {}).get("related") if b.code == _STAGE_ERROR else None
    return nb in _REACH.get(na, ()) or (related is not None and related == a.code)


def _key(f: Finding, info: bool) -> tuple[bool, int, int, int]:
    first = f.first_step if f.first_step is not None else (f.step if f.step is not None else -1)
    return (info, rank_of(f.code), Severity(f.severity).rank, first)


def likely_causes(finding: Finding, others: Sequence[Finding]) -> tuple[str, ...]:
    """Codes of ``others`` that can cause ``finding``, most root first (no side effect)."""
    ranked = rank_findings([finding, *others], annotate=False)
    nb = _node(finding)
    out: list[str] = []
    for f in ranked:
        if f is not finding and f.code not in out and _causes(f, finding, _node(f), nb):
            out.append(f.code)
    return tuple(out)


def rank_findings(findings: Sequence[Finding], *, annotate: bool = True) -> list[Finding]:
    """Most likely root cause first (deterministic; the input list is not reordered).

    A cause comes before every present finding it can produce (:data:`CAUSES`, followed through
    chains); otherwise causal tier, then severity, then earliest first seen, then input order. Info
    findings follow all warnings and errors unless they can cause one of them.

    With ``annotate`` (the default) each finding's ``likely_causes`` is set to the codes of the
    present findings that can cause it, most root first (``()`` for none).
    """
    items = list(findings)
    n = len(items)
    nodes = [_node(f) for f in items]
    # preds[j]: indices of the findings that can cause finding j.
    preds: list[list[int]] = [[] for _ in range(n)]
    for j in range(n):
        for i in range(n):
            if i != j and _causes(items[i], items[j], nodes[i], nodes[j]):
                preds[j].append(i)
    # An info note that explains a warning or an error is ranked as a cause, not as a note.
    explains = [False] * n
    for j in range(n):
        if items[j].severity != "info":
            for i in preds[j]:
                explains[i] = True
    keys = [(_key(f, f.severity == "info" and not explains[i]), i) for i, f in enumerate(items)]
    # Topological order (the graph is acyclic), picking the best-keyed finding whose causes are placed.
    waiting = [len(p) for p in preds]
    succ: list[list[int]] = [[] for _ in range(n)]
    for j, p in enumerate(preds):
        for i in p:
            succ[i].append(j)
    ready = sorted((keys[i] for i in range(n) if waiting[i] == 0), reverse=True)
    order: list[int] = []
    while ready:
        _, i = ready.pop()
        order.append(i)
        for j in succ[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(keys[j])
                ready.sort(reverse=True)
    if len(order) < n:  # cannot happen with an acyclic graph; never drop a finding
        order += [i for i in sorted(range(n), key=keys.__getitem__) if i not in set(order)]
    ranked = [items[i] for i in order]
    if annotate:
        position = {i: p for p, i in enumerate(order)}
        for j, f in enumerate(items):
            codes: list[str] = []
            for i in sorted(preds[j], key=position.__getitem__):
                if items[i].code not in codes:
                    codes.append(items[i].code)
            f.likely_causes = tuple(codes)
    return ranked
