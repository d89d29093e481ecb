"""Records: what each stage, step and epoch saw, as plain data."""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any

from tlwidgets.core.facts import _BY_STAGE, StageFacts, facts_for, new_facts
from tlwidgets.core.findings import Finding
from tlwidgets.core.stages import Stage

__all__ = [
    "ControlChange",
    "EpochRecord",
    "ErrorInfo",
    "RecordMissing",
    "StageRecord",
    "StageRecords",
    "StepSummary",
]


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
        # Seven records per training step: the common case (a Stage, no facts given) is one lookup.
        stage = self.stage
        if type(stage) is not Stage:
            stage = self.stage = Stage(stage)
        given = self.data
        if given is None:
            self.data = _BY_STAGE[stage]()  # (new_facts, inlined)
        elif not isinstance(given, StageFacts) or given.stage is not stage:
            self.data = new_facts(stage)
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
        try:
            return self.data[key]
        except KeyError:
            pass
        # A fact of another stage, asked of this record: say which record this is and where the fact
        # lives (a cell that expected FETCH's record gets ZERO_GRAD's after a click on "Step stage").
        owners = [st.value.upper() for st in Stage if key in facts_for(st)._name_set()]
        where = f"{self.stage.value.upper()} record (step {self.step}, batch {self.batch})"
        if owners:
            raise RecordMissing(
                f"{key!r} is not a fact of the {where}: the {', '.join(owners)} stage records it "
                f"(read runner.records[tlw.Stage.{owners[0]}]). Facts here: {', '.join(self.data)}"
            ) from None
        raise RecordMissing(f"the {where} has no fact {key!r}; facts here: {', '.join(self.data)}") from None

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


class RecordMissing(KeyError):
    """A record or a fact that is not there, with a message that says why (a plain ``KeyError`` prints
    only the key)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StageRecords(dict):
    """``runner.records``: the latest record of each stage of the current step (or the last one done).

    A plain ``dict`` keyed by :class:`Stage`, except that a stage with no record raises a
    :class:`RecordMissing` (a ``KeyError``) that says where the session is, instead of ``KeyError:
    <Stage.LOSS: 'loss'>``. ``get`` still returns None.

    Parameters
    ----------
    where
        ``where() -> str``: the session's position, for the message ("at FORWARD of step 3").
    """

    def __init__(self, where: Any = None) -> None:
        super().__init__()
        self._where = where

    def __missing__(self, key: Any) -> Any:
        try:
            stage = Stage(key)
        except ValueError:
            raise RecordMissing(
                f"{key!r} is not a stage; runner.records is keyed by tlw.Stage: "
                f"{', '.join(s.name for s in Stage)}"
            ) from None
        held = ", ".join(s.value.upper() for s in self) or "none"
        where = self._where() if callable(self._where) else ""
        raise RecordMissing(
            f"no {stage.value.upper()} record for this step yet: the records hold the stages run since "
            f"the step's FETCH ({held}){f'; {where}' if where else ''}. Run runner.step() to finish the "
            "step (or step_stage() up to that stage), then read it."
        )


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
