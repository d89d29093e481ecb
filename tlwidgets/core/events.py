"""A tiny synchronous event bus: the runner publishes, panels and rules subscribe."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "EventBus"]

log = logging.getLogger(__name__)


class Event(str, enum.Enum):
    """What a runner or watcher announces.

    Payloads: ``STAGE`` a :class:`~tlwidgets.core.records.StageRecord`;
    ``STEP`` a :class:`~tlwidgets.core.records.StepSummary`; ``EPOCH`` an
    :class:`~tlwidgets.core.records.EpochRecord`; ``FINDING`` a new
    :class:`~tlwidgets.core.findings.Finding`; ``ERROR`` the failed
    ``StageRecord``; ``CONTROL`` a :class:`~tlwidgets.core.records.ControlChange`
    (freeze, unfreeze, set_lr, rewind, checkpoint).
    """

    STAGE = "stage"
    STEP = "step"
    EPOCH = "epoch"
    FINDING = "finding"
    ERROR = "error"
    CONTROL = "control"

    def __str__(self) -> str:
        return self.value


Callback = Callable[[Any], None]


class EventBus:
    """Subscribe with :meth:`on`, unsubscribe with the function it returns.

    A subscriber that raises does not break training: the exception is logged
    and kept in :attr:`errors` (so a UI can show it) and the other
    subscribers still run.
    """

    def __init__(self) -> None:
        self._subs: dict[Event, list[Callback]] = {e: [] for e in Event}
        self.errors: list[tuple[Event, BaseException]] = []

    def on(self, event: Event | str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(payload)`` on each ``event``; returns an unsubscribe function."""
        ev = Event(event)
        self._subs[ev].append(callback)

        def off() -> None:
            if callback in self._subs[ev]:
                self._subs[ev].remove(callback)

        return off

    def has_subscribers(self, event: Event) -> bool:
        """Does anything listen to ``event``? (A publisher may then skip building its payload.)"""
        return bool(self._subs[event])

    def emit(self, event: Event, payload: Any) -> None:
        subs = self._subs[event]
        if not subs:  # the common case while nothing is displayed: every stage emits
            return
        for cb in list(subs):
            try:
                cb(payload)
            except Exception as exc:  # a broken panel must not stop training
                log.exception("subscriber to %s raised", event.value)
                self.errors.append((event, exc))
                del self.errors[:-20]  # keep the latest few only

    def clear(self) -> None:
        for subs in self._subs.values():
            subs.clear()
