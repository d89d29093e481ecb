"""Typed facts: what each stage saw, one dataclass per stage.

A :class:`~tlwidgets.core.records.StageRecord` carries one of these as
``record.data``. Rules and panels read attributes (``rec.data.loss``); the
facts also behave as a mapping of the facts that were set
(``rec.data["loss"]``, ``rec.data.get("reached")``, ``dict(rec.data)``), so
notebooks and tests written against the older dict keep working.

Every fact a stage may carry is a field here, with its meaning: adding a
statistic means adding a field and filling it in
:mod:`tlwidgets.core.recording`. Setting an unknown name raises, so a typo
cannot silently create a fact nobody reads. ``None`` means "not measured this
step" (most facts are measured on the schedule of ``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping
from typing import Any, ClassVar

import numpy as np

from tlwidgets.core.stages import Stage

__all__ = [
    "BackwardFacts",
    "FetchFacts",
    "ForwardFacts",
    "LossFacts",
    "StageFacts",
    "StepFacts",
    "ToDeviceFacts",
    "ZeroGradFacts",
    "facts_for",
    "new_facts",
]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_FIELD_SETS: dict[type, frozenset[str]] = {}


@dataclasses.dataclass(eq=False)
class StageFacts(MutableMapping):
    """Base of the per-stage facts: attributes, plus a mapping view of those that are set.

    Attributes
    ----------
    measured
        False on a step the schedule did not measure: only the cheap facts
        (the loss value, the LRs) are there.
    tracking_error
        tlwidgets' own statistics failed on this stage (the facts they would
        have given are missing); the user's code ran normally.
    """

    stage: ClassVar[Stage | None] = None
    measured: bool = True
    tracking_error: str | None = None

    # -------------------------------------------------------------- mapping view
    def _names(self) -> tuple[str, ...]:
        # Per class, once: the facts are read and written on every stage of every step.
        cls = type(self)
        got = _FIELD_NAMES.get(cls)
        if got is None:
            got = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
            _FIELD_SETS[cls] = frozenset(got)
        return got

    def _name_set(self) -> frozenset[str]:
        got = _FIELD_SETS.get(type(self))
        if got is None:
            self._names()
            got = _FIELD_SETS[type(self)]
        return got

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set several facts (a mapping, pairs, or keywords); an unknown name raises ``KeyError``."""
        names = self._name_set()
        pairs = other.items() if hasattr(other, "items") else other
        for items in (pairs, kwargs.items()):
            for key, value in items:
                if key not in names:
                    self[key] = value  # raises, naming the class
                setattr(self, key, value)

    def __getitem__(self, key: str) -> Any:
        # A known fact that was not recorded on this step reads as None (as the attribute does);
        # a name that no stage records raises, listing the facts there are.
        if key not in self._name_set():
            raise KeyError(f"{type(self).__name__} has no fact {key!r}; facts: {', '.join(self._names())}")
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._name_set():
            raise KeyError(
                f"{type(self).__name__} has no fact {key!r}: declare it as a field in tlwidgets/core/facts.py"
            )
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        self[key] = None

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._names() if getattr(self, name) is not None)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._name_set() and getattr(self, key) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in self._name_set() else None
        return default if value is None else value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StageFacts):
            other = dict(other)
        if not isinstance(other, dict):
            return NotImplemented
        mine = dict(self)
        if mine.keys() != other.keys():
            return False
        return all(_same(mine[k], other[k]) for k in mine)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={_short_repr(v)}" for k, v in self.items())
        return f"{type(self).__name__}({body})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
    return bool(a == b)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(eq=False)
class FetchFacts(StageFacts):
    """FETCH: what the batch holds (see :func:`tlwidgets.core.batches.describe`).

    Attributes
    ----------
    structure
        Nesting of the inputs (``"Tensor"``, ``"dict(ids, mask)"``, ...).
    batch_size
        Leading dimension of the first tensor.
    tensors
        Path (``"inputs"``, ``"inputs[1]"``, ``"inputs.mask"``, ``"targets"``)
        -> shape, dtype, device, bytes (what is stored), ``layout`` for sparse
        tensors, and, when measured, min, max, mean, std, non_finite.
    label_counts
        Class index -> count for integer class targets.
    non_finite
        NaN/Inf values in the batch (None when not scanned).
    input_std, input_absmax
        Mean std and largest magnitude of the floating inputs.
    exact
        Statistics over every element (else a sample plus a full NaN/Inf pass).
    """

    stage: ClassVar[Stage] = Stage.FETCH
    structure: str | None = None
    batch_size: int | None = None
    tensors: dict[str, dict[str, Any]] | None = None
    label_counts: np.ndarray | None = None
    non_finite: int | None = None
    input_std: float | None = None
    input_absmax: float | None = None
    exact: bool | None = None


@dataclasses.dataclass(eq=False)
class ZeroGradFacts(StageFacts):
    """ZERO_GRAD: gradients before and after ``optimizer.zero_grad()``.

    Attributes
    ----------
    grads_before, grads_after
        Parameters holding a gradient before and after.
    not_cleared
        Parameters whose gradient is still non-zero after ``zero_grad()``
        (parameters outside the optimizer).
    """

    stage: ClassVar[Stage] = Stage.ZERO_GRAD
    grads_before: int | None = None
    grads_after: int | None = None
    not_cleared: list[str] | None = None


@dataclasses.dataclass(eq=False)
class ToDeviceFacts(StageFacts):
    """TO_DEVICE: where the batch was and went.

    Attributes
    ----------
    device
        The runner's device (None: tensors stay where they are).
    devices_before, devices
        Devices of the batch's tensors before and after the move.
    bytes
        Size of the batch's tensors.
    param_devices
        Devices of the model's parameters.
    """

    stage: ClassVar[Stage] = Stage.TO_DEVICE
    device: str | None = None
    devices_before: list[str] | None = None
    devices: list[str] | None = None
    bytes: int | None = None
    param_devices: list[str] | None = None


@dataclasses.dataclass(eq=False)
class ForwardFacts(StageFacts):
    """FORWARD: the model's mode, its output and per-module activations.

    Attributes
    ----------
    training, grad_enabled
        ``model.training`` and ``torch.is_grad_enabled()`` during the forward.
    eval_modules
        Modules (batch norm, dropout, or the model) in eval mode.
    activations
        Module name -> activation statistics (on the activation schedule).
    output_shape, output_dtype
        Of the first tensor in the output (a dataclass or dict output is searched).
    output_min, output_max, output_mean, output_std, output_non_finite
        Statistics of that tensor.
    non_finite_origin
        First module whose output held NaN/Inf.
    """

    stage: ClassVar[Stage] = Stage.FORWARD
    training: bool | None = None
    grad_enabled: bool | None = None
    eval_modules: list[str] | None = None
    activations: dict[str, Any] | None = None
    output_shape: tuple[int, ...] | None = None
    output_dtype: str | None = None
    output_min: float | None = None
    output_max: float | None = None
    output_mean: float | None = None
    output_std: float | None = None
    output_non_finite: int | None = None
    non_finite_origin: str | None = None


@dataclasses.dataclass(eq=False)
class LossFacts(StageFacts):
    """LOSS: the value, what the loss function saw, and which parameters it reaches.

    Attributes
    ----------
    loss, finite
        The value (every step) and whether it is finite.
    requires_grad
        Whether the loss is attached to a graph.
    loss_fn, reduction
        The loss function's name and ``reduction`` attribute.
    output_shape, target_shape, target_dtype, batch_size
        What it compared.
    expected_initial_loss
        ln(classes) for a classification output: the loss of a uniform guess.
    output_is_probability, output_is_log_probability, output_row_sum_dev, output_logsumexp_dev
        Whether the output already went through softmax / log-softmax.
    reached, unreached
        Trainable parameters the loss's autograd graph reaches / does not reach
        (measured on the first steps and then now and then).
    terms
        Number of criterion calls combined into this loss (``watch()``).
    """

    stage: ClassVar[Stage] = Stage.LOSS
    loss: float | None = None
    finite: bool | None = None
    requires_grad: bool | None = None
    loss_fn: str | None = None
    reduction: str | None = None
    output_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    batch_size: int | None = None
    expected_initial_loss: float | None = None
    output_is_probability: bool | None = None
    output_is_log_probability: bool | None = None
    output_row_sum_dev: float | None = None
    output_logsumexp_dev: float | None = None
    reached: list[str] | None = None
    unreached: list[str] | None = None
    terms: int | None = None


@dataclasses.dataclass(eq=False)
class BackwardFacts(StageFacts):
    """BACKWARD: per-parameter gradient norms and what is missing or broken.

    Attributes
    ----------
    grad_norm
        Per-parameter gradient norm (NaN where there is no gradient).
    grad_exact
        Norms over every element (else a scaled estimate from a sample).
    total_grad_norm
        Norm over all parameters with a gradient.
    missing_grad, non_finite_grad
        Trainable parameters with no gradient / with NaN/Inf in it.
    clip_ratio
        Gradient norm at ``optimizer.step()`` over the norm after backward
        (``watch()``, on a schedule): below 1 when the loop clips.
    loop, loop_event
        ``watch()``: a snapshot of :class:`~tlwidgets.core.watch.LoopFacts`
        on a record made for the loop rules (``loop_event=True``).
    """

    stage: ClassVar[Stage] = Stage.BACKWARD
    grad_norm: np.ndarray | None = None
    grad_exact: bool | None = None
    total_grad_norm: float | None = None
    missing_grad: list[str] | None = None
    non_finite_grad: list[str] | None = None
    clip_ratio: float | None = None
    loop: dict[str, Any] | None = None
    loop_event: bool | None = None


@dataclasses.dataclass(eq=False)
class StepFacts(StageFacts):
    """STEP: what the optimizer step changed.

    Attributes
    ----------
    update_norm, weight_norm, update_ratio
        Per parameter: norm of the change, of the weights after, and their ratio.
    lr
        Learning rate per group used by this step.
    update_exact
        Update norms from a full snapshot (else a sample estimate).
    changed, frozen_changed
        Parameters the step moved; those among them with ``requires_grad=False``.
    rolled_back
        After a failed ``optimizer.step()``: whether the weights were restored.
    scheduler_error
        A per-step ``scheduler.step()`` that raised after the weights moved.
    """

    stage: ClassVar[Stage] = Stage.STEP
    update_norm: np.ndarray | None = None
    weight_norm: np.ndarray | None = None
    update_ratio: np.ndarray | None = None
    lr: list[float] | None = None
    update_exact: bool | None = None
    changed: list[str] | None = None
    frozen_changed: list[str] | None = None
    rolled_back: bool | None = None
    scheduler_error: str | None = None


_BY_STAGE: dict[Stage, type[StageFacts]] = {
    cls.stage: cls
    for cls in (FetchFacts, ZeroGradFacts, ToDeviceFacts, ForwardFacts, LossFacts, BackwardFacts, StepFacts)
}


def facts_for(stage: Stage) -> StageFacts:
    """Empty facts of the class that belongs to ``stage``."""
    return _BY_STAGE[Stage(stage)]()


def new_facts(stage: Stage) -> StageFacts:
    """:func:`facts_for` a :class:`Stage` member (no conversion: built seven times per step)."""
    return _BY_STAGE[stage]()
