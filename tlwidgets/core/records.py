"""Records: what each stage, step and epoch saw, as plain data."""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any

from tlwidgets.core.facts import StageFacts, facts_for
from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage

__all__ = ["ControlChange", "EpochRecord", "ErrorInfo", "StageRecord", "StepSummary"]


@dataclasses.dataclass
class ErrorInfo:
    """An exception raised by user code during a stage, kept as text."""

    type: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), traceback=tb)


@dataclasses.dataclass
class StageRecord:
    """What one stage did.

    Attributes
    ----------
    stage
        The stage that ran.
    step
        Global step this stage belongs to (optimizer steps completed before it).
    epoch
        Epoch index (0-based).
    batch
        Index of the batch within the epoch.
    ok
        False when the user's code raised; see ``error``.
    exact
        True when statistics are exact (interactive stage stepping); False when
        they are subset estimates (see ``docs/tracking.md``).
    data
        The stage's typed facts (:mod:`tlwidgets.core.facts`: ``LossFacts``,
        ``StepFacts``, ...), read as attributes (``rec.data.loss``) or, like a
        dict of the facts that were recorded, by key (``rec["loss"]``).
    duration_s
        Wall time of the stage.
    error
        The exception, when ``ok`` is False.
    findings
        Findings raised at this stage.
    """

    stage: Stage
    step: int
    epoch: int
    batch: int
    ok: bool = True
    exact: bool = True
    data: StageFacts = None  # type: ignore[assignment]  # set in __post_init__
    duration_s: float = 0.0
    error: ErrorInfo | None = None
    findings: list[Finding] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.stage = Stage(self.stage)
        given = self.data
        if not isinstance(given, StageFacts) or given.stage is not self.stage:
            self.data = facts_for(self.stage)
            if given:
                self.data.update(given)

    @property
    def status(self) -> str:
        """``"error"``, ``"warning"`` or ``"ok"``: the worst thing this stage saw."""
        if not self.ok or any(f.severity == "error" for f in self.findings):
            return "error"
        if any(f.severity == "warning" for f in self.findings):
            return "warning"
        return "ok"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def summary(self) -> str:
        """A few lines of text for humans."""
        head = f"{self.stage.value} (step {self.step}, epoch {self.epoch}, batch {self.batch}): {self.status}"
        if self.error is not None:
            return f"{head}\n  {self.error.type}: {self.error.message}"
        lines = [head]
        for key, value in self.data.items():
            text = repr(value)
            if len(text) > 100:
                text = text[:97] + "..."
            lines.append(f"  {key}: {text}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclasses.dataclass
class StepSummary:
    """One completed optimizer step, as announced by :class:`Event.STEP`."""

    step: int
    epoch: int
    batch: int
    loss: float
    lr: list[float]
    exact: bool
    duration_s: float


@dataclasses.dataclass
class EpochRecord:
    """The end of an epoch: mean training loss, validation, scheduler.

    ``train_metrics`` holds what the training steps of the epoch measured besides
    the loss: ``"accuracy"`` (correct examples / examples, counted on the
    outputs of the training forward passes, in train mode) for 2-D logits with
    integer class targets; empty otherwise.
    """

    epoch: int
    step: int
    train_loss: float
    val_loss: float | None = None
    val_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    lr: list[float] = dataclasses.field(default_factory=list)
    batches: int = 0
    ok: bool = True
    error: ErrorInfo | None = None


@dataclasses.dataclass
class ControlChange:
    """A control action (freeze, unfreeze, set_lr, rewind, checkpoint)."""

    kind: str
    step: int
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def label(self) -> str:
        """Short text for a loss-plot marker."""
        names = self.detail.get("names")
        if names:
            return f"{self.kind} {', '.join(names)}"
        if "lr" in self.detail:
            return f"{self.kind} {self.detail['lr']:.2g}"
        return self.kind
