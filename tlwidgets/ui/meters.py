"""Numbers for the status line: steps per second and what tracking costs per step."""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateMeter", "TrackingTimer"]


class RateMeter:
    """Steps per second over a sliding window of recent step events.

    Parameters
    ----------
    window_s
        Only steps seen in the last ``window_s`` seconds count, so the rate
        drops to 0 shortly after a run stops.
    clock
        Time source (seconds).
    """

    def __init__(self, window_s: float = 3.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.window_s = window_s
        self.clock = clock
        self._seen: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)

    def add(self, step: int) -> None:
        self._seen.append((self.clock(), step))

    def reset(self) -> None:
        self._seen.clear()

    def rate(self) -> float:
        """Steps per second over the window (0 when fewer than two steps are in it)."""
        now = self.clock()
        while self._seen and now - self._seen[0][0] > self.window_s:
            self._seen.popleft()
        if len(self._seen) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._seen[0], self._seen[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


class TrackingTimer:
    """Time spent in the tracker's own measurements, per optimizer step.

    The core does not time its statistics, so this wraps (on the instance
    only) the tracker methods the runner and the watcher call around each
    step: grad norms, the pre-step snapshot, the post-step update/weight norms
    plus history row, and activation statistics. Costs paid inside hooks
    during forward/backward are not included, so the figure is a lower bound
    of the tracking overhead.

    Several timers on one tracker (two dashboards on one runner) share one
    wrapper per method, which adds each call's time to every timer attached;
    :meth:`close` detaches this timer only, and the last one to close puts the
    tracker's own methods back.

    Parameters
    ----------
    session
        A Runner or Watcher (its ``tracker`` is timed); without a tracker the
        timer stays at 0.
    """

    _METHODS = (
        ("", "measure_grads"),
        ("", "record_step"),
        ("", "finish_activations"),
        ("stats", "before_step"),
    )

    def __init__(self, session: Any) -> None:
        #: Seconds measured since this timer was created.
        self.seconds = 0.0
        #: Steps counted by :meth:`step_done`.
        self.steps = 0
        self._attached: list[_SharedTiming] = []
        tracker = getattr(session, "tracker", None)
        if tracker is None:
            return
        for owner_attr, name in self._METHODS:
            owner = getattr(tracker, owner_attr, None) if owner_attr else tracker
            timing = _SharedTiming.attach(owner, name) if owner is not None else None
            if timing is not None:
                timing.timers.append(self)
                self._attached.append(timing)

    def step_done(self) -> None:
        self.steps += 1

    def ms_per_step(self) -> float:
        """Mean tracking time per step, in milliseconds (0 before the first step)."""
        return 1000.0 * self.seconds / self.steps if self.steps else 0.0

    def close(self) -> None:
        """Stop timing; the last timer of a tracker restores the tracker's own methods."""
        for timing in self._attached:
            timing.detach(self)
        self._attached = []


class _SharedTiming:
    """The timing wrapper of one tracker method, shared by the timers attached to it."""

    def __init__(self, owner: Any, name: str, original: Callable[..., Any]) -> None:
        self.owner = owner
        self.name = name
        self.timers: list[TrackingTimer] = []
        own = vars(owner)
        self._had_own, self._own = name in own, own.get(name)  # an instance attribute we cover
        timers = self.timers

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                for timer in timers:
                    timer.seconds += elapsed

        wrapper._tlw_timing = self  # type: ignore[attr-defined]
        self.wrapper = wrapper
        setattr(owner, name, wrapper)

    @classmethod
    def attach(cls, owner: Any, name: str) -> _SharedTiming | None:
        """The wrapper installed on ``owner.name`` (installed now if there is none yet)."""
        try:
            current = vars(owner).get(name)
        except TypeError:  # no instance __dict__ (slots): nothing can be wrapped per instance
            return None
        timing = getattr(current, "_tlw_timing", None)
        if isinstance(timing, cls) and timing.owner is owner:
            return timing
        original = getattr(owner, name, None)
        if original is None or not callable(original):
            return None
        return cls(owner, name, original)

    def detach(self, timer: TrackingTimer) -> None:
        """Stop adding time to ``timer``; without timers left, uninstall the wrapper."""
        self.timers[:] = [t for t in self.timers if t is not timer]
        if self.timers:
            return
        own = vars(self.owner)
        if own.get(self.name) is self.wrapper:  # not covered by someone else's wrapper since
            if self._had_own:
                own[self.name] = self._own
            else:
                del own[self.name]
