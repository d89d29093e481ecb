"""Own-loop rules: the structure of a training loop the user wrote, seen through ``watch()``.

They read the watcher's loop-structure events (BACKWARD records with
``data["loop_event"]`` and ``data["loop"]``, the :class:`LoopFacts` as a
dict), which arrive at the start of every backward pass and when the loop
ends, and its BACKWARD records at ``optimizer.step()`` (``clip_ratio``). A
Runner owns its loop, so these cannot happen there.
"""

from __future__ import annotations

import math

import numpy as np

from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.rules.base import RuleContext, nanmedian, rule
from tlwidgets.diagnostics.rules.trend import _overfit_finding

__all__ = [
    "LOOP_RULES",
    "grad_clipping_too_strong",
    "grads_not_zeroed",
    "optimizer_not_stepping",
    "watch_validation",
]

#: Consecutive steps whose gradients were never zeroed.
STALE_STEPS = 2
#: Consecutive backward passes after a gradient reset with no optimizer step in between.
BACKWARDS_WITHOUT_STEP = 2
#: Steps in a row GradScaler may skip, halving its scale each time, before the overflow is called a
#: NaN/Inf problem (2**30 below any sensible initial scale).
SCALER_SKIPS = 30
#: Median (post-clip / pre-clip) gradient norm below this, over at least CLIP_MEASUREMENTS measurements.
CLIP_RATIO = 1e-2
CLIP_MEASUREMENTS = 3


def _loop(ctx: RuleContext) -> dict | None:
    d = ctx.data
    return d.loop if d.loop_event else None


@rule("grads-not-zeroed", ["grads-not-zeroed"], "loop", sessions=("watch",))
def grads_not_zeroed(ctx: RuleContext) -> list[Finding]:
    """Each backward adds to the previous step's gradients: ``zero_grad()`` is missing."""
    loop = _loop(ctx)
    if not loop or loop.get("stale_steps", 0) < STALE_STEPS:
        return []
    return [
        ctx.finding(
            "grads-not-zeroed",
            f"the gradients were not reset between the last {loop['stale_steps']} optimizer steps: each "
            "backward() "
            "adds to the old gradients",
            stage=Stage.ZERO_GRAD,
            evidence={"stale_steps": loop["stale_steps"], "steps": loop.get("steps")},
        )
    ]


@rule("optimizer-not-stepping", ["optimizer-not-stepping"], "loop", sessions=("watch",))
def optimizer_not_stepping(ctx: RuleContext) -> list[Finding]:
    """Backward passes (with gradients reset in between) but no ``optimizer.step()``."""
    loop = _loop(ctx)
    if not loop:
        return []
    n = loop.get("backwards_without_step", 0)
    never = not loop.get("steps")
    # When the loop ends, the watcher counts every backward of a loop that never stepped.
    ended_without_step = never and loop.get("backwards", 0) >= 1 and n >= loop.get("backwards", 0)
    if n < BACKWARDS_WITHOUT_STEP and not ended_without_step:
        return []
    scales_of = getattr(ctx.session, "loss_scales", None)
    scales = scales_of(n + 1) if callable(scales_of) else []
    if _scaler_backing_off(scales):
        # torch.amp.GradScaler skips optimizer.step() when the scaled gradients overflow and halves
        # the scale: healthy at the start of mixed-precision training. Only a scale that keeps
        # falling says the gradients are NaN/Inf whatever the scale (the model or the data).
        if n < SCALER_SKIPS:
            return []
        return [
            ctx.finding(
                "optimizer-not-stepping",
                f"GradScaler skipped the last {n} optimizer steps: the gradients were NaN/Inf at every "
                f"loss scale from {scales[0]:.3g} down to {scales[-1]:.3g}",
                stage=Stage.STEP,
                evidence={"backwards_without_step": n, "loss_scales": scales, "steps": loop.get("steps")},
                cause="GradScaler skips a step whose gradients overflow and halves the scale; "
                "overflow at every scale means the NaN/Inf does not come from float16's range but "
                "from the model or the batch (a log of 0, a division by 0, NaN inputs).",
                fix="Train a few steps in float32 (autocast off) with torch.autograd.set_detect_anomaly"
                "(True) to find the operation, or check the batch for NaN/Inf.",
            )
        ]
    return [
        ctx.finding(
            "optimizer-not-stepping",
            f"{n} backward passes in a row without an optimizer step"
            + (" (optimizer.step() was never called)" if never else ""),
            stage=Stage.STEP,
            evidence={
                "backwards_without_step": n,
                "backwards": loop.get("backwards"),
                "steps": loop.get("steps"),
            },
        )
    ]


def _scaler_backing_off(scales: list[float]) -> bool:
    """Loss scales of consecutive passes as GradScaler leaves them after skipped steps: powers of two
    that never grow and fall overall (a plain loop's are all 1)."""
    if len(scales) < 2 or not all(math.isfinite(v) and v > 0 for v in scales):
        return False
    if not _powers_of_two(np.asarray(scales)):
        return False
    return all(b <= a for a, b in zip(scales, scales[1:])) and scales[-1] < scales[0]


def _powers_of_two(values: np.ndarray) -> bool:
    """Loss scaling (GradScaler) divides gradients by a power of two: that is not clipping."""
    logs = np.log2(values)
    return bool(np.all(np.abs(logs - np.round(logs)) < 1e-3))


@rule(
    "grad-clipping-too-strong",
    ["grad-clipping-too-strong"],
    "stage",
    stages=[Stage.BACKWARD],
    needs=["clip_ratio"],
    sessions=("watch",),
)
def grad_clipping_too_strong(ctx: RuleContext) -> list[Finding]:
    """Gradient norm at ``optimizer.step()`` is orders of magnitude below the norm right after backward."""
    loop = getattr(ctx.session, "loop", None)
    ratios = np.asarray(
        [r for r in (loop.clip_ratio if loop is not None else []) if math.isfinite(r) and r > 0]
    )
    if ratios.size < CLIP_MEASUREMENTS:
        return []
    recent = ratios[-10:]
    med = nanmedian(recent)
    if not med < CLIP_RATIO or _powers_of_two(recent):
        return []
    return [
        ctx.finding(
            "grad-clipping-too-strong",
            f"clipping shrinks the gradient to {med:.2g} of its norm (median of the last {recent.size} "
            "measurements)",
            stage=None,
            evidence={"clip_ratio": float(med), "measurements": int(recent.size)},
        )
    ]


@rule("watch-validation", ["overfitting"], "loop", sessions=("watch",))
def watch_validation(ctx: RuleContext) -> list[Finding]:
    """Validation losses the watcher saw (computed without gradient) form the 'epochs' of an own loop."""
    loop = _loop(ctx)
    if not loop:
        return []
    vals = [v for v in loop.get("val_losses") or [] if math.isfinite(v)]
    st = ctx.state
    step = ctx.session.global_step
    if not vals or st.get("last_step") == step:
        return []
    st["last_step"] = step
    h = ctx.session.history
    prev_step = st.get("prev_step", 0)
    steps, losses = h.step, h.loss
    mask = (steps > prev_step) & np.isfinite(losses)
    st["prev_step"] = step
    if not mask.any():
        return []
    points = st.setdefault("points", [])
    points.append((float(np.mean(vals)), float(np.mean(losses[mask]))))
    del points[:-50]
    return _overfit_finding(ctx, [v for v, _ in points], [t for _, t in points], "validation")


LOOP_RULES = (grads_not_zeroed, optimizer_not_stepping, grad_clipping_too_strong, watch_validation)
