"""Throttled redraws: event handlers mark panels dirty, a refresher redraws at most ~10 times a second."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Refresher"]


class Refresher:
    """Collect dirty panel names and redraw them in batches.

    A redraw happens when at least ``interval`` seconds passed since the last
    one; otherwise a deferred redraw is scheduled on the running asyncio loop
    (when there is one), so the last changes of a burst are drawn too. The
    interval is ``1 / max_rate`` but grows to ``last_cost / max_fraction`` when
    redraws are slow, so drawing never takes more than ``max_fraction`` of the
    wall time whatever the step rate (this keeps a headless run with a
    dashboard attached within its throughput budget).

    Parameters
    ----------
    draw
        ``draw(parts)`` redraws the named parts.
    max_rate
        Redraws per second at most.
    max_fraction
        Largest share of wall time that redraws may take.
    clock
        Time source (seconds); injectable for tests.
    on_error
        ``on_error(exc)`` for an exception raised by a deferred redraw (which
        has no caller to raise to).
    part_intervals
        Longer minimum intervals for parts that are costly to render in the
        browser (e.g. ``{"heatmap": 0.25}``): a throttled redraw leaves them
        dirty until their own interval has passed. :meth:`flush` draws all.
    """

    def __init__(
        self,
        draw: Callable[[set[str]], None],
        *,
        max_rate: float = 10.0,
        max_fraction: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
        on_error: Callable[[BaseException], None] | None = None,
        part_intervals: dict[str, float] | None = None,
    ) -> None:
        if max_rate <= 0:
            raise ValueError(f"max_rate must be > 0, got {max_rate}")
        self._draw = draw
        self.max_rate = max_rate
        self.max_fraction = max_fraction
        self.clock = clock
        self.on_error = on_error
        self.dirty: set[str] = set()
        #: Number of redraws done (tests and the benchmark read it).
        self.redraws = 0
        #: Seconds spent drawing, in total and in the last redraw.
        self.total_cost = 0.0
        self.last_cost = 0.0
        self.last_draw = -math.inf
        self.part_intervals = dict(part_intervals or {})
        self._part_last: dict[str, float] = {}
        self._deferred: Any = None

    @property
    def interval(self) -> float:
        """Seconds that must pass between two throttled redraws."""
        return max(1.0 / self.max_rate, self.last_cost / self.max_fraction if self.max_fraction > 0 else 0.0)

    def mark(self, *parts: str) -> None:
        """Mark parts dirty and redraw if the throttle allows."""
        self.dirty.update(parts)
        self.maybe_flush()

    def mark_many(self, parts: Iterable[str]) -> None:
        self.mark(*parts)

    def maybe_flush(self) -> bool:
        """Redraw now when the interval has passed; else make sure a deferred redraw is pending."""
        if not self.dirty:
            return False
        now = self.clock()
        waited = now - self.last_draw
        if waited < self.interval:
            self._defer(self.interval - waited)
            return False
        ready = {
            p
            for p in self.dirty
            if now - self._part_last.get(p, -math.inf) >= self.part_intervals.get(p, 0.0)
        }
        if ready:
            self._flush(ready)
        if self.dirty:  # parts on a longer interval: their turn comes later
            wait = min(
                self.part_intervals.get(p, 0.0) - (now - self._part_last.get(p, -math.inf))
                for p in self.dirty
            )
            self._defer(max(wait, self.interval))
        return bool(ready)

    def flush(self) -> None:
        """Redraw every dirty part now (after a click, at the end of a run)."""
        if self.dirty:
            self._flush(set(self.dirty))

    def _flush(self, parts: set[str]) -> None:
        self.dirty -= parts
        t0 = self.clock()
        try:
            self._draw(parts)
        finally:
            t1 = self.clock()
            self.last_cost = max(0.0, t1 - t0)
            self.total_cost += self.last_cost
            self.redraws += 1
            self.last_draw = t1
            for p in parts:
                self._part_last[p] = t1

    def cancel(self) -> None:
        """Drop a pending deferred redraw (the dashboard is closing)."""
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    def _defer(self, delay: float) -> None:
        if self._deferred is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (plain script/pytest): the next event or an explicit flush draws
            return
        self._deferred = loop.call_later(max(delay, 0.0), self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._deferred = None
        try:
            self.maybe_flush()
        except Exception as exc:  # nobody to raise to from a loop callback
            if self.on_error is None:
                raise
            self.on_error(exc)
