"""The measurement schedule: dense phases, then every ``measure_every``-th step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import count_trend_runs
from torch import nn

import tlwidgets as tlw
from tlwidgets.core import recording
from tlwidgets.core.tracker import Tracker


def _setup(seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    # Labels a function of the inputs: random labels are labels-decoupled, which the data audits of a
    # watched loop report (rightly); these tests are about the schedule.
    w = torch.randn(6, 3, generator=g)
    xs = [torch.randn(12, 6, generator=g) for _ in range(n)]
    data = [(x, (x @ w).argmax(1)) for x in xs]
    return model, opt, data


def test_measuring_dense_phase_then_every_kth_step():
    model, opt, _ = _setup()
    t = Tracker(model, opt, measure_every=5, dense_steps=12)
    got = [s for s in range(40) if t.measuring(s)]
    assert got == [*range(12), 15, 20, 25, 30, 35]
    t.densify(31)
    assert all(t.measuring(s) for s in range(31, 43))
    assert not t.measuring(43) and t.measuring(45)


def test_lr_jump_starts_a_dense_phase():
    model, opt, _ = _setup()
    t = Tracker(model, opt, measure_every=10, dense_steps=5)
    t.note_lrs(20, [0.05 * 1.5])  # a 1.5x move: no
    assert not t.measuring(21)
    t.note_lrs(20, [0.05 * 3])  # 3x: yes, for the next dense_steps steps
    assert all(t.measuring(s) for s in range(20, 25)) and not t.measuring(25)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_measure_every_rejects_bad_values(bad):
    model, opt, data = _setup()
    with pytest.raises(ValueError, match="measure_every"):
        tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=bad)


def test_runner_rows_of_unmeasured_steps_hold_loss_and_lr_only():
    model, opt, data = _setup()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=4, dense_steps=6)
    r.run(steps=17)
    h = r.history
    measured = h.measured
    expect = np.array([(s - 1) < 6 or (s - 1) % 4 == 0 for s in h.step])  # row s is step s - 1's
    np.testing.assert_array_equal(measured, expect)
    assert np.isfinite(h.loss).all() and np.isfinite(h.lr).all()
    for key in ("grad_norm", "weight_norm", "update_norm", "update_ratio"):
        values = getattr(h, key)
        assert np.isfinite(values[measured]).all(), key
        assert np.isnan(values[~measured]).all(), key


def test_runner_measured_rows_match_a_naive_reference():
    model, opt, data = _setup()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=3, dense_steps=2)
    r.run(steps=5)  # steps 0, 1 (dense), 3 measured; 2 and 4 not
    assert r.tracker.measuring(6) and not r.tracker.measuring(5)
    r.run(steps=1)  # step 5: unmeasured
    before = [p.detach().clone() for p in model.parameters()]
    r.step()  # step 6: measured
    grads = torch.stack([p.grad.norm() for p in model.parameters()]).numpy()
    upd = torch.stack([(p.detach() - b).norm() for p, b in zip(model.parameters(), before)]).numpy()
    wn = torch.stack([b.norm() for b in before]).numpy()
    np.testing.assert_allclose(r.history.grad_norm[-1], grads, rtol=1e-5)
    np.testing.assert_allclose(r.history.update_norm[-1], upd, rtol=1e-4)  # small tensors: taken whole
    np.testing.assert_allclose(r.history.weight_norm[-1], wn, rtol=1e-5)


def test_unmeasured_step_records_are_marked_and_rules_stay_quiet():
    model, opt, data = _setup()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=50, dense_steps=3)
    r.run(steps=5)
    assert not r.tracker.measuring(5)
    rec = r.step()
    assert rec.data["measured"] is False
    assert r.records[tlw.Stage.BACKWARD].data["measured"] is False
    assert math.isfinite(r.records[tlw.Stage.LOSS].data["loss"])
    assert not r.diagnostic_errors


def test_control_change_and_rewind_start_dense_phases():
    model, opt, data = _setup()
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=50, dense_steps=3)
    r.run(steps=5)
    ck = r.checkpoint()
    r.run(steps=5)
    assert not r.tracker.measuring(r.global_step)
    r.freeze("0")
    assert all(r.tracker.measuring(s) for s in range(r.global_step, r.global_step + 3))
    r.run(steps=10)
    assert not r.tracker.measuring(r.global_step)
    r.rewind(ck)
    assert r.tracker.measuring(r.global_step)


def test_frozen_but_moving_found_right_after_a_freeze_by_hand_in_the_sparse_phase():
    """A freeze (even by hand) starts a dense phase: the process bug shows within two steps."""
    from tlwidgets.zoo.broken import InPlaceZeroGradSGD

    model, _, data = _setup(n=30)
    opt = InPlaceZeroGradSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=50, dense_steps=3)
    r.run(steps=8)
    assert not r.tracker.measuring(r.global_step)
    model[0].weight.requires_grad_(False)  # by hand: zero_grad() zeroes in place, decay still moves it
    r.run(steps=2)
    found = [f for f in r.findings if f.code == "frozen-param-changed"]
    assert found and found[0].params == ("0.weight",)


def test_nan_loss_on_an_unmeasured_step_stops_the_run():
    model, opt, data = _setup(n=20)
    data[12] = (torch.full_like(data[12][0], float("nan")), data[12][1])
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=50, dense_steps=3)
    result = r.run(steps=18)
    assert result.steps == 12 and result.stopped_by == "finding"
    assert result.finding.code in {"non-finite-input", "non-finite-loss"}
    codes = {f.code for f in r.findings}
    assert "non-finite-input" in codes  # the batch was scanned when the loss came out NaN


def test_watch_follows_the_same_schedule():
    model, opt, data = _setup()
    loss_fn = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=loss_fn, measure_every=4, dense_steps=3) as w:
        for _ in range(2):
            for x, y in data:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    h = w.history
    expect = np.array([(s - 1) < 3 or (s - 1) % 4 == 0 for s in h.step])
    np.testing.assert_array_equal(h.measured, expect)
    assert np.isnan(h.update_norm[~expect]).all() and np.isfinite(h.update_norm[expect]).all()
    assert np.isfinite(h.loss).all()
    assert not any(f.severity in ("warning", "error") for f in w.findings)


def test_watch_reports_grads_not_zeroed_in_the_sparse_phase():
    """The loop rules run on unmeasured steps too once the loop looks wrong."""
    model, opt, data = _setup(n=40)
    loss_fn = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=loss_fn, measure_every=100, dense_steps=3) as w:
        for i, (x, y) in enumerate(data):
            if i < 10:
                opt.zero_grad()  # the bug starts at step 10, past the dense phase
            loss_fn(model(x), y).backward()
            opt.step()
            if i == 12:
                break
    assert "grads-not-zeroed" in {f.code for f in w.findings}


# ------------------------------------------------------------------ diagnosis cadence (#15)
def test_diagnosing_every_step_of_a_dense_phase_start_then_one_in_diagnose_every():
    model, opt, _ = _setup()
    t = Tracker(model, opt, measure_every=1, dense_steps=200)
    full = Tracker.FULL_DIAGNOSIS
    got = [s for s in range(1, 120) if t.diagnosing(s)]
    every = Tracker.DIAGNOSE_EVERY
    assert got == [*range(1, full), *range(full, 120, every)]
    assert all(t.diagnosing(s) for s in got)  # asking again about a step gives the same answer
    t.densify(130)  # a change: its first steps one by one again
    assert all(t.diagnosing(s) for s in range(130, 130 + full))
    # Past it, the first step is due (the last was long before), then one in DIAGNOSE_EVERY.
    after = [s for s in range(130 + full, 130 + full + 2 * every + 1) if t.diagnosing(s)]
    assert after == [130 + full, 130 + full + every, 130 + full + 2 * every]
    assert t.diagnosing(7)  # a rewind: the step is due


def test_sparse_measured_steps_are_all_diagnosed_with_the_defaults():
    model, opt, _ = _setup()
    t = Tracker(model, opt, dense_steps=0)
    assert t.measure_every >= Tracker.DIAGNOSE_EVERY == t.diagnose_every
    measured = [s for s in range(300) if t.measuring(s)]
    assert measured == list(range(0, 300, 20))
    assert all(t.diagnosing(s + 1) for s in measured)  # measure_every >= diagnose_every: each is due


def test_measure_every_below_diagnose_every_diagnoses_every_diagnose_every_steps():
    model, opt, _ = _setup()
    t = Tracker(model, opt, measure_every=7, dense_steps=0, diagnose_every=20)
    diagnosed = [s for s in range(300) if t.measuring(s) and t.diagnosing(s + 1)]
    # Step 0 (the first steps are due), then the first measured step 20 or more steps after the last
    # diagnosis (counted in completed steps, from 0).
    assert diagnosed[:4] == [0, 21, 42, 63]
    assert all(b - a >= 20 for a, b in zip(diagnosed[1:], diagnosed[2:]))


def _counting_runner(n, **kw):
    model, opt, data = _setup(n=n)
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, **kw)
    return r, count_trend_runs(r)


def test_every_step_measured_rules_on_the_cadence_and_on_the_last_step_of_a_run():
    full, every = Tracker.FULL_DIAGNOSIS, Tracker.DIAGNOSE_EVERY
    r, calls = _counting_runner(40, measure_every=1)
    r.run(steps=full + 23)
    assert r.history.measured.all() and len(r.history) == full + 23  # statistics: every step
    assert np.isfinite(r.history.grad_norm).all() and np.isfinite(r.history.update_norm).all()
    assert full == recording.OCCASIONAL_EVERY  # step 50 takes the code-path facts: diagnosed too
    # The rules after each of the first 50 steps, after step 50 (the code-path facts: on_step sees 51),
    # then one step in five, and after the run's last step.
    assert calls == [*range(1, full + 2), *range(full + every, full + 23, every), full + 23]
    assert calls[-1] == r.global_step


def test_nan_gradients_on_an_undiagnosed_dense_step_stop_before_the_step():
    full = Tracker.FULL_DIAGNOSIS
    r, calls = _counting_runner(80, measure_every=1)
    r.run(steps=full + 2)
    bad = r.global_step  # the next step: undiagnosed (rules ran after full + 2 steps; next after full + 5)
    assert not r.tracker.diagnosing(bad + 1)
    w = r.model[0].weight
    hook = w.register_hook(lambda g: g * float("nan") if r.global_step == bad else g)
    try:
        before = w.detach().clone()
        result = r.run(steps=10)
    finally:
        hook.remove()
    # (An error finding stops the run first, as on any path; it names the NaN gradients.)
    assert result.stopped_by == "finding" and result.finding.code == "non-finite-grad"
    assert r.global_step == bad
    assert r.stage is tlw.Stage.STEP and r.holding_non_finite_grads
    assert torch.equal(w.detach(), before)  # held back before STEP
    # No rules ran on the bad step (the first run's were after each of its steps: the first 50, step
    # 50's code-path facts, its last step): BACKWARD's own check stopped it.
    assert calls == list(range(1, full + 3))
    assert [f.code for f in r.findings if f.severity == "error"] == ["non-finite-grad"]
    assert r.findings[0].params == ("0.weight",)


def test_diagnose_every_one_runs_the_rules_on_every_dense_step():
    r, calls = _counting_runner(40, measure_every=1, diagnose_every=1)
    r.run(steps=Tracker.FULL_DIAGNOSIS + 12)
    assert calls == list(range(1, Tracker.FULL_DIAGNOSIS + 13))
    r2, calls2 = _counting_runner(40, measure_every=1, diagnose_every=4)
    r2.run(steps=Tracker.FULL_DIAGNOSIS + 12)
    full = Tracker.FULL_DIAGNOSIS
    assert calls2 == [*range(1, full + 2), full + 4, full + 8, full + 12]
