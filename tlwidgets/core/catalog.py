"""The catalog of finding codes: default severity, title, cause and fix.

Every :class:`~tlwidgets.core.findings.Code` has one :class:`Spec` here. Rules
and the runner build findings with :func:`make_finding`, which fills in what
the catalog knows and lets the caller override it (for example to name the
module in the cause).

``Spec.kind`` says when a finding can be detected:

``setup``
    from the model / optimizer objects alone, before any step runs.
``stage``
    from what a single stage saw (one batch, one forward, one step).
``trend``
    from the recorded history over several steps or epochs.
``loop``
    from the structure of the training loop (own-loop use through ``watch``).
``check``
    from an explicit check (overfit one batch, leakage scan, ...).
``error``
    from an exception raised by user code during a stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tlwidgets.core.findings import Code, Finding, Severity

if TYPE_CHECKING:
    from tlwidgets.core.stages import Stage

__all__ = ["CATALOG", "KINDS", "Spec", "get_spec", "make_finding"]

KINDS: tuple[str, ...] = ("setup", "stage", "trend", "loop", "check", "error")
"""The allowed values of :attr:`Spec.kind`."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the catalog knows about one finding code.

    Parameters
    ----------
    code
        The finding code.
    severity
        Default severity of findings with this code.
    title
        A few words naming the problem, for headings and chips.
    cause
        One sentence: what most likely went wrong.
    fix
        One sentence: what to change, naming the PyTorch call where possible.
    kind
        When it can be detected: one of :data:`KINDS`.
    """

    code: Code
    severity: Severity
    title: str
    cause: str
    fix: str
    kind: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", Code(self.code))
        object.__setattr__(self, "severity", Severity(self.severity))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO

_SPECS: tuple[Spec, ...] = (
    # --- setup: optimizer / trainability -------------------------------------------------------
    Spec(
        Code.PARAM_NOT_IN_OPTIMIZER,
        _E,
        "Parameter not in optimizer",
        "The optimizer was built before this layer was added or replaced, "
        "so optimizer.step() never updates it.",
        "Rebuild the optimizer after changing the model, e.g. torch.optim.AdamW(model.parameters(), ...), "
        "or add the layer with optimizer.add_param_group(...) / runner.unfreeze(name).",
        "setup",
    ),
    Spec(
        Code.FROZEN_PARAM_CHANGED,
        _E,
        "Frozen parameter changed",
        "The parameter has requires_grad=False but is still in an optimizer group, "
        "so momentum or weight decay keeps moving it with its stale gradient.",
        "Set param.grad = None when freezing (runner.freeze(name) does this) "
        "or build the optimizer only from parameters that require grad.",
        "stage",
    ),
    Spec(
        Code.NOTHING_TRAINABLE,
        _E,
        "Nothing to train",
        "Every parameter has requires_grad=False (or only normalization layers are trainable), "
        "so training cannot change what the model computes.",
        "Unfreeze at least the new head, e.g. model.fc.requires_grad_(True), "
        "and make sure the optimizer holds those parameters.",
        "setup",
    ),
    # Warning: an unused branch (auxiliary head, optional module) can be intentional.
    Spec(
        Code.DISCONNECTED_PARAM,
        _W,
        "Parameter gets no gradient",
        "The loss does not depend on this parameter, so its .grad stays None: a .detach(), "
        "an .item() or .numpy() round trip, torch.no_grad(), or a branch forward() never uses.",
        "Remove the .detach(), .item() or torch.no_grad() on the path from this module to the loss, "
        "or take the unused module out of the model and the optimizer.",
        "stage",
    ),
    # Warning: a zero LR group can be deliberate (warm-up at 0, a parked group).
    Spec(
        Code.PARAM_NOT_UPDATING,
        _W,
        "Parameter does not change",
        "The parameter has a gradient and is in an optimizer group, yet optimizer.step() leaves it "
        "unchanged, usually because its group's learning rate is 0 or its gradient is exactly zero.",
        "Print optimizer.param_groups[i]['lr'] for its group and scheduler.get_last_lr(), and look "
        "for a dead activation or a zero-initialized layer that zeroes its gradient.",
        "stage",
    ),
    # --- loop structure ---------------------------------------------------------------------------
    Spec(
        Code.OPTIMIZER_NOT_STEPPING,
        _E,
        "Optimizer never steps",
        "loss.backward() fills the gradients but optimizer.step() is never called "
        "(or is called on another optimizer), so the weights never change.",
        "Call optimizer.step() after loss.backward() in every iteration, "
        "on the optimizer that holds this model's parameters.",
        "loop",
    ),
    Spec(
        Code.GRADS_NOT_ZEROED,
        _E,
        "Gradients accumulate",
        "optimizer.zero_grad() is not called between steps, so each backward() adds to the old "
        "gradients and the effective step keeps growing.",
        "Call optimizer.zero_grad(set_to_none=True) once per iteration before loss.backward(), "
        "or divide the loss by the number of accumulation steps if accumulation is intended.",
        "loop",
    ),
    Spec(
        Code.GRAD_CLIPPING_TOO_STRONG,
        _W,
        "Gradient clipping too strong",
        "The max_norm given to clip_grad_norm_ is orders of magnitude below the real gradient norm, "
        "so every step is cut to a tiny fixed length and training crawls.",
        "Raise max_norm in torch.nn.utils.clip_grad_norm_ to about the typical gradient norm "
        "(often 1.0 to 10.0) so that clipping only catches rare spikes.",
        "trend",
    ),
    # --- train/eval mode and batch norm -------------------------------------------------------
    Spec(
        Code.EVAL_MODE_TRAINING,
        _W,
        "Training in eval mode",
        "model.eval() was called (often for validation) and model.train() was not called again, "
        "so dropout is off and batch norm uses its running statistics while training.",
        "Call model.train() at the start of every training epoch and model.eval() only around validation.",
        "stage",
    ),
    Spec(
        Code.FROZEN_BN_STATS_DRIFT,
        _W,
        "Frozen batch norm still updating",
        "The batch-norm weights are frozen but the layer is in training mode, so running_mean and "
        "running_var keep following the new data and the pretrained statistics drift away.",
        "Call .eval() on each frozen nn.BatchNorm layer after every model.train(), "
        "or set its momentum=0 so the running statistics stay fixed.",
        "stage",
    ),
    # --- numerics ------------------------------------------------------------------------------------
    Spec(
        Code.NON_FINITE_INPUT,
        _E,
        "NaN or Inf in the batch",
        "The data contains NaN or Inf values (missing entries, a division by zero or a log of zero "
        "in preprocessing) that will poison the loss and every weight they reach.",
        "Clean the dataset or its transform, e.g. drop rows where not torch.isfinite(x).all() "
        "or use torch.nan_to_num(x), and check the normalization std for zeros.",
        "stage",
    ),
    Spec(
        Code.NON_FINITE_LOSS,
        _E,
        "Loss is NaN or Inf",
        "An unstable operation on the way to the loss (log of 0, exp overflow, division by zero, "
        "or weights already blown up by a too-high learning rate) produced NaN or Inf.",
        "Use the fused stable forms (F.cross_entropy on logits, F.binary_cross_entropy_with_logits, "
        "torch.logsumexp), add an eps to logs and divisions, and lower the learning rate.",
        "stage",
    ),
    Spec(
        Code.NON_FINITE_GRAD,
        _E,
        "NaN or Inf gradient",
        "backward() produced NaN or Inf gradients, typically from an op with an unbounded derivative "
        "(sqrt or log at 0, division by a tiny number) or from exploding activations.",
        "Add an eps inside sqrt, log and divisions, clip with torch.nn.utils.clip_grad_norm_, "
        "and under float16 use torch.amp.GradScaler so that bad steps are skipped.",
        "stage",
    ),
    Spec(
        Code.INPUT_NOT_NORMALIZED,
        _W,
        "Inputs not normalized",
        "The inputs are far from zero mean and unit scale (e.g. raw 0-255 pixels), which saturates "
        "activations and forces a tiny learning rate.",
        "Scale and standardize the inputs, e.g. transforms.ToTensor() then transforms.Normalize(mean, std) "
        "with the statistics the pretrained model was trained with.",
        "stage",
    ),
    # --- loss wiring ------------------------------------------------------------------------------------
    Spec(
        Code.SOFTMAX_BEFORE_LOSS,
        _W,
        "Softmax before the loss",
        "The model output already went through softmax or log_softmax, but nn.CrossEntropyLoss applies "
        "log_softmax itself, so the gradients are squashed and learning stalls.",
        "Remove the final nn.Softmax from the model and feed raw logits to nn.CrossEntropyLoss "
        "(or keep log_softmax and use nn.NLLLoss).",
        "stage",
    ),
    Spec(
        Code.SHAPE_BROADCAST,
        _W,
        "Prediction and target broadcast",
        "The prediction and target shapes differ (e.g. [N, 1] and [N]), so the loss broadcasts them "
        "to [N, N] and compares every prediction with every target.",
        "Make the shapes identical before the loss, e.g. output.squeeze(1) or target.view_as(output).",
        "stage",
    ),
    Spec(
        Code.LOSS_SUM_REDUCTION,
        _W,
        "Loss summed over the batch",
        "The loss uses reduction='sum' (or adds up per-example losses), so the gradient scales with "
        "the batch size and so does the effective learning rate.",
        "Use reduction='mean' (the default of torch.nn losses) or divide the summed loss by the batch size.",
        "stage",
    ),
    # --- optimization dynamics -------------------------------------------------------------------
    Spec(
        Code.LR_TOO_HIGH,
        _W,
        "Learning rate too high",
        "Each step changes the weights by far more than about 1e-3 of their norm, "
        "so the optimizer overshoots and the loss rises or oscillates.",
        "Lower the learning rate 3 to 10 times with runner.set_lr(...) or optimizer.param_groups[i]['lr'], "
        "or run an LR range test and pick a value below where the loss starts to climb.",
        "trend",
    ),
    Spec(
        Code.LR_TOO_LOW,
        _W,
        "Learning rate too low",
        "Each step changes the weights by far less than about 1e-3 of their norm, so the loss barely moves.",
        "Raise the learning rate 3 to 10 times with runner.set_lr(...) or optimizer.param_groups[i]['lr'], "
        "or run an LR range test to find the useful range.",
        "trend",
    ),
    Spec(
        Code.SCHEDULER_TOO_FAST,
        _W,
        "Scheduler decays too fast",
        "A scheduler configured in epochs (e.g. StepLR, ExponentialLR, CosineAnnealingLR) is stepped "
        "every batch, so the learning rate is near zero within the first epochs.",
        "Call scheduler.step() once per epoch (scheduler_interval='epoch'), "
        "or give step_size / T_max in batches if you step it per batch.",
        "trend",
    ),
    Spec(
        Code.EXPLODING_GRADIENTS,
        _W,
        "Exploding gradients",
        "Gradient norms grow by orders of magnitude, from a learning rate that is too high, "
        "a poor initialization or a deep stack without normalization.",
        "Lower the learning rate, clip with torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), "
        "and check the initialization or add normalization layers.",
        "trend",
    ),
    Spec(
        Code.VANISHING_GRADIENTS,
        _W,
        "Vanishing gradients",
        "Gradients in the early layers are orders of magnitude smaller than in the late layers, "
        "typically from saturating sigmoid or tanh activations in a deep stack or a poor initialization.",
        "Use ReLU-family activations with nn.init.kaiming_normal_, "
        "and add batch normalization or residual connections to deep stacks.",
        "trend",
    ),
    Spec(
        Code.DEAD_RELU,
        _W,
        "Dead ReLU units",
        "Most units of this ReLU output zero for every input, so they pass no gradient and stop learning, "
        "usually after a too-large step or from negative biases.",
        "Lower the learning rate, switch to nn.LeakyReLU or nn.GELU, "
        "and initialize with nn.init.kaiming_normal_ and zero biases.",
        "stage",
    ),
    Spec(
        Code.ZERO_INIT,
        _W,
        "Symmetric initialization",
        "The weights are all zero or all equal, so every unit of the layer computes the same output, "
        "gets the same gradient and never becomes different.",
        "Initialize the weights randomly, e.g. nn.init.kaiming_uniform_(layer.weight) or PyTorch's default "
        "initialization, and keep zeros for biases only.",
        "setup",
    ),
    Spec(
        Code.OVER_REGULARIZATION,
        _W,
        "Regularization dominates",
        "Weight decay or an added penalty pulls on the weights harder than the data gradient, "
        "so the weights shrink and the loss stalls high.",
        "Reduce weight_decay (1e-4 to 1e-2 is typical with torch.optim.AdamW) "
        "and check the scale of any penalty term added to the loss.",
        "trend",
    ),
    # Warning, not info: a plateau wastes the run, even if its cause is unknown.
    Spec(
        Code.LOSS_PLATEAU,
        _W,
        "Loss plateau",
        "The loss has stopped decreasing and no more specific cause was found, "
        "which often means the learning rate is now too low or the model lacks capacity.",
        "Try a larger learning rate or torch.optim.lr_scheduler.ReduceLROnPlateau, and overfit a single "
        "batch to confirm that the model can learn at all.",
        "trend",
    ),
    # --- data -------------------------------------------------------------------------------------------
    Spec(
        Code.BN_SMALL_BATCH,
        _W,
        "Batch norm on tiny batches",
        "Batch-norm layers are trained on batches of 1 or 2 examples, "
        "so their batch statistics are mostly noise and the running statistics become unreliable.",
        "Use a larger batch, DataLoader(..., drop_last=True) to avoid a tiny last batch, "
        "or replace batch norm with nn.GroupNorm or nn.LayerNorm.",
        "stage",
    ),
    Spec(
        Code.CLASS_IMBALANCE,
        _W,
        "Imbalanced classes",
        "A few classes make up most of the labels, so the model can reach a low loss "
        "by always predicting the majority class.",
        "Weight the loss with nn.CrossEntropyLoss(weight=...) or resample with "
        "torch.utils.data.WeightedRandomSampler, and watch per-class accuracy.",
        "stage",
    ),
    Spec(
        Code.UNSHUFFLED_DATA,
        _W,
        "Data not shuffled",
        "Each batch holds a single class because the dataset is sorted and the loader does not shuffle, "
        "so every step pulls the model toward one class.",
        "Pass shuffle=True to the training DataLoader (keep shuffle=False only for validation).",
        "trend",
    ),
    # The next four come from explicit checks that isolate the bug, so a hit is reliable: error.
    Spec(
        Code.BATCH_MIXING,
        _E,
        "Examples mixed within a batch",
        "The output for one example depends on other examples of the batch, usually because "
        "view or reshape was used where permute or transpose was meant.",
        "Reorder dimensions with x.permute(...) or x.transpose(...) instead of view/reshape, "
        "and flatten with x.flatten(1) so the batch dimension stays first.",
        "check",
    ),
    Spec(
        Code.CHANNEL_ORDER,
        _E,
        "Channels-last data reshaped",
        "Images stored as [N, H, W, C] were turned into [N, C, H, W] with view or reshape instead of "
        "a permute, so each channel holds interleaved pixels.",
        "Convert with x.permute(0, 3, 1, 2).contiguous(), "
        "or use transforms.ToTensor(), which does this for PIL and numpy images.",
        "check",
    ),
    Spec(
        Code.LABELS_DECOUPLED,
        _E,
        "Labels unrelated to inputs",
        "The model cannot beat a baseline that ignores the inputs, so the labels are probably "
        "misaligned with their inputs (shuffled separately, off by one, or corrupted).",
        "Check that the Dataset's __getitem__ returns each input with its own label and that inputs and "
        "labels are shuffled together, then inspect a few pairs by eye.",
        "check",
    ),
    Spec(
        Code.DATA_LEAKAGE,
        _E,
        "Validation data in training set",
        "Some validation examples also appear in the training data, "
        "so validation scores overstate how well the model generalizes.",
        "Remove duplicates first and split once into disjoint sets, "
        "e.g. torch.utils.data.random_split with a fixed generator.",
        "check",
    ),
    # Warning: a shift can be real (a deliberately harder validation set), not a bug.
    Spec(
        Code.TRAIN_VAL_SHIFT,
        _W,
        "Train/validation shift",
        "Validation inputs are distributed very differently from training inputs, often because "
        "the two sets go through different transforms or normalization.",
        "Apply the same resize and transforms.Normalize(mean, std) to both sets, "
        "and draw both from the same source.",
        "check",
    ),
    # --- architecture ----------------------------------------------------------------------------------
    Spec(
        Code.MISSING_ACTIVATION,
        _W,
        "Missing nonlinearity",
        "Two linear or conv layers follow each other with no activation between them, "
        "so together they collapse into one linear map.",
        "Insert a nonlinearity such as nn.ReLU() or nn.GELU() between the layers, or merge them into one.",
        "setup",
    ),
    # Info: p > 0.5 is unusual but can be a deliberate choice on a small, overfitting problem.
    Spec(
        Code.DROPOUT_TOO_HIGH,
        _I,
        "Very high dropout",
        "Dropout removes more than half of the units at every step, "
        "which slows learning and can keep the model underfitting.",
        "Use p between 0.1 and 0.5 in nn.Dropout and raise it only if validation shows overfitting.",
        "setup",
    ),
    Spec(
        Code.OVERFITTING,
        _W,
        "Overfitting",
        "Training loss keeps falling while validation loss rises, "
        "so the model is memorizing the training set instead of generalizing.",
        "Keep the checkpoint with the best validation loss and add data augmentation, "
        "weight_decay or nn.Dropout, or freeze more of the pretrained layers.",
        "trend",
    ),
    # --- exceptions raised by user code in a stage (explained by diagnostics.explain) -----------------
    Spec(
        Code.SHAPE_MISMATCH,
        _E,
        "Shape mismatch",
        "Two tensors reached an operation with incompatible shapes, usually a layer size that does not "
        "match its input or an output that does not match the target.",
        "Compare the shapes around the failing op and make them agree, "
        "e.g. fix in_features / in_channels or flatten with x.flatten(1).",
        "error",
    ),
    Spec(
        Code.DEVICE_MISMATCH,
        _E,
        "Tensors on different devices",
        "An operation received tensors on different devices, typically a batch left on the CPU "
        "while the model is on the GPU, or the reverse.",
        "Move the model and every tensor of the batch to one device: "
        "model.to(device), inputs.to(device) and targets.to(device).",
        "error",
    ),
    Spec(
        Code.DTYPE_MISMATCH,
        _E,
        "Wrong dtype",
        "An operation received a tensor of the wrong dtype, e.g. float64 inputs for float32 weights "
        "or float class targets where int64 indices are required.",
        "Convert the tensors where they are created: inputs.float() for a float32 model "
        "and targets.long() for class indices.",
        "error",
    ),
    Spec(
        Code.INPLACE_MODIFICATION,
        _E,
        "In-place change breaks autograd",
        "A tensor that autograd saved for backward (or a leaf that requires grad) was modified in place, "
        "so its gradient can no longer be computed.",
        "Replace the in-place operation (x += y, x.mul_(...), x[idx] = ..., nn.ReLU(inplace=True)) "
        "with its out-of-place form, or clone() the tensor before modifying it.",
        "error",
    ),
    Spec(
        Code.OUT_OF_MEMORY,
        _E,
        "Out of memory",
        "The stage needed more memory than the device had free, "
        "usually because the batch, the model or the activations saved for backward are too large.",
        "Reduce the batch size, train in mixed precision with torch.autocast, "
        "or trade compute for memory with torch.utils.checkpoint.",
        "error",
    ),
    Spec(
        Code.TARGET_OUT_OF_RANGE,
        _E,
        "Class target out of range",
        "A class label is negative or not smaller than the number of model outputs, "
        "e.g. labels 1..C instead of 0..C-1 or a final layer with too few classes.",
        "Make the labels lie in [0, num_classes - 1] (subtract 1 from 1-based labels) "
        "or build the final layer with out_features=num_classes.",
        "error",
    ),
    # --- distributed ---------------------------------------------------------------------------------
    Spec(
        Code.RANK_DIVERGENCE,
        _E,
        "Replicas drifted apart",
        "The copies of the model on the ranks of a distributed run no longer hold the same weights or "
        "buffers, because something changed one replica only (an edit on one rank, a step under "
        "no_sync(), buffers not broadcast with broadcast_buffers=False).",
        "Change weights on every rank alike (or only before wrapping in DistributedDataParallel, which "
        "broadcasts rank 0's), keep broadcast_buffers=True or use nn.SyncBatchNorm.convert_sync_batchnorm(), "
        "and restart from rank 0's checkpoint.",
        "trend",
    ),
    Spec(
        Code.STAGE_ERROR,
        _E,
        "Error in user code",
        "The model, loss or data code raised an exception during this stage.",
        "Read the error and traceback in the stage record, fix the code, and run the stage again.",
        "error",
    ),
)

CATALOG: dict[str, Spec] = {spec.code.value: spec for spec in _SPECS}
"""Spec of every finding code, keyed by the code's string value."""

del _E, _W, _I


def get_spec(code: Code | str) -> Spec:
    """Return the catalog entry of ``code``.

    Parameters
    ----------
    code
        A :class:`Code` member or its string value.

    Returns
    -------
    Spec

    Raises
    ------
    ValueError
        If ``code`` is not a finding code.
    """
    return CATALOG[Code(code).value]


def make_finding(
    code: Code | str,
    message: str,
    *,
    step: int | None = None,
    stage: Stage | str | None = None,
    params: Iterable[str] = (),
    evidence: Mapping[str, Any] | None = None,
    severity: Severity | str | None = None,
    cause: str | None = None,
    fix: str | None = None,
) -> Finding:
    """Build a :class:`Finding`, taking severity, cause and fix from the catalog.

    Parameters
    ----------
    code
        The finding code (a :class:`Code` or its string value).
    message
        One line saying what was observed, with the numbers.
    step
        Global step at which it was seen.
    stage
        Stage at which it was seen (``None`` for setup and trend findings).
    params
        Names of the parameters or modules involved.
    evidence
        The numbers behind the finding; copied.
    severity
        Overrides the catalog's default severity.
    cause, fix
        Override the catalog's sentences (e.g. to name the module); ``None`` keeps the default.

    Returns
    -------
    Finding

    Raises
    ------
    ValueError
        If ``code``, ``severity`` or ``stage`` is not a valid value.
    """
    spec = get_spec(code)
    return Finding(
        code=spec.code.value,
        severity=Severity(severity if severity is not None else spec.severity).value,
        message=str(message),
        cause=spec.cause if cause is None else cause,
        fix=spec.fix if fix is None else fix,
        step=step,
        stage=stage,  # Finding converts it to a Stage (and rejects unknown names)
        params=tuple(params),
        evidence=dict(evidence) if evidence is not None else {},
    )
