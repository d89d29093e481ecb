"""The seven stages of one training step, in the order they run."""

from __future__ import annotations

import enum

__all__ = ["Stage"]


class Stage(str, enum.Enum):
    """One stage of a training step.

    The members are ordered as a plain PyTorch loop runs them; ``str`` mixin so
    ``Stage.FORWARD == "forward"`` and the names serialize as plain text.
    """

    FETCH = "fetch"
    ZERO_GRAD = "zero_grad"
    TO_DEVICE = "to_device"
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    STEP = "step"

    def __str__(self) -> str:
        return self.value

    @property
    def index(self) -> int:
        """Position of the stage within a step (0 for FETCH)."""
        return _INDEX[self]

    def next(self) -> Stage:
        """The stage that follows this one (STEP wraps around to FETCH)."""
        return _NEXT[self]

    @classmethod
    def ordered(cls) -> tuple[Stage, ...]:
        """All stages in execution order."""
        return _ORDER


_ORDER: tuple[Stage, ...] = tuple(Stage)
_INDEX: dict[Stage, int] = {s: i for i, s in enumerate(_ORDER)}
_NEXT: dict[Stage, Stage] = {s: _ORDER[(i + 1) % len(_ORDER)] for i, s in enumerate(_ORDER)}
