"""Setup audit: checks of the model and optimizer objects.

Run at construction and again after every control (freeze, unfreeze,
set_lr, rewind). ``param-not-in-optimizer`` is the core's own audit and is
not repeated here.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from tlwidgets.core.controls import is_norm_layer
from tlwidgets.core.findings import Finding
from tlwidgets.diagnostics.rules.base import RuleContext, rule, short_list

__all__ = [
    "SETUP_RULES",
    "dropout_too_high",
    "frozen_in_optimizer",
    "missing_activation",
    "nothing_trainable",
]


@rule("nothing-trainable", ["nothing-trainable"], "setup")
def nothing_trainable(ctx: RuleContext) -> list[Finding]:
    """No parameter requires grad, or only normalization layers' parameters do."""
    named = ctx.session.named_params
    trainable = [n for n, p in named if p.requires_grad]
    if not trainable:
        return [
            ctx.finding(
                "nothing-trainable",
                f"none of the model's {len(named)} parameters has requires_grad=True",
                evidence={"params": len(named), "trainable": 0},
            )
        ]
    owners = ctx.param_module()
    if all(is_norm_layer(owners[n][1]) for n in trainable):
        mods = sorted({owners[n][0] for n in trainable})
        return [
            ctx.finding(
                "nothing-trainable",
                f"only normalization layers are trainable ({len(trainable)} parameters in "
                f"{short_list(mods)}); every other layer is frozen",
                params=trainable,
                evidence={"params": len(named), "trainable": len(trainable), "modules": mods},
                cause="Only the normalization layers' scale and shift are trainable, so training can rescale "
                "features but cannot change what the frozen layers compute.",
            )
        ]
    return []


# Layers that compute an affine map of their input (weights shared over positions for convs).
_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)
# Layers that keep a map affine: nothing nonlinear happens between two linear layers through them.
_TRANSPARENT = (
    nn.modules.dropout._DropoutNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.modules.batchnorm._BatchNorm,  # an affine map per channel (exactly so in eval mode)
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)


def _flatten_sequential(prefix: str, seq: nn.Sequential) -> Iterator[tuple[str, nn.Module]]:
    """Children of a Sequential in execution order, nested Sequentials expanded (their order is known too)."""
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            yield from _flatten_sequential(full, child)
        else:
            yield full, child


def _is_linear(m: nn.Module) -> bool:
    # Grouped/depthwise convolutions followed by a 1x1 conv (separable convolutions) are a
    # deliberate factorization, not a forgotten activation.
    return isinstance(m, _LINEAR) and getattr(m, "groups", 1) == 1


@rule("missing-activation", ["missing-activation"], "setup")
def missing_activation(ctx: RuleContext) -> list[Finding]:
    """Two linear/conv layers in an ``nn.Sequential`` with only affine layers (or nothing) between them."""
    model = ctx.session.model
    found: list[Finding] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or id(m) in seen:
            continue
        # Nested Sequentials are covered by their outermost Sequential.
        for sub in m.modules():
            if isinstance(sub, nn.Sequential):
                seen.add(id(sub))
        last: tuple[str, nn.Module] | None = None
        between: list[str] = []
        for child_name, child in _flatten_sequential(name, m):
            if _is_linear(child):
                if last is not None:
                    kinds = f"{type(last[1]).__name__} '{last[0]}' and {type(child).__name__} '{child_name}'"
                    via = f" (only {', '.join(between)} between them)" if between else ""
                    found.append(
                        ctx.finding(
                            "missing-activation",
                            f"{kinds} follow each other with no nonlinearity{via}",
                            params=(last[0], child_name),
                            evidence={"first": last[0], "second": child_name, "between": list(between)},
                            cause=f"'{last[0]}' and '{child_name}' have no activation between them, so "
                            "together "
                            "they compute one linear map and the extra layer adds no expressive power.",
                            fix=f"Insert a nonlinearity such as nn.ReLU() or nn.GELU() after '{last[0]}', "
                            "or merge the two layers into one.",
                        )
                    )
                last, between = (child_name, child), []
            elif isinstance(child, _TRANSPARENT):
                if last is not None:
                    between.append(type(child).__name__)
            else:
                last, between = None, []
    return found


#: dropout-too-high: p above which dropout is reported.
DROPOUT_HIGH = 0.5


@rule("dropout-too-high", ["dropout-too-high"], "setup")
def dropout_too_high(ctx: RuleContext) -> list[Finding]:
    """A dropout module with ``p > 0.5``.

    Dropout called as a function in ``forward`` (``F.dropout(x, p)``) has no module to inspect; the data
    audit of the first step (:func:`tlwidgets.diagnostics.audits.audit_dropout`) reports it.
    """
    found = []
    for name, m in ctx.session.model.named_modules():
        p = getattr(m, "p", None)
        if isinstance(m, nn.modules.dropout._DropoutNd) and isinstance(p, (int, float)) and p > DROPOUT_HIGH:
            found.append(
                ctx.finding(
                    "dropout-too-high",
                    f"{type(m).__name__} '{name}' drops {p:.0%} of its inputs at every step",
                    params=(name,),
                    evidence={"module": name, "p": float(p)},
                    fix=f"Use p between 0.1 and 0.5 in '{name}' (nn.Dropout(p=0.3), say) and raise it only "
                    "if validation loss shows overfitting.",
                )
            )
    return found


def _can_move_with_zero_grad(optimizer, group: dict, p) -> bool:
    """Would ``optimizer.step()`` change ``p`` although its gradient is zero?"""
    if float(group.get("weight_decay", 0) or 0) > 0:
        return True
    if float(group.get("momentum", 0) or 0) > 0:
        return bool(optimizer.state.get(p))  # a momentum buffer keeps pushing
    if "betas" in group:  # Adam family: the first moment keeps pushing
        return bool(optimizer.state.get(p))
    return False


@rule("frozen-in-optimizer", ["frozen-param-changed"], "setup", sessions=("watch",))
def frozen_in_optimizer(ctx: RuleContext) -> list[Finding]:
    """Frozen parameters still in an optimizer group that can move them through stale (zeroed) gradients.

    PyTorch optimizers skip a parameter whose ``.grad`` is ``None``, so the
    risk exists only while the frozen parameter still holds a gradient
    tensor (``zero_grad(set_to_none=False)`` keeps a zero one). A Runner
    clears those at ZERO_GRAD and on ``freeze``: only own loops are at risk.
    Whether they really move is checked at every STEP (``frozen-param-changed``, error).
    """
    opt = ctx.session.optimizer
    names = {id(p): n for n, p in ctx.session.named_params}
    risky = []
    for g in opt.param_groups:
        for p in g["params"]:
            stale = not p.requires_grad and p.grad is not None and id(p) in names
            if stale and _can_move_with_zero_grad(opt, g, p):
                risky.append(names[id(p)])
    if not risky:
        return []
    # Keyed by module, so the error reported when such a parameter really moves (keyed by parameter)
    # stays a separate entry that a later audit cannot retract.
    modules = sorted({n.rpartition(".")[0] or n for n in risky})
    return [
        ctx.finding(
            "frozen-param-changed",
            f"{len(risky)} frozen parameter(s) still hold a gradient inside an optimizer group whose "
            f"momentum or weight decay can move them: {short_list(risky)}",
            params=modules,
            severity="warning",
            evidence={"params": risky},
            cause="These parameters have requires_grad=False but keep a (zeroed) .grad in an optimizer "
            "group with "
            "momentum, Adam moments or weight decay, so optimizer.step() can still change them.",
            fix="Set param.grad = None when freezing (or call optimizer.zero_grad(set_to_none=True)), "
            "or remove frozen parameters from the optimizer.",
        )
    ]


SETUP_RULES = (nothing_trainable, missing_activation, dropout_too_high, frozen_in_optimizer)
