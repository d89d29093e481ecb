"""History ring buffers: bounded memory, order after wrap, NaN where not measured, lr widening, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from tlwidgets.core.history import History, RingBuffer
from tlwidgets.core.records import ControlChange, EpochRecord

MiB = 1024 * 1024


def _append(h: History, step: int, n_params: int, lr=(0.1,), loss=None, grad=None) -> None:
    h.append(
        step=step,
        epoch=step // 10,
        loss=float(step) if loss is None else loss,
        lr=list(lr),
        grad_norm=np.full(n_params, float(step)) if grad is None else grad,
        weight_norm=np.full(n_params, 2.0 * step),
        update_norm=np.full(n_params, 0.5 * step),
        exact=step % 2 == 0,
    )


# ---------------------------------------------------------------------- RingBuffer
def test_ring_buffer_wraps_oldest_first_and_keeps_capacity_rows():
    ring = RingBuffer(4, width=2)
    nbytes = ring.nbytes
    for i in range(10):
        ring.append((i, -i))
        assert len(ring) == min(i + 1, 4)
        assert ring.nbytes == nbytes
    np.testing.assert_array_equal(ring.values(), [[6, -6], [7, -7], [8, -8], [9, -9]])
    np.testing.assert_array_equal(ring.last(), [9, -9])


def test_ring_buffer_values_is_a_copy():
    ring = RingBuffer(3)
    ring.append(1.0)
    v = ring.values()
    v[0] = 99.0
    assert ring.values()[0] == 1.0


def test_ring_buffer_truncate_after_wrap_keeps_the_oldest_rows():
    ring = RingBuffer(4)
    for i in range(7):  # holds 3, 4, 5, 6
        ring.append(i)
    ring.truncate(2)
    np.testing.assert_array_equal(ring.values(), [3, 4])
    ring.append(10)  # the next row goes right after the kept ones
    np.testing.assert_array_equal(ring.values(), [3, 4, 10])


def test_ring_buffer_rejects_zero_capacity_and_empty_last():
    with pytest.raises(ValueError):
        RingBuffer(0)
    assert RingBuffer(2).last() is None


# ---------------------------------------------------------------------- History
def test_history_accessors_shapes_and_values():
    names = ["a.weight", "a.bias", "b.weight"]
    h = History(names, capacity=100)
    for s in range(1, 6):
        _append(h, s, 3)
    assert len(h) == 5
    np.testing.assert_array_equal(h.step, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(h.loss, [1, 2, 3, 4, 5])
    assert h.loss.dtype == np.float64
    assert h.grad_norm.shape == h.weight_norm.shape == h.update_norm.shape == h.update_ratio.shape == (5, 3)
    np.testing.assert_array_equal(h.grad_norm[:, 1], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(h.update_ratio, 0.25)  # 0.5 s / 2 s
    np.testing.assert_array_equal(h.exact, [False, True, False, True, False])
    np.testing.assert_array_equal(h.column("weight_norm", "b.weight"), [2, 4, 6, 8, 10])
    last = h.last()
    assert last["step"] == 5 and last["loss"] == 5.0
    np.testing.assert_array_equal(last["update_norm"], [2.5, 2.5, 2.5])


def test_history_is_bounded_and_oldest_first_after_wrap():
    h = History([f"p{i}" for i in range(4)], capacity=50)
    for s in range(1, 51):
        _append(h, s, 4)
    full = h.nbytes
    for s in range(51, 178):
        _append(h, s, 4)
        assert h.nbytes == full  # no growth once full
    assert len(h) == 50
    np.testing.assert_array_equal(h.step, np.arange(128, 178))
    np.testing.assert_array_equal(h.loss, np.arange(128, 178, dtype=float))
    np.testing.assert_array_equal(h.grad_norm[:, 0], np.arange(128, 178, dtype=float))


def test_history_nan_where_not_measured():
    h = History(["w", "b"], capacity=10)
    _append(h, 1, 2, grad=np.array([1.0, np.nan]))
    assert np.isnan(h.grad_norm[0, 1]) and h.grad_norm[0, 0] == 1.0
    empty = History(["w"], capacity=10)
    assert empty.loss.shape == (0,)
    assert empty.grad_norm.shape == (0, 1)
    assert empty.last() is None


def test_history_lr_widens_when_a_group_is_added():
    h = History(["w"], capacity=8)
    for s in range(1, 4):
        _append(h, s, 1, lr=(0.1,))
    for s in range(4, 6):
        _append(h, s, 1, lr=(0.1, 0.01))
    lr = h.lr
    assert lr.shape == (5, 2)
    np.testing.assert_allclose(lr[:, 0], 0.1)
    assert np.isnan(lr[:3, 1]).all()
    np.testing.assert_allclose(lr[3:, 1], 0.01)
    # Widening after the buffer wrapped keeps the order and the old values.
    for s in range(6, 12):
        _append(h, s, 1, lr=(0.1, 0.01, 0.001))
    lr = h.lr
    np.testing.assert_array_equal(h.step, np.arange(4, 12))
    assert lr.shape == (8, 3)
    assert np.isnan(lr[:2, 2]).all()
    np.testing.assert_allclose(lr[2:, 2], 0.001)


def test_truncate_to_step_drops_later_rows_epochs_and_val_loss():
    h = History(["w"], capacity=6)
    for s in range(1, 10):  # wraps: holds 4..9
        _append(h, s, 1)
        if s % 3 == 0:
            h.add_epoch(EpochRecord(epoch=s // 3 - 1, step=s, train_loss=1.0, val_loss=float(s)))
    h.truncate_to_step(6)
    np.testing.assert_array_equal(h.step, [4, 5, 6])
    np.testing.assert_array_equal(h.loss, [4.0, 5.0, 6.0])
    assert [e.step for e in h.epochs] == [3, 6]
    np.testing.assert_array_equal(h.val_loss[:, 0], [3, 6])
    _append(h, 7, 1, loss=70.0)
    np.testing.assert_array_equal(h.loss, [4.0, 5.0, 6.0, 70.0])
    h.truncate_to_step(0)
    assert len(h) == 0


def test_truncate_to_step_drops_later_activation_rows():
    h = History(["w"], capacity=100)  # activation rings hold capacity // 10 rows
    for s in (0, 1, 2, 5, 8):
        h.add_activations(s, {"fc": (0.1 * s, 1.0, 0.5, 0.0)})
    # Activation rows are stamped with the steps completed *before* their forward pass, so
    # rewinding to 5 completed steps drops the row of step 5's forward (it will be replayed).
    h.truncate_to_step(5)
    np.testing.assert_array_equal(h.activations["fc"].values()[:, 0], [0, 1, 2])
    np.testing.assert_allclose(h.activations["fc"].values()[:, 1], [0.0, 0.1, 0.2])


def test_controls_and_epochs_lists_are_bounded():
    h = History(["w"], capacity=5)
    for i in range(12):
        h.add_control(ControlChange("set_lr", i, {"lr": 0.1}))
        h.add_epoch(EpochRecord(epoch=i, step=i, train_loss=0.0))
    assert [c.step for c in h.controls] == list(range(7, 12))
    assert [e.epoch for e in h.epochs] == list(range(7, 12))
    assert len(h.val_loss) == 0  # no val_loss given: no row


def test_memory_below_two_mib_per_thousand_steps_for_sixty_params():
    names = [f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(60)]
    h = History(names, capacity=1000)
    # Activations of 30 modules measured every 10 steps, as the tracker does by default.
    for s in range(1, 1001):
        _append(h, s, 60, lr=(0.1, 0.01))
        if s % 10 == 0:
            h.add_activations(s, {f"layer{i}": (0.0, 1.0, 0.5, 0.0) for i in range(30)})
    full = h.nbytes
    assert full < 2 * MiB, f"{full / MiB:.2f} MiB per 1000 steps"
    for s in range(1001, 2001):
        _append(h, s, 60, lr=(0.1, 0.01))
        if s % 10 == 0:
            h.add_activations(s, {f"layer{i}": (0.0, 1.0, 0.5, 0.0) for i in range(30)})
    assert h.nbytes == full
    # The arrays actually held (not only what nbytes reports) stay bounded too.
    held = sum(r._data.nbytes for r in (h._loss, h._step, h._epoch, h._exact, h._measured, h._lr, h._val))
    held += sum(r._data.nbytes for r in h._stats.values())
    held += sum(r._data.nbytes for r in h.activations.values())
    assert held == full


def test_window_of_measured_rows_matches_a_naive_reference() -> None:
    """``window``/``span``/``measured_count`` against boolean masks of the public arrays, past a wrap."""
    rng = np.random.default_rng(0)
    h = History(["w", "b"], capacity=50)
    for step in range(1, 131):  # wraps the ring twice
        measured = step <= 20 or step % 7 == 0
        stats = rng.random(2) if measured else np.full(2, np.nan)
        h.append(
            step=step,
            epoch=0,
            loss=float(step),
            lr=[0.1],
            grad_norm=stats,
            weight_norm=stats + 1,
            update_norm=stats / 10,
            exact=False,
            measured=measured,
        )
        mask = h.measured
        assert h.measured_count == int(mask.sum())
        for n in (1, 5, 200):
            assert np.array_equal(h.window("grad_norm", n), h.grad_norm[mask][-n:], equal_nan=True)
            assert np.array_equal(h.window("step", n, measured=True), h.step[mask][-n:])
            assert np.array_equal(h.window("loss", n), h.loss[-n:])
            steps = h.step[mask][-n:]
            assert h.span(n) == (len(h) - int(np.flatnonzero(h.step == steps[0])[0]) if steps.size else 0)
    with pytest.raises(KeyError, match="no per-step series"):
        h.window("update_ratio", 3)


def test_recent_losses_are_the_loss_window_across_the_ring_wrap() -> None:
    h = History(["a"], capacity=7)
    for i in range(12):
        h.append(
            step=i,
            epoch=0,
            loss=float(i) if i != 4 else float("nan"),
            lr=[0.1],
            grad_norm=np.ones(1),
            weight_norm=np.ones(1),
            update_norm=np.ones(1),
            exact=False,
        )
        for n in (0, 1, 3, 5, 9):
            got = h.recent_losses(n)
            assert np.array_equal(np.array(got, dtype=np.float64), h.window("loss", n), equal_nan=True)
            assert all(type(v) is float for v in got)


def _fill(h: History, rows: list[tuple[int, bool]]) -> None:
    for step, measured in rows:
        stats = np.full(2, float(step)) if measured else np.full(2, np.nan)
        h.append(
            step=step,
            epoch=step // 10,
            loss=1.0 / step,
            lr=[0.1 * step, 0.2] if step % 3 else [0.1 * step],
            grad_norm=stats,
            weight_norm=stats * 2,
            update_norm=stats * 3,
            exact=measured and step % 2 == 0,
            measured=measured,
        )


@pytest.mark.parametrize("pending_max", [1, 5, 64])
def test_unmeasured_rows_written_later_read_exactly_as_rows_written_at_once(pending_max: int) -> None:
    # Unmeasured rows wait in a list and are written together (#15): every read must see them,
    # across the ring's wrap, a measured row in between, a rewind and a branch.
    rows = [(s, s % 7 == 0) for s in range(1, 40)]
    ref, got = History(["a", "b"], capacity=25), History(["a", "b"], capacity=25)
    ref.PENDING_MAX = 1  # written at once: what every row did before the deferral
    got.PENDING_MAX = pending_max
    for i in range(0, len(rows), 6):
        _fill(ref, rows[i : i + 6])
        _fill(got, rows[i : i + 6])
        assert len(got) == len(ref)
        for key in ("loss", "step", "epoch", "exact", "measured", "lr", "grad_norm", "update_norm"):
            assert np.array_equal(getattr(got, key), getattr(ref, key), equal_nan=True), key
        assert got.measured_count == ref.measured_count and got.span(2) == ref.span(2)
        for key, n in (("loss", 9), ("update_norm", 3), ("lr", 30)):
            assert np.array_equal(got.window(key, n), ref.window(key, n), equal_nan=True)
        assert got.recent_losses(4) == ref.recent_losses(4)
        assert got.last()["step"] == ref.last()["step"]
    _fill(ref, [(40, False), (41, False)])
    _fill(got, [(40, False), (41, False)])
    assert got.branch_off(38, "x").step.tolist() == ref.branch_off(38, "x").step.tolist() == [39, 40, 41]
    _fill(ref, [(42, False)])
    _fill(got, [(42, False)])
    ref.truncate_to_step(39)
    got.truncate_to_step(39)
    assert np.array_equal(got.step, ref.step) and got.step[-1] == 39
