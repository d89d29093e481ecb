"""Choosing axis ticks that fit: integer steps, labels that never touch, log ticks that do not crowd.

bqplot draws whatever tick values it is given (or d3's defaults, which put 1.5 on a
step axis and every 2, 3 ... 9 on a log axis). The plots choose their ticks here
instead, from the pixels the axis has and an estimate of each label's extent, so
two labels never overlap or touch at the panel's smallest width (a wider panel only
spreads them further apart).

The browser's real sizes are not known in the kernel, so the estimates are
deliberately generous (see :data:`CHAR_EM`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "CHAR_EM",
    "LINE_EM",
    "MIN_GAP_PX",
    "integer_ticks",
    "label_extents",
    "label_width",
    "log_ticks",
    "nice_strides",
    "ordinal_labels",
    "overlapping",
]

#: Width of one character of a tick label, in ems. Tick labels are digits, "e", "-" and
#: ".": digits are 0.556 em wide in Arial/Helvetica and 0.636 em in DejaVu Sans (what
#: Chromium falls back to for sans-serif on Linux); 0.65 em covers both, so an estimate
#: never undershoots the label actually drawn.
CHAR_EM = 0.65
#: Height of a line of text, in ems (the CSS default line height is about 1.2).
LINE_EM = 1.2
#: Space kept between two labels, in pixels: closer than about one character, "53 54"
#: reads as one number "5354".
MIN_GAP_PX = 8.0


def label_width(text: str, font_px: float = 10.0) -> float:
    """Estimated width in pixels of ``text`` drawn at ``font_px`` (generous: see :data:`CHAR_EM`)."""
    return len(text) * CHAR_EM * font_px


def label_extents(
    positions: Sequence[float], labels: Sequence[str], font_px: float = 10.0
) -> list[tuple[float, float]]:
    """``(left, right)`` pixel extent of each label centred at its position (as axis labels are)."""
    out = []
    for x, text in zip(positions, labels):
        half = label_width(text, font_px) / 2
        out.append((x - half, x + half))
    return out


def overlapping(extents: Sequence[tuple[float, float]], gap: float = MIN_GAP_PX) -> bool:
    """True when two neighbouring extents (in axis order) are closer than ``gap`` pixels."""
    ordered = sorted(extents)
    return any(b[0] - a[1] < gap for a, b in zip(ordered, ordered[1:]))


def nice_strides(start: int = 1) -> Iterator[int]:
    """1, 2, 5, 10, 20, 50, 100 ... (from the first one at least ``start``): round tick spacings."""
    k = 1
    while True:
        for m in (1, 2, 5):
            if m * k >= start:
                yield m * k
        k *= 10


def integer_ticks(
    lo: float,
    hi: float,
    width_px: float,
    *,
    font_px: float = 10.0,
    gap_px: float = MIN_GAP_PX,
    fmt: Callable[[int], str] = str,
) -> list[int]:
    """Integer tick values in ``[lo, hi]`` for a linear axis ``width_px`` pixels long.

    The values are the multiples of the smallest round stride (1, 2, 5, 10 ...)
    whose labels (``fmt(value)``) leave at least ``gap_px`` between each other.
    Never a fractional value (a step axis has no step 1.5).

    Parameters
    ----------
    lo, hi
        The axis' range (the scale's min and max).
    width_px
        The axis' length in pixels (its smallest, so that wider is only roomier).
    font_px
        The tick labels' font size.
    gap_px
        The least space between two labels.
    fmt
        How a value is written (its length sets the label's width).

    Returns
    -------
    list of int
        Ascending; empty when no integer lies in the range.
    """
    first, last = math.ceil(lo), math.floor(hi)
    if last < first:
        return []
    span = hi - lo
    # No stride below the one at which even one-character labels would touch (a lower bound, so
    # the search skips only strides that cannot fit: a long run has thousands of steps).
    least = (label_width("0", font_px) + gap_px) * span / max(width_px, 1e-9)
    for stride in nice_strides(max(1, math.ceil(least))):
        start = math.ceil(first / stride) * stride
        ticks = list(range(start, last + 1, stride))
        if len(ticks) <= 1:
            return ticks or [first]
        positions = [(t - lo) / span * width_px for t in ticks]
        if not overlapping(label_extents(positions, [fmt(t) for t in ticks], font_px), gap_px):
            return ticks
    raise AssertionError("unreachable: a stride above the range leaves one tick")


def ordinal_labels(
    values: Sequence[int],
    width_px: float,
    *,
    font_px: float = 10.0,
    gap_px: float = MIN_GAP_PX,
) -> list[int]:
    """Which columns of a band axis (``values`` in order, evenly spaced) to label.

    Column ``i`` of ``n`` is centred at ``(i + 0.5) * width_px / n``. Every
    ``k``-th column is labelled, ``k`` the smallest round stride whose labels
    leave ``gap_px`` between each other. When the values are evenly spaced
    (every step, or every 20th step once measurement thins out) the labels sit
    on round values (50, 100 ... or 701, 801 ...); otherwise they are counted
    back from the newest column, which is always labelled.

    Returns
    -------
    list of int
        The values to label, ascending (a subset of ``values``).
    """
    n = len(values)
    if n == 0:
        return []
    band = width_px / n
    diffs = {b - a for a, b in zip(values, values[1:])}
    spacing = diffs.pop() if len(diffs) == 1 else None
    least = (label_width("0", font_px) + gap_px) / band  # below this even one-character labels touch
    for k in nice_strides(max(1, math.ceil(least))):
        picked: list[int] = []
        if spacing is not None and spacing > 0:
            offset = values[0] % spacing
            picked = [i for i, v in enumerate(values) if (v - offset) % (k * spacing) == 0]
        if len(picked) < 2:  # irregular steps, or round values too rare here: count back from the newest
            picked = list(range(n - 1, -1, -k))[::-1]
        positions = [(i + 0.5) * band for i in picked]
        labels = [str(values[i]) for i in picked]
        if len(picked) == 1 or not overlapping(label_extents(positions, labels, font_px), gap_px):
            return [values[i] for i in picked]
    raise AssertionError("unreachable: a stride above n leaves one label")


def log_ticks(lo: float, hi: float, length_px: float, *, min_spacing_px: float) -> list[float]:
    """Tick values for a log axis over ``[lo, hi]`` (both > 0), ``length_px`` pixels long.

    The densest of: every 1-9 x 10^k, then 1-2-5, 1-3, each power of ten, every
    2nd, 5th, 10th ... power of ten, whose neighbouring ticks lie at least
    ``min_spacing_px`` apart and that puts two or more ticks in the range. A
    range narrower than that gets round linear ticks (a loss between 2.1 and
    2.4 on a log axis).

    Parameters
    ----------
    lo, hi
        The axis' range, positive.
    length_px
        The axis' length in pixels.
    min_spacing_px
        Least distance between two ticks: a label's height on a vertical axis,
        its width on a horizontal one, plus a gap.
    """
    if not (lo > 0 and hi > lo and math.isfinite(hi)):
        return [lo] if lo > 0 and math.isfinite(lo) else []
    l0, l1 = math.log10(lo), math.log10(hi)
    per_decade = length_px / (l1 - l0)

    def fits(ticks: list[float]) -> bool:
        pos = [math.log10(t) * per_decade for t in ticks]
        return len(ticks) >= 2 and all(b - a >= min_spacing_px for a, b in zip(pos, pos[1:]))

    d0, d1 = math.floor(l0), math.ceil(l1)
    for mantissas in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1, 3), (1,)):
        ticks = [
            float(f"{m}e{d}") for d in range(d0, d1 + 1) for m in mantissas
        ]  # 0.3, not 0.30000000000000004
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if fits(ticks):
            return ticks
        if len(ticks) < 2:
            break  # sparser sets hold still fewer
    for stride in nice_strides(2):
        ticks = [float(f"1e{d}") for d in range(d0, d1 + 1) if d % stride == 0 and lo <= 10.0**d <= hi]
        if len(ticks) < 2:
            break
        if fits(ticks):
            return ticks
    # Less than two round log ticks fit: round linear values in the range, spaced alike.
    count = max(2, int(length_px // min_spacing_px))
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out = []
    t = start
    while t <= hi * (1 + 1e-12):
        out.append(round(t, 12))
        t += step
    return out or [lo]
