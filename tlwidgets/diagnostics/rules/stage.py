"""Per-stage rules: what one batch, one forward, one backward or one step shows.

Each rule reads one stage record (and, where it needs them, the other records
of the same step in ``session.records``). They are cheap: list and dict look-ups
and numpy on per-parameter arrays; the only torch work is the symmetric-init
check on the first few backward passes and a look at bias gradients on the
activation schedule.

The non-finite input/loss/gradient findings are the core's own and are not
repeated here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.controls import is_norm_layer
from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage
from tlwidgets.core.stats import to_host
from tlwidgets.diagnostics.rules.base import (
    RuleContext,
    is_embedding_param,
    rows_identical,
    rule,
    short_list,
)

__all__ = [
    "STAGE_RULES",
    "bn_small_batch",
    "dead_units_from_grads",
    "disconnected_by_grad",
    "disconnected_by_graph",
    "eval_mode_training",
    "frozen_bn_stats_drift",
    "frozen_param_changed",
    "input_not_normalized",
    "loss_sum_reduction",
    "param_not_updating",
    "shape_broadcast",
    "softmax_before_loss",
    "zero_init",
]

# -- thresholds (docs/findings.md explains why each holds on healthy runs) -----------------------
#: Input std above this (or |x| above INPUT_ABSMAX) is "far from unit scale".
INPUT_STD_MAX = 10.0
INPUT_ABSMAX = 100.0
#: Inputs whose largest magnitude is below this are scaled down too far (e.g. divided by 255 twice).
INPUT_ABSMAX_MIN = 1e-2
#: disconnected-param: a trainable optimizer parameter unreached (or without gradient) on every
#: check of a window. While the model's code path has not varied (each check reached the same
#: parameters) the window is DISCONNECTED_CHECKS checks (the first steps are checked every step);
#: once it varies (per-batch routing, stochastic depth), a parameter never reached needs
#: DISCONNECTED_CHECKS_VARYING, and one of interchangeable sibling modules (experts, blocks) some of
#: which are reached in some steps is a branch the model has not taken yet, not disconnected. A
#: parameter reached before needs a gap DISCONNECTED_GAP_FACTOR times its mean interval between
#: reaching checks (a branch still taken at its rate leaves such a gap with p ~ e^-16).
DISCONNECTED_CHECKS = 10
DISCONNECTED_CHECKS_VARYING = 20
DISCONNECTED_GAP_FACTOR = 16
#: Consecutive steps with a zero update (and a gradient) before param-not-updating (LR of 0 / LR > 0).
NOT_UPDATING_STEPS_LR0 = 2
NOT_UPDATING_STEPS = 5
#: With an LR above 0, lr x |grad| must exceed this fraction of |w| (float32 rounding cannot hide it).
VISIBLE_UPDATE = 1e-5
#: Fraction of a layer's units with exactly zero bias gradient, and how many checks in a row.
DEAD_GRAD_FRAC = 0.9
DEAD_CHECKS = 3
#: Symmetric-init checks (first backward passes) that must agree.
ZERO_INIT_CHECKS = 2
ZERO_INIT_MAX_CHECKS = 3

#: Schedule of stage rules about facts that persist over steps (a loss reduction, prediction and
#: target shapes): checked on the first 3 steps and every 5th, so a run pays a fifth of
#: their price; rules about process bugs that must be named within two steps run every step.
_PERSISTENT = {"every": 5, "early": 3}

# Losses that apply log_softmax / sigmoid themselves and so expect raw logits.
_EXPECT_LOGITS = {
    "CrossEntropyLoss",
    "cross_entropy",
    "BCEWithLogitsLoss",
    "binary_cross_entropy_with_logits",
}
_EXPECT_LOG_PROBS = {"NLLLoss", "nll_loss"}
_SIGMOID_LOGIT_LOSSES = {"BCEWithLogitsLoss", "binary_cross_entropy_with_logits"}
# Losses that compare prediction and target element by element (shapes must match).
_ELEMENTWISE = {
    "MSELoss",
    "L1Loss",
    "SmoothL1Loss",
    "HuberLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "SoftMarginLoss",
    "PoissonNLLLoss",
    "KLDivLoss",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
}
_CLASS_LOSSES = {"CrossEntropyLoss", "cross_entropy", "NLLLoss", "nll_loss", "MultiMarginLoss"}


# ================================================================================ FETCH
def _first_leaf(ctx: RuleContext) -> nn.Module | None:
    def build() -> nn.Module | None:
        for _, m in ctx.session.model.named_modules():
            if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
                return m
        return None

    return ctx.cached("first_leaf", build)


def _recurrent_states(ctx: RuleContext) -> list[tuple[int | None, frozenset[int]]]:
    """Shapes of the recurrent layers' states: ``(leading size or None, last sizes)`` per layer.

    ``nn.LSTM``/``nn.GRU``/``nn.RNN`` take ``h_0`` (and ``c_0``) shaped
    ``(num_layers * directions, batch, hidden)`` (or without the batch); the
    ``*Cell`` layers take ``(batch, hidden)``. An LSTM's ``h`` has ``proj_size``
    features when it projects.
    """

    def build() -> list[tuple[int | None, frozenset[int]]]:
        out: list[tuple[int | None, frozenset[int]]] = []
        for m in ctx.modules().values():
            if isinstance(m, nn.RNNBase):
                lead = m.num_layers * (2 if m.bidirectional else 1)
                out.append((lead, frozenset({m.hidden_size, getattr(m, "proj_size", 0) or m.hidden_size})))
            elif isinstance(m, nn.RNNCellBase):
                out.append((None, frozenset({m.hidden_size})))
        return out

    return ctx.cached("recurrent_states", build)


def _is_recurrent_state(shape: tuple[int, ...], states: list[tuple[int | None, frozenset[int]]]) -> bool:
    """Is a tensor of ``shape`` shaped like the state of one of the model's recurrent layers?"""
    for lead, last in states:
        if not shape or shape[-1] not in last:
            continue
        if lead is None and len(shape) == 2:  # an RNN cell's (batch, hidden)
            return True
        if lead is not None and len(shape) in (2, 3) and shape[0] == lead:
            return True
    return False


@rule(
    "input-not-normalized",
    ["input-not-normalized"],
    "stage",
    stages=[Stage.FETCH],
    needs=["tensors", "non_finite"],  # non_finite is None when the batch was not scanned this step
)
def input_not_normalized(ctx: RuleContext) -> list[Finding]:
    """Floating-point data inputs (per-example feature tensors) far from unit scale.

    Only data is judged. A model with recurrent layers is often called as
    ``model(x, hidden)`` with its own state from the previous batch fed back
    (``hidden = tuple(h.detach() for h in hidden)``): that state is computed by
    the model (an LSTM's cell state grows well beyond unit scale, as it
    should) and nothing the user could normalize. An input tensor after the
    first one that has the shape of a recurrent layer's state is that state;
    the first input tensor (the data the model is called on) is always judged.
    """
    first = _first_leaf(ctx)
    if first is not None and is_norm_layer(first):  # the model normalizes its own input
        return []
    tensors = ctx.data.tensors
    data_path = next((p for p in tensors if p.startswith("inputs")), None)
    states = _recurrent_states(ctx)
    found = []
    for path, info in tensors.items():
        if not path.startswith("inputs") or "std" not in info or len(info.get("shape", ())) < 2:
            continue  # targets, integer tensors (token ids), per-example scalars (timesteps, lengths)
        if states and path != data_path and _is_recurrent_state(tuple(info["shape"]), states):
            continue  # the model's own recurrent state fed back in: not data
        lo, hi, std, mean = info.get("min"), info.get("max"), info.get("std"), info.get("mean")
        if lo is None or hi is None or std is None or not all(map(math.isfinite, (lo, hi, std))):
            continue
        absmax = max(abs(lo), abs(hi))
        if std > INPUT_STD_MAX or absmax > INPUT_ABSMAX:
            what = f"std {std:.3g}, range [{lo:.4g}, {hi:.4g}]"
            cause = (
                f"'{path}' spans [{lo:.4g}, {hi:.4g}] (std {std:.3g}), far from zero mean and unit scale, "
                "so the first layer's pre-activations and gradients are huge and the usable learning rate "
                "tiny."
            )
        elif 0 < absmax < INPUT_ABSMAX_MIN:
            what = f"all values within ±{absmax:.2g}"
            cause = (
                f"'{path}' never exceeds {absmax:.2g} in magnitude (scaled down twice, e.g. divided by 255 "
                "after ToTensor()), so the first layer sees almost no signal."
            )
        else:
            continue
        found.append(
            ctx.finding(
                "input-not-normalized",
                f"input '{path}' is not normalized: {what} (mean {mean:.3g})",
                params=(path,),
                evidence={"tensor": path, "min": lo, "max": hi, "mean": mean, "std": std},
                cause=cause,
            )
        )
    return found


# ================================================================================ LOSS
def _loss_name(ctx: RuleContext) -> str:
    name = ctx.data.loss_fn
    if name:
        return str(name)
    fn = getattr(ctx.session, "loss_fn", None)
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", "")


@rule(
    "softmax-before-loss",
    ["softmax-before-loss"],
    "stage",
    stages=[Stage.LOSS],
    **_PERSISTENT,
    needs=["output_shape"],
)
def softmax_before_loss(ctx: RuleContext) -> list[Finding]:
    """(Log-)probabilities fed to a loss that applies (log_)softmax itself (or softmax fed to NLL)."""
    d = ctx.data
    prob, logprob = d.output_is_probability, d.output_is_log_probability
    if not (prob or logprob) and ctx.session.kind != "runner":
        return []
    name = _loss_name(ctx)
    if name in _EXPECT_LOGITS and name not in _SIGMOID_LOGIT_LOSSES and (prob or logprob):
        kind = "probabilities (softmax output)" if prob else "log-probabilities (log_softmax output)"
        cause = f"The model's output rows are already {kind}, but {name} applies log_softmax itself" + (
            ", so gradients are squashed and learning stalls."
            if prob
            else "; it happens to give the same loss, but the final log_softmax is redundant and "
            "hides which loss the model was meant for."
        )
        fix = (
            "Remove the final nn.Softmax / nn.LogSoftmax and feed raw logits to nn.CrossEntropyLoss "
            "(or keep log_softmax and switch to nn.NLLLoss)."
        )
        return [
            ctx.finding(
                "softmax-before-loss",
                f"{name} receives {kind}: rows sum to 1 within {d.output_row_sum_dev or 0:.1e}"
                if prob
                else f"{name} receives {kind}: logsumexp of each row is 0 within "
                f"{d.output_logsumexp_dev or 0:.1e}",
                evidence={"loss_fn": name, "probability": bool(prob), "log_probability": bool(logprob)},
                cause=cause,
                fix=fix,
            )
        ]
    if name in _EXPECT_LOG_PROBS and prob and not logprob:
        return [
            ctx.finding(
                "softmax-before-loss",
                f"{name} receives probabilities (softmax output) where it expects log-probabilities",
                evidence={"loss_fn": name, "probability": True},
                cause=f"{name} expects log_softmax output but gets softmax probabilities, so the loss is "
                "-p(target) instead of -log p(target) and its gradients vanish as p grows.",
                fix="Use F.log_softmax(logits, dim=1) with nn.NLLLoss, or feed raw logits to "
                "nn.CrossEntropyLoss.",
            )
        ]
    if name in _SIGMOID_LOGIT_LOSSES:
        return _sigmoid_before_bce(ctx, name)
    return []


def _sigmoid_before_bce(ctx: RuleContext, name: str) -> list[Finding]:
    """BCEWithLogitsLoss fed outputs strictly inside (0, 1) for several steps: a sigmoid was applied."""
    fwd = ctx.session.records.get(Stage.FORWARD)
    if fwd is None or fwd.step != ctx.step:
        return []
    lo, hi = fwd.data.output_min, fwd.data.output_max
    st = ctx.state
    inside = lo is not None and hi is not None and lo > 0.0 and hi < 1.0
    st["inside"] = st.get("inside", 0) + 1 if inside else 0
    if st["inside"] < 3:
        return []
    return [
        ctx.finding(
            "softmax-before-loss",
            f"{name} receives values strictly inside (0, 1) (range [{lo:.3g}, {hi:.3g}]) on "
            f"{st['inside']} steps in a row: a sigmoid was applied before a loss that applies it itself",
            evidence={"loss_fn": name, "output_min": lo, "output_max": hi},
            cause=f"The model ends in a sigmoid, but {name} applies the sigmoid itself, so the outputs are "
            "squashed twice and gradients shrink.",
            fix="Remove the final nn.Sigmoid and keep nn.BCEWithLogitsLoss (or keep the sigmoid and use "
            "nn.BCELoss).",
        )
    ]


@rule(
    "shape-broadcast",
    ["shape-broadcast"],
    "stage",
    stages=[Stage.LOSS],
    **_PERSISTENT,
    needs=["output_shape", "target_shape"],
)
def shape_broadcast(ctx: RuleContext) -> list[Finding]:
    """Prediction and target shapes differ but broadcast, so an element-wise loss compares all pairs."""
    d = ctx.data
    out, tgt = tuple(d.output_shape), tuple(d.target_shape)
    if out == tgt or not out or not tgt:
        return []
    name = _loss_name(ctx)
    if name in _CLASS_LOSSES:
        return []  # (N, C) outputs with (N,) class targets are the normal layout
    floating = str(d.target_dtype or "").startswith(("float", "bfloat", "half", "double"))
    if name not in _ELEMENTWISE and not floating:
        return []
    try:
        full = tuple(torch.broadcast_shapes(out, tgt))
    except RuntimeError:
        return []  # incompatible: the loss raises, and the stage-error explanation covers it
    return [
        ctx.finding(
            "shape-broadcast",
            f"{name or 'the loss'} gets output {list(out)} and target {list(tgt)}, which broadcast to "
            f"{list(full)}",
            evidence={"output_shape": out, "target_shape": tgt, "broadcast_shape": full, "loss_fn": name},
            cause=f"The prediction {list(out)} and target {list(tgt)} have different shapes, so the loss "
            f"broadcasts them to {list(full)} and compares predictions with the wrong targets.",
            fix="Make the shapes identical before the loss, e.g. output.squeeze(-1) or "
            "target.view_as(output).",
        )
    ]


@rule(
    "loss-sum-reduction", ["loss-sum-reduction"], "stage", stages=[Stage.LOSS], needs=["loss"], **_PERSISTENT
)
def loss_sum_reduction(ctx: RuleContext) -> list[Finding]:
    """``reduction='sum'``, or a class loss larger than any mean over the batch could be."""
    d = ctx.data
    name = _loss_name(ctx)
    if d.reduction == "sum":
        return [
            ctx.finding(
                "loss-sum-reduction",
                f"{name} uses reduction='sum': the loss and its gradient grow with the batch size "
                f"({d.batch_size})",
                evidence={"reduction": "sum", "batch_size": d.batch_size, "loss": d.loss},
            )
        ]
    # For a cross-entropy-like loss on logits z, every example's loss is at most
    # ln C + (max z - min z); a mean over the batch cannot exceed that bound.
    if d.reduction is not None or ctx.session.kind != "runner":
        return []
    expected, loss, batch = d.expected_initial_loss, d.loss, d.batch_size or 0
    fwd = ctx.session.records.get(Stage.FORWARD)
    if expected is None or batch < 4 or fwd is None or fwd.step != ctx.step or not math.isfinite(loss):
        return []
    if not str(d.target_dtype or "").startswith(("int", "long", "uint")):
        return []
    lo, hi = fwd.data.output_min, fwd.data.output_max
    if lo is None or hi is None:
        return []
    bound = expected + (hi - lo) + max(0.0, -lo)
    # Beyond any mean, and about batch-size times ln(C) as a summed loss of an untrained model is
    # (a penalty term added to a mean loss also exceeds the bound but does not scale this way).
    if loss <= 2.0 * bound or not 0.4 * batch * expected <= loss <= 3.0 * batch * expected:
        return []
    return [
        ctx.finding(
            "loss-sum-reduction",
            f"the loss {loss:.4g} exceeds what a mean over the batch can reach ({bound:.3g}); "
            f"it scales with the batch size ({batch})",
            evidence={"loss": loss, "bound": bound, "batch_size": batch, "loss_fn": name},
            cause="The per-example losses are summed (e.g. .sum() or reduction='sum'), so the gradient "
            "scales "
            "with the batch size and so does the effective learning rate.",
            fix="Average over the batch: loss.mean(), reduction='mean', or divide the sum by the batch size.",
        )
    ]


def _bn_train_modules(ctx: RuleContext, fwd: Any) -> list[str]:
    """BatchNorm modules that used batch statistics in this forward (train mode)."""
    bns = ctx.cached(
        "bn_modules",
        lambda: [
            n for n, m in ctx.session.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ],
    )
    if not bns:
        return []
    eval_names = set(fwd.data.eval_modules or [])
    return [n for n in bns if n not in eval_names]


@rule("bn-small-batch", ["bn-small-batch"], "stage", stages=[Stage.LOSS], **_PERSISTENT)
def bn_small_batch(ctx: RuleContext) -> list[Finding]:
    """Batch norm in train mode on a batch of 1 or 2 examples."""
    fetch = ctx.session.records.get(Stage.FETCH)
    batch = fetch.data.batch_size if fetch is not None and fetch.step == ctx.step else None
    if batch is None:
        batch = ctx.data.batch_size
    if batch is None or batch > 2:
        return []
    fwd = ctx.session.records.get(Stage.FORWARD)
    if fwd is None:
        return []
    bns = _bn_train_modules(ctx, fwd)
    if not bns:
        return []
    params = ctx.stable_params("bn-small-batch", bns)
    return [
        ctx.finding(
            "bn-small-batch",
            f"batch norm trained on a batch of {batch}: {short_list(bns)}",
            params=params,
            evidence={"batch_size": batch, "modules": bns},
        )
    ]


@rule(
    "disconnected-by-graph",
    ["disconnected-param"],
    "stage",
    stages=[Stage.LOSS],
    needs=["unreached"],
)
def disconnected_by_graph(ctx: RuleContext) -> list[Finding]:
    """Trainable optimizer parameters the loss's graph does not reach on every check of a window.

    The reached parameters are measured on the first steps and then now and then
    (:mod:`tlwidgets.core.recording`); see :func:`_disconnected` for the window.
    """
    groups = ctx.group_index()
    index = ctx.cached("param_index", lambda: {n: i for i, n in enumerate(ctx.session.param_names)})
    unreached = [n for n in ctx.data.unreached if n in index and groups[index[n]] >= 0]
    return _disconnected(ctx, unreached, "the loss's autograd graph does not reach them")


@rule(
    "disconnected-by-grad",
    ["disconnected-param", "param-not-updating"],
    "stage",
    stages=[Stage.BACKWARD],
    needs=["missing_grad"],
)
def disconnected_by_grad(ctx: RuleContext) -> list[Finding]:
    """Trainable optimizer parameters whose ``.grad`` is still ``None`` after backward on every check of a
    window (see :func:`_disconnected`).

    In an own loop, a parameter the loss *did* reach but that has no gradient
    at ``optimizer.step()`` had its gradient cleared in between (a
    ``zero_grad()`` between ``backward()`` and ``step()``).
    """
    why = "their .grad is still None after backward()"
    if not ctx.data.missing_grad:
        return _disconnected(ctx, [], why)  # the common case, every step: every gradient is there
    groups = ctx.group_index()
    index = ctx.cached("param_index", lambda: {n: i for i, n in enumerate(ctx.session.param_names)})
    missing = [n for n in ctx.data.missing_grad if n in index and groups[index[n]] >= 0]
    found: list[Finding] = []
    loop = getattr(ctx.session, "loop", None)
    if ctx.session.kind == "watch" and missing and getattr(loop, "steps_before_backward", 0) >= 1:
        params = ctx.stable_params("param-not-updating", missing, "step-before-backward")
        return [
            ctx.finding(
                "param-not-updating",
                f"optimizer.step() runs before loss.backward(): {len(missing)} parameter(s) have no "
                f"gradient at each step ({short_list(missing)}), so nothing is updated",
                params=params,
                evidence={"params": missing, "steps": loop.steps_before_backward},
                cause="The step is taken while the iteration's loss has not been backpropagated yet; the "
                "gradients backward() computes afterwards are cleared by the next zero_grad() before any "
                "step uses them.",
                fix="Order the iteration as optimizer.zero_grad(); loss = ...; loss.backward(); "
                "optimizer.step().",
            )
        ]
    if ctx.session.kind == "watch" and missing:
        loss = ctx.session.records.get(Stage.LOSS)
        reached = set(loss.data.reached or []) if loss is not None and loss.step == ctx.step else set()
        cleared = [n for n in missing if n in reached]
        st = ctx.state
        st["cleared"] = st.get("cleared", 0) + 1 if cleared else 0
        if cleared:
            missing = [n for n in missing if n not in reached]
            if st["cleared"] >= 1:
                params = ctx.stable_params("param-not-updating", cleared, "cleared")
                found.append(
                    ctx.finding(
                        "param-not-updating",
                        f"{len(cleared)} parameter(s) reached by the loss have no gradient at "
                        "optimizer.step(): "
                        f"{short_list(cleared)}",
                        params=params,
                        evidence={"params": cleared},
                        cause="The gradients that backward() computed are cleared before optimizer.step() "
                        "runs "
                        "(optimizer.zero_grad() sits between loss.backward() and optimizer.step()), "
                        "so the step has nothing to apply.",
                        fix="Call optimizer.zero_grad() before loss.backward() (at the start of the "
                        "iteration), "
                        "never between backward() and step().",
                    )
                )
    found.extend(_disconnected(ctx, missing, why))
    return found


def _disconnected(ctx: RuleContext, names: list[str], why: str) -> list[Finding]:
    """``disconnected-param`` for the parameters in ``names`` (not connected at this check) when
    they have been unconnected on every check of a window.

    A parameter the loss reaches in some steps is connected: a mixture of experts
    routes a batch to one expert, stochastic depth skips blocks, so one check (or
    two) without a gradient says nothing. Each check is one observation per step
    of every trainable optimizer parameter (connected or not); the window a
    parameter must stay unconnected for grows with what the run has shown:

    * the code path never varied so far: :data:`DISCONNECTED_CHECKS` checks (a
      ``.detach()`` or a layer forward() never calls is found within the first
      steps, which are all checked); :data:`DISCONNECTED_CHECKS_VARYING` for a
      parameter of one of several interchangeable sibling modules (same class
      and parameter shapes under one parent: experts, blocks, twin heads) of
      which another is reached (a router that has not switched yet);
    * it varies, and the parameter was never reached: :data:`DISCONNECTED_CHECKS_VARYING`
      checks;
    * it was reached before: :data:`DISCONNECTED_GAP_FACTOR` times its mean
      interval between reaching checks (a branch still taken at its rate does
      not leave such a gap), and at least :data:`DISCONNECTED_CHECKS`;
    * never while one of its interchangeable siblings is reached in some steps
      and not in others: the model picks among them (a router, stochastic
      depth), and one it has not picked yet, or lately (a router that settled on
      other experts), is not cut off by construction.
    """
    st = ctx.state
    step = ctx.step
    if st.get("last_step") == step:
        return []  # one observation per step (a stage retried after a failure)
    st["last_step"] = step
    if not names and not st.get("any_dry"):
        # The common case, every measured step: every parameter connected. Counted here and
        # added to each observed parameter's checks and uses at the next check that needs them.
        st["clean"] = st.get("clean", 0) + 1
        return []
    observed = (ctx.group_index() >= 0) & ctx.trainable()
    n = observed.shape[0]
    arrays = st.get("arrays")
    if arrays is None or arrays[0].shape[0] != n:
        arrays = st["arrays"] = (
            np.zeros(n, dtype=np.int64),  # checks that observed the parameter
            np.zeros(n, dtype=np.int64),  # ... that found it connected
            np.zeros(n, dtype=np.int64),  # current run of unconnected checks
            np.zeros(n, dtype=np.int64),  # step where that run started
            np.zeros(n, dtype=bool),  # seen both connected and not: its branch varies
        )
    checks, uses, streak, since, varied = arrays
    clean = st.pop("clean", 0)
    if clean:
        checks += clean * observed
        uses += clean * observed
    index = ctx.cached("param_index", lambda: {name: i for i, name in enumerate(ctx.session.param_names)})
    dry = np.zeros(n, dtype=bool)
    dry[[index[name] for name in names if name in index]] = True
    dry &= observed
    checks += observed
    uses += observed & ~dry
    since[dry & (streak == 0)] = step
    streak[:] = np.where(dry, streak + 1, 0)
    varied |= (uses > 0) & (checks > uses)
    st["any_dry"] = bool(dry.any())
    if not st["any_dry"]:
        return []
    varying = bool(varied.any())
    never = uses == 0
    gap = DISCONNECTED_GAP_FACTOR * checks / np.maximum(uses, 1)  # x the mean interval between uses
    need = np.where(
        never,
        DISCONNECTED_CHECKS_VARYING if varying else DISCONNECTED_CHECKS,
        np.maximum(DISCONNECTED_CHECKS, gap),
    )
    hit = dry & (streak >= need)
    if hit.any():
        peers = _interchangeable_peers(ctx)
        for i in np.flatnonzero(hit):
            mine = peers[i]
            if varied[mine].any():
                hit[i] = False  # an expert / a block: the model picks among them, not this one lately
            elif never[i] and (uses[mine] > 0).any() and streak[i] < DISCONNECTED_CHECKS_VARYING:
                hit[i] = False  # one of several alike modules in use (a router that has not switched yet?)
    if not hit.any():
        return []
    param_names = ctx.session.param_names
    found = [param_names[i] for i in np.flatnonzero(hit)]
    checks_hit = int(streak[hit].min())
    steps = int(step - since[hit].max()) + 1
    params = ctx.stable_params("disconnected-param", found)
    mods = sorted({name.rpartition(".")[0] or name for name in found})
    cause = (
        f"The loss does not depend on {short_list(mods, 3)}: a .detach(), an .item()/.numpy() round trip, "
        "torch.no_grad(), or a branch that forward() never uses cuts it off, so its .grad stays None."
    )
    if varying:
        which = "these parameters were" if never[hit].all() else "these parameters (some reached before) were"
        cause += (
            f" The model's code path varies between steps (routing, skipped blocks), but {which} not "
            f"reached on any of the last {checks_hit} checks, far longer than a branch taken now and then."
        )
    return [
        ctx.finding(
            "disconnected-param",
            f"{len(found)} trainable parameter(s) in the optimizer get no gradient ({why}) on every one of "
            f"the last {checks_hit} checks ({steps} steps): {short_list(found)}",
            params=params,
            evidence={
                "params": found,
                "modules": mods,
                "checks": checks_hit,
                "steps": steps,
                "varying_code_path": varying,
            },
            cause=cause,
        )
    ]


def _interchangeable_peers(ctx: RuleContext) -> list[np.ndarray]:
    """Per parameter (history column): the columns of the parameters of its interchangeable siblings.

    Siblings are modules with one parent, one class and the same parameter
    names and shapes (the experts of a ``ModuleList``, the blocks of a stack),
    at any level above the parameter.
    """

    def build() -> list[np.ndarray]:
        mods = ctx.modules()
        names = list(ctx.session.param_names)
        under: dict[str, list[int]] = {}  # module name -> columns of the parameters below it
        for i, name in enumerate(names):
            parts = name.split(".")
            for depth in range(1, len(parts)):
                under.setdefault(".".join(parts[:depth]), []).append(i)
        signatures: dict[str, tuple[Any, ...]] = {}

        def signature(name: str, module: nn.Module) -> tuple[Any, ...]:
            got = signatures.get(name)
            if got is None:
                shapes = tuple((k, tuple(p.shape)) for k, p in module.named_parameters())
                got = signatures[name] = (type(module), shapes)
            return got

        out = []
        for name in names:
            parts = name.split(".")[:-1]
            cols: set[int] = set()
            for depth in range(1, len(parts) + 1):
                own, parent_name = ".".join(parts[:depth]), ".".join(parts[: depth - 1])
                module, parent = mods.get(own), mods.get(parent_name)
                if module is None or parent is None:
                    continue
                sig = signature(own, module)
                if not sig[1]:
                    continue
                for child_name, child in parent.named_children():
                    full = f"{parent_name}.{child_name}" if parent_name else child_name
                    if full != own and signature(full, child) == sig:
                        cols.update(under.get(full, ()))
            out.append(np.array(sorted(cols), dtype=np.int64))
        return out

    return ctx.cached("interchangeable_peers", build)


# ================================================================================ BACKWARD
@rule("zero-init", ["zero-init"], "stage", stages=[Stage.BACKWARD], needs=["grad_norm"])
def zero_init(ctx: RuleContext) -> list[Finding]:
    """Weight matrices whose rows (units) are identical *and* get identical gradients: symmetry never breaks.

    Checked on the first few backward passes only (one pass over those
    weights and gradients each): a zero last layer whose gradient rows differ
    (a deliberate init in some architectures) is not flagged.
    """
    st = ctx.state
    checks = st.get("checks", 0)
    if ctx.data.loop_event or checks >= ZERO_INIT_MAX_CHECKS:
        return []
    st["checks"] = checks + 1
    owners = ctx.param_module()
    hits: dict[str, int] = st.setdefault("hits", {})
    cands = [
        (name, p)
        for name, p in ctx.session.named_params
        if p.dim() >= 2
        and p.shape[0] >= 2
        and p.requires_grad
        and p.grad is not None
        and not p.grad.is_sparse
        and not is_embedding_param(owners[name][1])
    ]
    symmetric = rows_identical([t for _, p in cands for t in (p, p.grad)])
    found = []
    for i, (name, p) in enumerate(cands):
        g = p.grad
        if symmetric[2 * i] and symmetric[2 * i + 1]:
            hits[name] = hits.get(name, 0) + 1
        else:
            hits.pop(name, None)
            continue
        if hits[name] >= ZERO_INIT_CHECKS:
            with torch.no_grad():
                value = float(p.detach().reshape(-1)[0])
                gzero = bool((g == 0).all())
            module = owners[name][0]
            what = "all zero" if value == 0 else f"all rows equal (first value {value:.3g})"
            found.append(
                ctx.finding(
                    "zero-init",
                    f"'{name}' ({p.shape[0]} units) is {what} and its gradient rows are "
                    + ("all zero" if gzero else "identical too")
                    + f" on {hits[name]} steps: its units stay copies of each other",
                    params=(name,),
                    evidence={
                        "param": name,
                        "first_value": value,
                        "grad_zero": gzero,
                        "units": int(p.shape[0]),
                    },
                    cause=f"'{name}' was initialized symmetrically (all zeros or one constant), so every "
                    "unit of "
                    f"'{module}' computes the same output and gets the same gradient, and they never become "
                    "different.",
                    fix=f"Initialize '{name}' randomly, e.g. "
                    f"nn.init.kaiming_uniform_({module or 'layer'}.weight, "
                    "a=5 ** 0.5) (PyTorch's default) or nn.init.xavier_uniform_, and keep zeros for biases "
                    "only.",
                )
            )
    return found


def _relu_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.ReLU, nn.ReLU6, nn.Threshold)) or (
        isinstance(m, nn.Hardtanh) and getattr(m, "min_val", -1) >= 0
    )


@rule(
    "dead-units-from-grads",
    ["dead-relu"],
    "stage",
    stages=[Stage.BACKWARD],
    needs=["grad_norm"],
    **_PERSISTENT,
)
def dead_units_from_grads(ctx: RuleContext) -> list[Finding]:
    """Layers whose bias gradient is exactly zero for most units on several checks: units behind a dead ReLU.

    Covers models that apply ReLU functionally (``F.relu``), which the
    activation probes cannot see as a module; models with ``nn.ReLU``
    modules are judged from the activation statistics instead
    (:func:`tlwidgets.diagnostics.rules.trend.dead_relu`). Checked on the
    activation schedule (first 3 steps, then every 10): one small pass over
    the bias gradients.
    """
    s = ctx.session
    if ctx.data.loop_event:
        return []
    has_relu_modules = ctx.cached("has_relu_modules", lambda: any(_relu_like(m) for m in s.model.modules()))
    if has_relu_modules:
        return []
    step = ctx.step
    if not (step < 3 or step % 10 == 0):
        return []
    owners = ctx.param_module()
    cands = ctx.cached(
        "bias_params",
        lambda: [
            (n, p)
            for n, p in s.named_params
            if p.dim() == 1
            and n.endswith("bias")
            and p.numel() >= 4
            and isinstance(owners[n][1], (nn.Linear, nn.modules.conv._ConvNd))
        ],
    )
    live = [(n, p.grad) for n, p in cands if p.requires_grad and p.grad is not None]
    if not live:
        return []
    with torch.no_grad():
        fracs = torch.stack([(g == 0).float().mean() for _, g in live]).cpu().numpy()
    st = ctx.state
    streak: dict[str, int] = st.setdefault("streak", {})
    found = []
    for (name, _), frac in zip(live, fracs):
        if frac > DEAD_GRAD_FRAC:
            streak[name] = streak.get(name, 0) + 1
        else:
            streak.pop(name, None)
            continue
        if streak[name] >= DEAD_CHECKS:
            module = owners[name][0]
            found.append(
                ctx.finding(
                    "dead-relu",
                    f"{frac:.0%} of the units of '{module}' get exactly zero gradient on {streak[name]} "
                    "checks "
                    "in a row: they sit behind a ReLU that never fires",
                    params=(module,),
                    evidence={"module": module, "zero_grad_frac": float(frac), "checks": streak[name]},
                )
            )
    return found


# ================================================================================ STEP
@rule(
    "frozen-param-changed",
    ["frozen-param-changed"],
    "stage",
    stages=[Stage.STEP],
    needs=["frozen_changed"],
)
def frozen_param_changed(ctx: RuleContext) -> list[Finding]:
    """A parameter with ``requires_grad=False`` changed during ``optimizer.step()``."""
    changed = list(ctx.data.frozen_changed)
    if not changed:
        return []
    opt = ctx.session.optimizer
    groups = ctx.group_index()
    index = ctx.cached("param_index", lambda: {n: i for i, n in enumerate(ctx.session.param_names)})
    why = set()
    for n in changed:
        gi = groups[index[n]] if n in index else -1
        if gi >= 0:
            g = opt.param_groups[gi]
            if float(g.get("weight_decay", 0) or 0) > 0:
                why.add("weight decay")
            if float(g.get("momentum", 0) or 0) > 0 or "betas" in g:
                why.add("momentum")
    how = " and ".join(sorted(why)) or "the optimizer"
    params = ctx.stable_params("frozen-param-changed", changed)
    return [
        ctx.finding(
            "frozen-param-changed",
            f"{len(changed)} frozen parameter(s) (requires_grad=False) changed at optimizer.step(): "
            f"{short_list(changed)}",
            params=params,
            severity="error",
            evidence={"params": changed, "moved_by": sorted(why)},
            cause=f"These parameters have requires_grad=False but are still in an optimizer group, and {how} "
            "keeps moving them through their stale gradient.",
        )
    ]


@rule(
    "param-not-updating",
    ["param-not-updating"],
    "stage",
    stages=[Stage.STEP],
    needs=["update_norm"],
)
def param_not_updating(ctx: RuleContext) -> list[Finding]:
    """A trainable optimizer parameter with a non-zero gradient but a zero update, step after step.

    Update norms are usually measured on a sample of each tensor. A sampled zero
    is not "did not change" when the gradient is sparse: under Adadelta, Adagrad
    or RMSprop (and Adam, for elements that never had a gradient) an element
    without gradient does not move, so a sample that sits on dead units or on
    inputs that are always 0 reads 0 while the rest of the layer trains. A run
    of sampled zeros is reported only when the whole tensor is unchanged over
    it (:func:`_confirm_unchanged`); a group whose LR is 0 needs no confirmation.
    """
    s = ctx.session
    st = ctx.state
    update = ctx.data.update_norm
    # The common case first (this runs every step): every parameter moved.
    if not st.get("streak_any") and update.size and update.min() > 0:
        return []
    bwd = s.records.get(Stage.BACKWARD)
    if bwd is None or bwd.step != ctx.step or bwd.data.grad_norm is None:
        return []
    grad = bwd.data.grad_norm
    if np.shape(grad) != np.shape(update):
        return []
    stuck = (update == 0) & (grad > 0)
    if not stuck.any():
        st.pop("streak", None)
        st.pop("prints", None)
        st["streak_any"] = False
        return []
    groups = ctx.group_index()
    if groups.shape != stuck.shape:
        return []
    stuck &= np.isfinite(grad) & (groups >= 0) & ctx.trainable()
    lrs = [float(g["lr"]) for g in s.optimizer.param_groups]
    used = ctx.data.lr  # the LRs this step used (a per-step scheduler has moved the groups' since)
    if used is not None and len(used) == len(lrs):
        lrs = [float(v) for v in used]
    lr = np.array([lrs[g] if 0 <= g < len(lrs) else np.nan for g in groups])
    update = np.asarray(update, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    embed = ctx.cached(
        "embedding_cols",
        lambda: np.array([is_embedding_param(m) for _, m in ctx.param_module().values()], dtype=bool),
    )
    # With an LR above 0, a zero update must not be explained by rounding: a plain SGD step
    # (lr x grad) would have moved the weights visibly. Tiny LRs and vanishing gradients are
    # reported by the LR and gradient rules instead.
    weight = ctx.data.weight_norm
    weight = np.asarray(np.full(update.shape, np.nan) if weight is None else weight, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        visible = (lr * grad > VISIBLE_UPDATE * weight) | (weight == 0)
    stuck &= ~embed & ((lr == 0) | visible)
    need = np.where(lr == 0, NOT_UPDATING_STEPS_LR0, NOT_UPDATING_STEPS)
    streak = st.get("streak")
    if streak is None or streak.shape != stuck.shape:
        streak = np.zeros(stuck.shape, dtype=np.int64)
    streak = np.where(stuck, streak + 1, 0)
    # A sampled update norm of 0 says only that the sampled elements did not move: where the
    # gradient is sparse (dead units or channels, inputs that are always 0) the rest of the
    # tensor moves while the sample sits still. Before a run of sampled zeros is reported, the
    # whole tensor must be what it was when the run started. An exact update norm, or an LR of
    # 0, needs no confirmation.
    if ctx.data.update_exact:
        st.pop("prints", None)
    else:
        streak = _confirm_unchanged(ctx, stuck & (lr != 0), streak, need)
    st["streak"] = streak
    st["streak_any"] = bool(stuck.any())
    if not st["streak_any"]:
        return []
    hit = streak >= need
    if not hit.any():
        return []
    names = [n for n, h in zip(s.param_names, hit) if h]
    zero_lr = sorted({int(groups[i]) for i in np.flatnonzero(hit) if lr[i] == 0})
    if zero_lr:
        cause = (
            f"The learning rate of optimizer group(s) {zero_lr} is 0, so optimizer.step() leaves these "
            "parameters unchanged although they have gradients."
        )
        fix = (
            "Give the group a learning rate above 0 (runner.set_lr(lr, group=...) or "
            "optimizer.param_groups[i]['lr'] = ...), and check the scheduler's lambda does not return 0."
        )
    else:
        cause = (
            "optimizer.step() leaves these parameters unchanged although they have non-zero gradients: "
            "the learning rate is so small that the update rounds away, or the optimizer skips them."
        )
        fix = None
    params = ctx.stable_params("param-not-updating", names)
    return [
        ctx.finding(
            "param-not-updating",
            f"{len(names)} parameter(s) have gradients but did not change for {int(streak[hit].min())} "
            "steps: "
            f"{short_list(names)}",
            params=params,
            evidence={"params": names, "zero_lr_groups": zero_lr, "steps": int(streak[hit].min())},
            cause=cause,
            fix=fix,
        )
    ]


def _confirm_unchanged(
    ctx: RuleContext, check: np.ndarray, streak: np.ndarray, need: np.ndarray
) -> np.ndarray:
    """``streak`` with the runs of sampled zeros of ``check`` (history column mask) confirmed on
    the whole tensors.

    A fingerprint of the whole tensor (float64 sum and norm: any optimizer
    update changes them) is taken when a run starts, and again when the run
    is long enough to be reported: a tensor that moved meanwhile starts a new
    run of 1 from there. So a parameter whose gradient is sparse costs two
    passes over it per run, and only parameters whose sampled update was
    exactly 0 with a gradient (a rare path) are looked at.
    """
    old: dict[int, tuple[float, float]] = ctx.state.get("prints", {})
    cols = [int(i) for i in np.flatnonzero(check)]
    prints = {i: old[i] for i in cols if i in old}  # a run that ended is forgotten
    first = [i for i in cols if i not in prints]
    due = [i for i in cols if i in prints and streak[i] >= need[i]]
    if first or due:
        named = ctx.session.named_params
        parts = []
        with torch.no_grad():
            for i in first + due:
                x = named[i][1].detach()
                x = x.coalesce().values() if x.is_sparse else x
                parts += [x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64)]
            values = to_host(parts)
        now = {i: (float(values[2 * k]), float(values[2 * k + 1])) for k, i in enumerate(first + due)}
        streak = streak.copy()
        for i in first:
            prints[i], streak[i] = now[i], 1
        for i in due:
            if now[i] != prints[i]:  # it moved during the run: the zeros were the sample's
                prints[i], streak[i] = now[i], 1
    ctx.state["prints"] = prints
    return streak


def _forward_of_step(ctx: RuleContext) -> Any:
    """The FORWARD record of the step being diagnosed (Runner: at FORWARD; watch: read at STEP)."""
    rec = ctx.record
    if rec.stage is Stage.FORWARD:
        return rec if ctx.session.kind == "runner" else None
    if ctx.session.kind != "watch":
        return None
    fwd = ctx.session.records.get(Stage.FORWARD)
    return fwd if fwd is not None and fwd.step == rec.step else None


def _has_trainable_under(ctx: RuleContext, module_name: str) -> bool:
    prefix = module_name + "." if module_name else ""
    return any(p.requires_grad for n, p in ctx.session.named_params if n.startswith(prefix))


@rule("eval-mode-training", ["eval-mode-training"], "stage", stages=[Stage.FORWARD, Stage.STEP])
def eval_mode_training(ctx: RuleContext) -> list[Finding]:
    """A training forward ran with the model, or dropout / batch-norm layers that train, in eval mode.

    Batch-norm layers whose parameters are all frozen (or the runner's own
    ``freeze(..., bn_eval=True)``) are in eval mode on purpose, and so is
    dropout inside a fully frozen part of the model.
    """
    fwd = _forward_of_step(ctx)
    if fwd is None or fwd.data.grad_enabled is False:
        return []
    eval_names = list(fwd.data.eval_modules or [])
    model_eval = fwd.data.training is False or "<model>" in eval_names
    if not eval_names and not model_eval:
        return []
    mods = ctx.modules()
    deliberate = set(ctx.session.bn_eval)  # layers the user froze with their batch-norm statistics
    affected = []
    for name in eval_names:
        if name == "<model>" or name in deliberate:
            continue
        m = mods.get(name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            own = list(m.parameters(recurse=False))
            if own and any(p.requires_grad for p in own):
                affected.append(name)
        elif (
            isinstance(m, nn.modules.dropout._DropoutNd)
            and float(getattr(m, "p", 0) or 0) > 0
            and _has_trainable_under(ctx, name.rpartition(".")[0])
        ):
            affected.append(name)
    if affected:
        params = ctx.stable_params("eval-mode-training", affected)
        head = "the model is in eval mode" if model_eval else "some layers are in eval mode"
        return [
            ctx.finding(
                "eval-mode-training",
                f"{head} during a training step: {short_list(affected)} "
                "(dropout off, batch norm using running statistics)",
                params=params,
                stage=Stage.FORWARD,
                evidence={"modules": affected, "model_training": not model_eval},
            )
        ]
    if model_eval:
        mode_dependent = ctx.cached(
            "mode_dependent",
            lambda: any(
                isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
                for m in ctx.session.model.modules()
            ),
        )
        if mode_dependent:
            return []  # only frozen parts are affected: a deliberate choice
        return [
            ctx.finding(
                "eval-mode-training",
                "the model is in eval mode during a training step; it has no dropout or batch-norm layer, "
                "so this changes nothing unless custom layers read self.training",
                params=("<model>",),
                stage=Stage.FORWARD,
                severity="info",
                evidence={"modules": ["<model>"], "model_training": False},
            )
        ]
    return []


@rule(
    "frozen-bn-stats-drift",
    ["frozen-bn-stats-drift"],
    "stage",
    stages=[Stage.FORWARD, Stage.STEP],
)
def frozen_bn_stats_drift(ctx: RuleContext) -> list[Finding]:
    """Batch-norm layers with frozen parameters that run in train mode, so their running statistics move."""
    fwd = _forward_of_step(ctx)
    if fwd is None or fwd.data.grad_enabled is False:
        return []
    bns = ctx.cached(
        "bn_modules_obj",
        lambda: [
            (n, m, list(m.parameters(recurse=False)))
            for n, m in ctx.session.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ],
    )
    if not bns:
        return []
    eval_names = fwd.data.eval_modules or ()
    drifting = [
        name
        for name, m, own in bns
        if own
        and name not in eval_names
        and m.track_running_stats
        and m.momentum != 0
        and not any(p.requires_grad for p in own)
    ]
    if not drifting or not ctx.trainable().any():
        return []
    params = ctx.stable_params("frozen-bn-stats-drift", drifting)
    freeze_hint = (
        f"runner.freeze('{drifting[0].rpartition('.')[0] or drifting[0]}', bn_eval=True) or "
        if ctx.session.kind == "runner"
        else ""
    )
    return [
        ctx.finding(
            "frozen-bn-stats-drift",
            f"{len(drifting)} frozen batch-norm layer(s) run in train mode, so their running statistics keep "
            f"moving: {short_list(drifting)}",
            params=params,
            stage=Stage.FORWARD,
            evidence={"modules": drifting},
            fix=f"Keep frozen batch-norm layers in eval mode: {freeze_hint}call .eval() on each of them "
            "after every "
            "model.train() (or set their momentum=0).",
        )
    ]


STAGE_RULES = (
    input_not_normalized,
    softmax_before_loss,
    shape_broadcast,
    loss_sum_reduction,
    bn_small_batch,
    disconnected_by_graph,
    disconnected_by_grad,
    zero_init,
    dead_units_from_grads,
    frozen_param_changed,
    param_not_updating,
    eval_mode_training,
    frozen_bn_stats_drift,
)
