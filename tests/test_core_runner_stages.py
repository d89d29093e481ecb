"""Runner stages: one full step with step_stage() checked value by value against naive torch."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from helpers import (
    make_batches,
    make_loader,
    make_mlp,
    make_runner,
    naive_norms,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
)
from torch import nn

import tlwidgets as tlw
from tlwidgets import EpochRecord, Event, Stage, StageRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive_eval(model: nn.Module, loss_fn, batches) -> float:
    """Per-example mean loss under eval() + no_grad(), restoring the mode."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(loss_fn(model(x), y)) * len(x)
            n += len(x)
    model.train(was)
    return total / n


def _no_grad_float(fn) -> float:
    with torch.no_grad():
        return float(fn())


def _act_stats(t: torch.Tensor) -> dict[str, float]:
    alive = (t > 0).any(0)
    return {
        "mean": float(t.mean()),
        "std": float(t.std()),
        "frac_zero": float((t == 0).float().mean()),
        "dead_frac": float(1 - alive.float().mean()),
    }


# ---------------------------------------------------------------------- one full step
def test_seven_step_stage_calls_make_one_step_with_correct_values():
    batches = make_batches()
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss()
    runner = make_runner(model, batches, lr=0.1, loss_fn=loss_fn)
    x, y = batches[0]
    names = [n for n, _ in model.named_parameters()]
    assert runner.param_names == names
    recs: list[StageRecord] = []
    before_step = None
    for expected in Stage.ordered():
        assert runner.stage is expected
        if expected is Stage.STEP:
            before_step = snapshot(model)
            grads = [p.grad.detach().clone() for p in model.parameters()]
        rec = runner.step_stage()
        assert isinstance(rec, StageRecord)
        assert rec.stage is expected and rec.ok and rec.error is None and rec.exact
        assert rec.step == 0 and rec.epoch == 0
        assert runner.stage is expected.next()
        recs.append(rec)
        if expected is Stage.FORWARD:
            with torch.no_grad():
                h0 = model[0](x)
                h1 = model[1](h0)
                out = model(x)
        if expected is Stage.LOSS:
            with torch.no_grad():
                naive_loss = float(loss_fn(model(x), y))
    assert list(runner.records) == list(Stage.ordered())
    assert runner.global_step == 1 and runner.epoch == 0
    fetch, zero, to_dev, fwd, loss, back, step = recs

    # FETCH: what the batch holds.
    d = fetch.data
    assert d["structure"] == "Tensor" and d["batch_size"] == 8 and d["non_finite"] == 0
    ti, tt = d["tensors"]["inputs"], d["tensors"]["targets"]
    assert ti["shape"] == (8, 8) and ti["dtype"] == "float32" and ti["device"] == "cpu"
    assert ti["bytes"] == x.numel() * 4
    assert ti["min"] == pytest.approx(float(x.min())) and ti["max"] == pytest.approx(float(x.max()))
    assert ti["mean"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert ti["std"] == pytest.approx(float(x.std()), rel=1e-6)
    assert tt["shape"] == (8,) and tt["dtype"] == "int64" and tt["bytes"] == 64
    assert tt["min"] == float(y.min()) and tt["max"] == float(y.max())
    np.testing.assert_array_equal(d["label_counts"], torch.bincount(y).numpy())
    assert d["input_std"] == pytest.approx(float(x.std()), rel=1e-6)
    assert d["input_absmax"] == pytest.approx(float(x.abs().max()))

    # ZERO_GRAD: no grads yet at the first step.
    assert zero.data["grads_before"] == 0 and zero.data["grads_after"] == 0 and zero.data["not_cleared"] == []

    # TO_DEVICE
    assert to_dev.data["device"] == "cpu" and to_dev.data["devices"] == ["cpu"]
    assert to_dev.data["devices_before"] == ["cpu"] and to_dev.data["param_devices"] == ["cpu"]
    assert to_dev.data["bytes"] == x.numel() * x.element_size() + y.numel() * y.element_size()

    # FORWARD: output and per-module activation statistics.
    f = fwd.data
    assert f["training"] is True and f["grad_enabled"] is True and f["eval_modules"] == []
    assert f["output_shape"] == (8, 3) and f["output_dtype"] == "float32" and f["output_non_finite"] == 0
    assert f["output_min"] == pytest.approx(float(out.min()), abs=1e-6)
    assert f["output_max"] == pytest.approx(float(out.max()), abs=1e-6)
    assert f["output_mean"] == pytest.approx(float(out.mean()), abs=1e-6)
    assert f["output_std"] == pytest.approx(float(out.std()), rel=1e-5)
    assert list(f["activations"]) == ["0", "1", "2"]
    for name, t in (("0", h0), ("1", h1), ("2", out)):
        for k, v in _act_stats(t).items():
            assert f["activations"][name][k] == pytest.approx(v, abs=1e-6), (name, k)
        assert f["activations"][name]["non_finite"] == 0
    assert "non_finite_origin" not in f

    # LOSS
    g = loss.data
    assert g["loss"] == naive_loss
    assert g["finite"] is True and g["requires_grad"] is True
    assert g["loss_fn"] == "CrossEntropyLoss" and g["reduction"] == "mean"
    assert g["output_shape"] == (8, 3) and g["target_shape"] == (8,) and g["target_dtype"] == "int64"
    assert g["batch_size"] == 8
    assert g["expected_initial_loss"] == pytest.approx(math.log(3))
    assert g["output_is_probability"] is False and g["output_is_log_probability"] is False
    assert g["reached"] == names and g["unreached"] == []

    # BACKWARD: per-parameter grad norms.
    b = back.data
    np.testing.assert_allclose(b["grad_norm"], naive_norms(grads), rtol=1e-6)
    assert b["grad_exact"] is True
    assert b["total_grad_norm"] == pytest.approx(math.sqrt(sum(v**2 for v in naive_norms(grads))), rel=1e-6)
    assert b["missing_grad"] == [] and b["non_finite_grad"] == []

    # STEP: update norms are the naive difference of the weights.
    s = step.data
    after = snapshot(model)
    np.testing.assert_allclose(s["weight_norm"], naive_norms(before_step[n] for n in names), rtol=1e-6)
    np.testing.assert_allclose(
        s["update_norm"], naive_norms(after[n] - before_step[n] for n in names), rtol=1e-5
    )
    np.testing.assert_allclose(s["update_ratio"], s["update_norm"] / s["weight_norm"], rtol=1e-12)
    # Plain SGD: the update is lr * grad.
    np.testing.assert_allclose(s["update_norm"], 0.1 * np.array(naive_norms(grads)), rtol=1e-4)
    assert s["lr"] == [0.1] and s["update_exact"] is True
    assert s["changed"] == names and s["frozen_changed"] == []

    # The history row holds the same numbers.
    h = runner.history
    assert len(h) == 1 and h.step[0] == 1 and h.exact[0]
    assert h.loss[0] == pytest.approx(naive_loss, rel=1e-6)
    np.testing.assert_allclose(h.grad_norm[0], b["grad_norm"], rtol=1e-6)
    np.testing.assert_allclose(h.update_norm[0], s["update_norm"], rtol=1e-6)
    np.testing.assert_allclose(h.update_ratio[0], s["update_ratio"], rtol=1e-5)
    np.testing.assert_allclose(h.lr[0], [0.1])


def test_second_step_zero_grad_clears_the_previous_grads():
    runner = make_runner()
    runner.step()
    runner.step_stage()  # FETCH
    rec = runner.step_stage()  # ZERO_GRAD
    assert rec.stage is Stage.ZERO_GRAD
    assert rec.data["grads_before"] == 4 and rec.data["grads_after"] == 0 and rec.data["not_cleared"] == []
    assert all(p.grad is None for p in runner.model.parameters())


def test_loss_records_unreached_params_of_a_detached_branch():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 3)
            self.unused = nn.Linear(8, 3)

        def forward(self, x):
            return self.body(x)

    model = TwoHeads()
    runner = make_runner(model)
    for _ in range(5):
        rec = runner.step_stage()
    assert rec.stage is Stage.LOSS
    assert rec.data["reached"] == ["body.weight", "body.bias"]
    assert rec.data["unreached"] == ["unused.weight", "unused.bias"]
    back = runner.step_stage()
    assert back.data["missing_grad"] == ["unused.weight", "unused.bias"]
    assert np.isnan(back.data["grad_norm"][2:]).all()


def test_probability_output_is_flagged_at_loss():
    model = nn.Sequential(make_mlp(), nn.Softmax(dim=1))
    runner = make_runner(model)
    while runner.stage is not Stage.LOSS:
        runner.step_stage()
    rec = runner.step_stage()
    assert rec.data["output_is_probability"] is True
    assert rec.data["output_row_sum_dev"] < 1e-3


# ---------------------------------------------------------------------- epochs
def test_epoch_end_returns_epoch_record_with_naive_validation_loss():
    train, val = make_batches(3, seed=0), make_batches(2, batch_size=5, seed=1)
    model = make_mlp(dropout=0.5)  # evaluation must run with dropout off
    loss_fn = nn.CrossEntropyLoss()
    runner = make_runner(model, train, val_data=val, loss_fn=loss_fn)
    losses = []
    for _ in range(3):
        rec = runner.step()
        assert rec.stage is Stage.STEP
        losses.append(runner.records[Stage.LOSS].data["loss"])
    assert runner.stage is Stage.FETCH and runner.epoch == 0
    expected_val = _naive_eval(model, loss_fn, val)
    end = runner.step_stage()
    assert isinstance(end, EpochRecord) and end.ok
    assert end.epoch == 0 and end.step == 3 and end.batches == 3
    assert end.val_loss == pytest.approx(expected_val, rel=1e-6)
    assert end.train_loss == pytest.approx(np.mean(losses), rel=1e-6)
    assert end.lr == [0.1]
    assert runner.stage is Stage.FETCH and runner.epoch == 1 and runner.batch_index == 0
    assert model.training and model[2].training  # modes restored after validation
    np.testing.assert_allclose(runner.history.val_loss, [[3, expected_val]], rtol=1e-6)
    assert runner.history.epochs == [end]
    # The next call fetches the first batch of the next epoch.
    rec = runner.step_stage()
    assert isinstance(rec, StageRecord) and rec.stage is Stage.FETCH and rec.epoch == 1
    assert runner.batch_index == 1


def test_evaluate_reports_accuracy_and_requires_data():
    val = make_batches(2, seed=2)
    model = make_mlp()
    runner = make_runner(model)
    with pytest.raises(ValueError, match="validation"):
        runner.evaluate()
    out = runner.evaluate(val)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
    assert out["accuracy"] == correct / 16
    assert out["loss"] == pytest.approx(_naive_eval(model, nn.CrossEntropyLoss(), val), rel=1e-6)


@pytest.mark.parametrize("interval,expected_steps", [("step", 8), ("epoch", 2)])
def test_scheduler_interval_step_vs_epoch(interval, expected_steps):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    runner = make_runner(model, make_batches(4), optimizer=opt, scheduler=sched, scheduler_interval=interval)
    result = runner.run(epochs=2)
    assert result.stopped_by == "epochs" and result.epochs == 2 and result.steps == 8
    assert sched.last_epoch == expected_steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**expected_steps)
    # EpochRecord.lr is the LR after the epoch end (after the per-epoch scheduler step).
    lrs = [e.lr[0] for e in runner.history.epochs]
    assert lrs == pytest.approx([0.1 * 0.5 ** (expected_steps // 2), 0.1 * 0.5**expected_steps])


def test_history_lr_is_the_lr_each_epoch_scheduled_step_used():
    # Per-epoch schedule: rows of epoch e hold 0.1 * 0.5**e, and plain SGD's update is lr * grad.
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    runner = make_runner(model, make_batches(2), optimizer=opt, scheduler=sched)
    while runner.global_step < 4:
        runner.step_stage()
    h = runner.history
    np.testing.assert_allclose(h.lr[:, 0], [0.1, 0.1, 0.05, 0.05])
    np.testing.assert_allclose(h.update_norm / h.grad_norm, h.lr[:, :1] * np.ones((1, 4)), rtol=1e-4)


def test_history_lr_is_the_lr_each_step_scheduled_step_used():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    runner = make_runner(model, make_batches(4), optimizer=opt, scheduler=sched, scheduler_interval="step")
    while runner.global_step < 3:
        runner.step_stage()
    h = runner.history
    # The update each step applied is lr_used * grad: that lr is what the row must show.
    np.testing.assert_allclose(
        h.update_norm / h.grad_norm, np.array([[0.1], [0.05], [0.025]]) * np.ones((1, 4)), rtol=1e-4
    )
    np.testing.assert_allclose(h.lr[:, 0], [0.1, 0.05, 0.025])


# ---------------------------------------------------------------------- batch layouts
def test_dict_batches_are_unpacked_by_target_key():
    batches = [{"x": x, "y": y} for x, y in make_batches(2)]
    model = make_mlp()
    runner = make_runner(model, batches)
    expected = _no_grad_float(lambda: nn.CrossEntropyLoss()(model(batches[0]["x"]), batches[0]["y"]))
    runner.step()
    assert runner.records[Stage.LOSS].data["loss"] == pytest.approx(expected, rel=1e-6)
    assert runner.records[Stage.FETCH].data["tensors"]["inputs"]["shape"] == (8, 8)


def test_dict_inputs_are_passed_as_keyword_arguments():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    torch.manual_seed(0)
    model = Two()
    data = [{"left": x, "right": -x, "label": y} for x, y in make_batches(2)]
    runner = make_runner(model, data)
    b = data[0]
    expected = _no_grad_float(
        lambda: nn.CrossEntropyLoss()(model(left=b["left"], right=b["right"]), b["label"])
    )
    runner.step()
    assert runner.records[Stage.LOSS].data["loss"] == pytest.approx(expected, rel=1e-6)
    fetch = runner.records[Stage.FETCH].data
    assert fetch["structure"] == {"left": "Tensor", "right": "Tensor"}
    assert set(fetch["tensors"]) == {"inputs.left", "inputs.right", "targets"}


def test_unpack_option_for_other_layouts_and_forward_option():
    triples = [(x, torch.arange(len(x)), y) for x, y in make_batches(2)]
    model = make_mlp()
    runner = make_runner(model, triples, unpack=lambda b: (b[0], b[2]), forward=lambda m, x: m(x) * 2.0)
    x, _, y = triples[0]
    expected = _no_grad_float(lambda: nn.CrossEntropyLoss()(model(x) * 2.0, y))
    runner.step()
    assert runner.records[Stage.LOSS].data["loss"] == pytest.approx(expected, rel=1e-6)


def test_default_unpack_rejects_a_triple_with_a_clear_finding():
    triples = [(x, x, y) for x, y in make_batches(1)]
    runner = make_runner(make_mlp(), triples)
    rec = runner.step_stage()
    assert not rec.ok and rec.stage is Stage.FETCH
    assert "unpack" in rec.error.message


# ---------------------------------------------------------------------- run / step / counters
def test_run_steps_epochs_and_default_one_epoch():
    runner = make_runner(train_data=make_batches(4))
    r = runner.run(steps=3)
    assert (r.steps, r.epochs, r.stopped_by) == (3, 0, "steps")
    assert (runner.global_step, runner.epoch, runner.batch_index) == (3, 0, 3)
    assert runner.stage is Stage.FETCH
    r = runner.run(steps=3)  # crosses the epoch end
    assert (r.steps, r.epochs, r.stopped_by) == (3, 1, "steps")
    assert (runner.global_step, runner.epoch, runner.batch_index) == (6, 1, 2)
    r = runner.run()  # the rest of this epoch
    assert (r.steps, r.epochs, r.stopped_by) == (2, 1, "epochs")
    assert (runner.global_step, runner.epoch) == (8, 2)
    assert isinstance(r.record, EpochRecord)
    r = runner.run(epochs=2)
    assert (r.steps, r.epochs) == (8, 2)
    assert (runner.global_step, runner.epoch) == (16, 4)
    assert len(runner.history) == 16
    np.testing.assert_array_equal(runner.history.step, np.arange(1, 17))
    np.testing.assert_array_equal(runner.history.epoch, np.repeat(np.arange(4), 4))
    assert [e.step for e in runner.history.epochs] == [4, 8, 12, 16]
    assert runner.run(steps=0).steps == 0


def test_run_from_mid_step_finishes_the_batch_first():
    runner = make_runner()
    runner.step_stage()
    runner.step_stage()
    r = runner.run(steps=2)
    assert r.steps == 2 and runner.global_step == 2 and runner.stage is Stage.FETCH


def test_step_from_a_boundary_and_from_mid_step():
    runner = make_runner()
    rec = runner.step()
    assert rec.stage is Stage.STEP and runner.global_step == 1
    runner.step_stage()
    runner.step_stage()
    rec = runner.step()
    assert rec.stage is Stage.STEP and runner.global_step == 2


def test_run_with_bad_arguments_raises():
    runner = make_runner()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            runner.run(steps=bad)
    with pytest.raises(ValueError):
        runner.run(epochs=-2)


def test_run_statistics_in_sampled_mode_match_naive_for_small_params():
    # Every tensor of the tiny MLP is below sample_size: run()'s estimates are the exact values.
    model = make_mlp()
    runner = make_runner(model, make_batches(3))
    before = snapshot(model)
    runner.run(steps=1)
    after = snapshot(model)
    names = runner.param_names
    h = runner.history
    np.testing.assert_allclose(h.weight_norm[0], naive_norms(before[n] for n in names), rtol=1e-6)
    np.testing.assert_allclose(h.update_norm[0], naive_norms(after[n] - before[n] for n in names), rtol=1e-5)


def test_one_shot_generator_fails_cleanly_at_the_second_epoch():
    batches = make_batches(2)
    runner = make_runner(make_mlp(), (b for b in batches))
    r = runner.run()
    assert r.stopped_by == "epochs" and runner.global_step == 2
    r = runner.run()
    assert r.stopped_by == "error" and not r.record.ok
    assert "one-shot" in r.record.error.message


def test_dataloader_epoch_counts():
    runner = make_runner(make_mlp(), make_loader(n=20, batch_size=8))  # 3 batches, the last of 4
    r = runner.run(epochs=1)
    assert r.steps == 3 and runner.history.epochs[0].batches == 3
    assert runner.records[Stage.FETCH].data["batch_size"] == 4


def test_runner_is_usable_as_context_manager_and_closed_after():
    with make_runner() as runner:
        runner.step()
    with pytest.raises(RuntimeError, match="closed"):
        runner.step()
    runner.close()  # idempotent


def test_top_level_api_names():
    assert [s.value for s in tlw.Stage] == [
        "fetch",
        "zero_grad",
        "to_device",
        "forward",
        "loss",
        "backward",
        "step",
    ]
    assert make_runner().kind == "runner"


def test_zero_grad_reports_grads_it_could_not_clear():
    # Layer 0 is trainable but outside the optimizer: zero_grad() leaves its grads, which accumulate.
    model = make_mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    runner = make_runner(model, make_batches(3), optimizer=opt)
    runner.step()
    g1 = model[0].weight.grad.clone()
    runner.step_stage()
    rec = runner.step_stage()
    assert rec.stage is Stage.ZERO_GRAD
    assert rec.data["grads_before"] == 4 and rec.data["grads_after"] == 2
    assert rec.data["not_cleared"] == ["0.weight", "0.bias"]
    assert torch.equal(model[0].weight.grad, g1)


# ---------------------------------------------------------------------- pause / async
def test_pause_from_a_callback_stops_at_the_next_boundary_and_run_resumes():
    runner = make_runner(make_mlp(), make_batches(6))
    off = runner.events.on(Event.STEP, lambda s: runner.pause() if s.step == 2 else None)
    r = runner.run(steps=5)
    assert r.stopped_by == "pause" and r.steps == 2 and runner.global_step == 2
    assert not runner.running
    off()
    r = runner.run(steps=2)
    assert r.stopped_by == "steps" and runner.global_step == 4


def test_one_run_at_a_time():
    runner = make_runner(make_mlp(), make_batches(4))
    runner.events.on(Event.STEP, lambda s: runner.run(steps=1))  # re-entrant run from a callback
    r = runner.run(steps=2)
    assert r.stopped_by == "steps" and runner.global_step == 2
    errors = [e for _, e in runner.events.errors]
    assert len(errors) == 2 and all(isinstance(e, RuntimeError) and "one run" in str(e) for e in errors)


def test_run_async_equals_run():
    a = make_runner(make_mlp(), make_batches(4))
    b = make_runner(make_mlp(), make_batches(4))
    ra = a.run(steps=6)
    rb = asyncio.run(b.run_async(steps=6))
    assert (ra.steps, ra.epochs, ra.stopped_by) == (rb.steps, rb.epochs, rb.stopped_by)
    np.testing.assert_array_equal(a.history.loss, b.history.loss)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_run_async_yields_between_stages_and_pauses():
    runner = make_runner(make_mlp(), make_batches(8))
    ticks = []

    async def main():
        async def ticker():
            while True:
                ticks.append(runner.global_step)
                if len(ticks) == 10:
                    runner.pause()
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        result = await runner.run_async(steps=8)
        t.cancel()
        return result

    result = asyncio.run(main())
    assert result.stopped_by == "pause" and 0 < runner.global_step < 8
    assert len(ticks) >= 10  # the event loop ran while the runner trained


def test_run_estimates_for_tensors_larger_than_the_sample_are_close_to_naive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))  # 4096 weights > 1024
    runner = make_runner(model, make_batches(4, in_features=64))
    names = runner.param_names
    before = snapshot(model)
    x, y = make_batches(4, in_features=64)[0]
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    grads = naive_norms(p.grad for p in model.parameters())
    model.zero_grad()
    runner.run(steps=1)
    after = snapshot(model)
    h = runner.history
    assert not h.exact[0]  # sampled weight/update statistics
    assert runner.records[Stage.BACKWARD].data["grad_exact"] is True  # first grad pass is exact
    np.testing.assert_allclose(h.grad_norm[0], grads, rtol=1e-5)
    np.testing.assert_allclose(h.weight_norm[0], naive_norms(before[n] for n in names), rtol=0.1)
    np.testing.assert_allclose(h.update_norm[0], naive_norms(after[n] - before[n] for n in names), rtol=0.25)
    # Small tensors (biases, the head) are taken whole: exact even in sampled mode.
    small = [i for i, (_, p) in enumerate(model.named_parameters()) if p.numel() <= 1024]
    np.testing.assert_allclose(
        h.update_norm[0, small], np.array(naive_norms(after[n] - before[n] for n in names))[small], rtol=1e-5
    )


def test_forward_records_eval_mode_and_the_runner_never_switches_modes():
    model = make_mlp(dropout=0.5)
    model.eval()  # the user's (buggy) choice: the runner records it, it does not silently fix it
    runner = make_runner(model, make_batches(2), val_data=make_batches(1, seed=3), device="cpu")
    runner.run()
    fwd = runner.records[Stage.FORWARD].data
    assert fwd["training"] is False and fwd["eval_modules"] == ["<model>", "2"]
    assert not model.training and not model[2].training  # still eval after validation
    assert runner.records[Stage.TO_DEVICE].data["device"] == "cpu"
