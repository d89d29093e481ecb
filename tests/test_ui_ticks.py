"""tlwidgets.ui.ticks: tick values are integers on step axes, and their labels never touch (#16)."""

from __future__ import annotations

import math

import pytest

from tlwidgets.ui.ticks import (
    CHAR_EM,
    MIN_GAP_PX,
    integer_ticks,
    label_extents,
    label_width,
    log_ticks,
    nice_strides,
    ordinal_labels,
    overlapping,
)


def _linear_extents(ticks, lo, hi, width, font_px=10.0):
    positions = [(t - lo) / (hi - lo) * width for t in ticks]
    return label_extents(positions, [str(t) for t in ticks], font_px)


def test_label_width_is_generous_for_digits_in_the_usual_fonts():
    # DejaVu Sans digits are 0.636 em wide, Arial's 0.556 em: the estimate covers both.
    assert CHAR_EM >= 0.636
    assert label_width("12345", 10) == pytest.approx(5 * CHAR_EM * 10)


def test_overlapping_sees_labels_closer_than_the_gap_in_any_order():
    assert not overlapping([(0, 10), (10 + MIN_GAP_PX, 30)])
    assert overlapping([(30, 40), (0, 31)])
    assert overlapping([(0, 10), (12, 20)], gap=3)
    assert not overlapping([(0, 10)])


def test_nice_strides_are_one_two_five_times_powers_of_ten():
    it = nice_strides()
    assert [next(it) for _ in range(7)] == [1, 2, 5, 10, 20, 50, 100]
    it = nice_strides(3)
    assert [next(it) for _ in range(3)] == [5, 10, 20]


@pytest.mark.parametrize(
    "lo, hi",
    [(0, 2), (1, 3), (0, 5), (1, 50), (1, 1000), (0, 123_456), (5301, 5350), (681, 1661), (0.5, 3.5)],
)
@pytest.mark.parametrize("width", [120, 255, 600])
def test_integer_ticks_are_integers_in_range_and_their_labels_do_not_touch(lo, hi, width):
    ticks = integer_ticks(lo, hi, width)
    assert ticks, "no tick on a range holding integers"
    assert all(isinstance(t, int) for t in ticks)
    assert all(lo <= t <= hi for t in ticks)
    assert ticks == sorted(set(ticks))
    assert not overlapping(_linear_extents(ticks, lo, hi, width))
    if len(ticks) > 1:  # evenly spaced by a round stride
        strides = {b - a for a, b in zip(ticks, ticks[1:])}
        assert len(strides) == 1
        stride = strides.pop()
        assert stride / 10 ** math.floor(math.log10(stride)) in (1, 2, 5)


def test_integer_ticks_with_few_steps_have_no_fractions():
    assert integer_ticks(0, 2, 255) == [0, 1, 2]
    assert integer_ticks(1, 3, 255) == [1, 2, 3]
    assert integer_ticks(0.2, 0.8, 255) == []


def test_integer_ticks_use_the_room_they_have():
    assert len(integer_ticks(1, 1000, 600)) > len(integer_ticks(1, 1000, 120)) >= 2


@pytest.mark.parametrize(
    "values",
    [
        list(range(1, 51)),
        list(range(5301, 5351)),  # "5354555657..." in #16
        list(range(681, 1681, 20)),  # "681 701 721" in #16, once every 20th step is measured
        list(range(1, 201))[:10] + list(range(20, 820, 20)),  # dense, then sparse
        [1, 2],
        [7],
    ],
)
@pytest.mark.parametrize("width", [150, 218, 500])
def test_ordinal_labels_never_touch_at_the_width(values, width):
    chosen = ordinal_labels(values, width)
    assert chosen and set(chosen) <= set(values)
    band = width / len(values)
    positions = [(values.index(v) + 0.5) * band for v in chosen]
    assert not overlapping(label_extents(positions, [str(v) for v in chosen]))


def test_ordinal_labels_sit_on_round_steps_when_the_steps_are_evenly_spaced():
    assert ordinal_labels(list(range(1, 51)), 218) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    sparse = ordinal_labels(list(range(681, 1681, 20)), 218)
    assert sparse == [801, 1001, 1201, 1401, 1601]  # every 200 steps, counted from the schedule's phase


def test_ordinal_labels_count_back_from_the_newest_when_spacing_is_irregular():
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 40, 60, 80, 100]
    chosen = ordinal_labels(values, 218)
    assert chosen[-1] == 100


def _log_positions(ticks, lo, hi, length):
    return [(math.log10(t) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * length for t in ticks]


@pytest.mark.parametrize(
    "lo, hi", [(1e-7, 10.0), (1e-3, 300.0), (0.3, 2.5), (0.05, 40.0), (2.1, 2.4), (1.0, 1.02)]
)
@pytest.mark.parametrize("length, spacing", [(250, 24.0), (135, 24.0), (295, 34.0)])
def test_log_ticks_do_not_crowd(lo, hi, length, spacing):
    ticks = log_ticks(lo, hi, length, min_spacing_px=spacing)
    assert len(ticks) >= 2
    assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks)
    pos = _log_positions(ticks, lo, hi, length)
    # linear fallback ticks are evenly spaced in value, so a little closer at the top in log terms
    assert min(b - a for a, b in zip(pos, pos[1:])) >= spacing * 0.9


def test_log_ticks_prefer_powers_of_ten_on_wide_ranges():
    ticks = log_ticks(1e-7, 10.0, 250, min_spacing_px=24)
    assert all(math.log10(t).is_integer() for t in ticks)
    assert log_ticks(1e-7, 10.0, 100, min_spacing_px=24) == [1e-6, 1e-4, 1e-2, 1.0]  # every 2nd decade


def test_log_ticks_within_a_decade_use_round_mantissas():
    assert log_ticks(0.3, 2.5, 600, min_spacing_px=24) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0]
    assert log_ticks(0.3, 2.5, 250, min_spacing_px=24) == [0.5, 1.0, 2.0]  # 0.9 and 1 would touch
