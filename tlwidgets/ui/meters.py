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
    only, removed by :meth:`close`) the tracker methods the runner and the
    watcher call around each step: grad norms, the pre-step snapshot, the
    post-step update/weight norms plus history row, and activation statistics.
    Costs paid inside hooks during forward/backward are not included, so the
    figure is a lower bound of the tracking overhead.
    """

    _METHODS = (
        ("", "measure_grads"),
        ("", "record_step"),
        ("", "finish_activations"),
        ("stats", "before_step"),
    )

    def __init__(self, session: Any) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._patched: list[tuple[Any, str]] = []
        tracker = getattr(session, "tracker", None)
        if tracker is None:
            return
        for owner_attr, name in self._METHODS:
            owner = getattr(tracker, owner_attr) if owner_attr else tracker
            original = getattr(owner, name, None)
            if original is None or not callable(original):
                continue
            setattr(owner, name, self._timed(original))
            self._patched.append((owner, name))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapper

    def step_done(self) -> None:
        self.steps += 1

    def ms_per_step(self) -> float:
        """Mean tracking time per step, in milliseconds (0 before the first step)."""
        return 1000.0 * self.seconds / self.steps if self.steps else 0.0

    def close(self) -> None:
        """Restore the tracker's own methods."""
        for owner, name in self._patched:
            owner.__dict__.pop(name, None)
        self._patched = []
