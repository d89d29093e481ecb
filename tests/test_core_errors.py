"""Errors: constructor validation, user-code failures that never escape, retry, rollback, break before damage."""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    make_batches,
    make_mlp,
    make_runner,
    one_thread,  # noqa: F401  (fixture)
    snapshot,
    weights_equal,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlwidgets as tlw
from tlwidgets import EpochRecord, Event, Stage, StageRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


def _errors(runner) -> list[StageRecord]:
    seen: list[StageRecord] = []
    runner.events.on(Event.ERROR, seen.append)
    return seen


# ---------------------------------------------------------------------- constructor
def test_model_must_be_a_module():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        tlw.Runner(lambda x: x, nn.CrossEntropyLoss(), opt, make_batches())


def test_optimizer_holding_none_of_the_models_params():
    model, other = make_mlp(), make_mlp(seed=1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        tlw.Runner(model, nn.CrossEntropyLoss(), opt, make_batches())


def test_optimizer_must_be_an_optimizer_and_loss_callable():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        tlw.Runner(model, nn.CrossEntropyLoss(), object(), make_batches())
    with pytest.raises(TypeError, match="loss_fn"):
        tlw.Runner(model, 3, opt, make_batches())


@pytest.mark.parametrize(
    "data",
    [[], DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)],
    ids=["empty-list", "empty-dataloader"],
)
def test_empty_train_data(data):
    model = make_mlp()
    with pytest.raises(ValueError, match="empty"):
        tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data)


def test_empty_val_data():
    model = make_mlp()
    with pytest.raises(ValueError, match="val_data"):
        tlw.Runner(
            model,
            nn.CrossEntropyLoss(),
            torch.optim.SGD(model.parameters(), lr=0.1),
            make_batches(),
            val_data=[],
        )


def test_non_iterable_data():
    model = make_mlp()
    with pytest.raises(TypeError, match="iterable"):
        tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), 5)


def test_bad_scheduler_interval_and_foreign_scheduler():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scheduler_interval"):
        tlw.Runner(model, nn.CrossEntropyLoss(), opt, make_batches(), scheduler_interval="batch")
    other = torch.optim.SGD(make_mlp(seed=2).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(other, 1)
    with pytest.raises(ValueError, match="different optimizer"):
        tlw.Runner(model, nn.CrossEntropyLoss(), opt, make_batches(), scheduler=sched)


def test_empty_generator_fails_at_fetch_not_in_the_constructor():
    runner = make_runner(make_mlp(), (b for b in []))
    errors = _errors(runner)
    rec = runner.step_stage()
    assert isinstance(rec, StageRecord) and not rec.ok and rec.stage is Stage.FETCH
    assert "no batches" in rec.error.message
    assert errors == [rec]


# ---------------------------------------------------------------------- failures in user code
class Switchable(nn.Module):
    """An MLP whose forward slices the features wrongly while ``bad`` is set (a shape mismatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.bad = True

    def forward(self, x):
        return self.net(x[:, :7] if self.bad else x)


def test_forward_shape_mismatch_is_recorded_explained_and_retryable():
    model = Switchable()
    runner = make_runner(model)
    errors = _errors(runner)
    for _ in range(3):
        runner.step_stage()
    before = snapshot(model)
    rec = runner.step_stage()
    assert rec.stage is Stage.FORWARD and not rec.ok
    assert rec.error.type == "RuntimeError" and "mat1 and mat2" in rec.error.message
    assert "Traceback" in rec.error.traceback
    assert rec.status == "error"
    assert _codes(rec.findings) == ["shape-mismatch"]
    assert rec.findings[0].cause and rec.findings[0].fix
    assert "shape-mismatch" in _codes(runner.findings)
    assert errors == [rec]
    assert runner.stage is Stage.FORWARD and runner.global_step == 0
    assert runner.records[Stage.FORWARD] is rec and runner.last_record is rec
    # Retrying without a fix fails the same way and stays put.
    again = runner.step_stage()
    assert not again.ok and runner.stage is Stage.FORWARD and len(errors) == 2
    # Fix the model and retry: the stage and the step complete, on the batch already fetched.
    model.bad = False
    rec = runner.step_stage()
    assert rec.ok and rec.stage is Stage.FORWARD and runner.stage is Stage.LOSS
    x, y = make_batches()[0]
    with torch.no_grad():
        expected = float(nn.CrossEntropyLoss()(model(x), y))
    loss = runner.step_stage()
    assert loss.data["loss"] == expected
    assert runner.step().stage is Stage.STEP and runner.global_step == 1
    assert not weights_equal(before, snapshot(model))


def test_run_and_step_return_the_failure_instead_of_raising():
    model = Switchable()
    runner = make_runner(model)
    result = runner.run(steps=5)
    assert result.stopped_by == "error" and result.steps == 0
    assert result.record.stage is Stage.FORWARD and not result.record.ok
    assert result.finding is not None and result.finding.code == "shape-mismatch"
    assert not runner.running
    rec = runner.step()
    assert rec.stage is Stage.FORWARD and not rec.ok
    model.bad = False
    assert runner.run(steps=2).stopped_by == "steps" and runner.global_step == 2


def test_loss_error_is_fixed_by_replacing_loss_fn():
    runner = make_runner(loss_fn=nn.MSELoss())  # class targets into MSE: the shapes do not match
    errors = _errors(runner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's broadcasting warning
        result = runner.run(steps=1)
    assert result.stopped_by == "error" and runner.stage is Stage.LOSS
    assert result.record.stage is Stage.LOSS and not result.record.ok
    assert "shape-mismatch" in _codes(result.record.findings)
    assert len(errors) == 1
    runner.loss_fn = nn.CrossEntropyLoss()
    rec = runner.step_stage()
    assert rec.ok and rec.stage is Stage.LOSS and math.isfinite(rec.data["loss"])
    assert runner.run(steps=1).stopped_by == "steps" and runner.global_step == 1


def test_loss_that_is_not_a_scalar_is_a_stage_failure():
    runner = make_runner(loss_fn=nn.CrossEntropyLoss(reduction="none"))
    result = runner.run(steps=1)
    assert result.stopped_by == "error" and runner.stage is Stage.LOSS
    assert "scalar" in result.record.error.message
    runner.loss_fn = nn.CrossEntropyLoss()
    assert runner.run(steps=1).stopped_by == "steps"


def test_bad_batch_layout_is_fixed_by_replacing_unpack():
    batches = [(x, y, "meta") for x, y in make_batches(2)]
    runner = make_runner(make_mlp(), batches)
    errors = _errors(runner)
    rec = runner.step_stage()
    assert not rec.ok and rec.stage is Stage.FETCH and runner.stage is Stage.FETCH
    assert len(errors) == 1 and rec.findings
    runner.unpack = lambda b: (b[0], b[1])
    rec = runner.step_stage()
    assert rec.ok and runner.batch_index == 1  # the same batch, not the next one
    assert rec.data["tensors"]["inputs"]["shape"] == (8, 8)
    assert runner.run().stopped_by == "epochs" and runner.global_step == 2


class FlakyData:
    """Re-iterable batches whose iterator raises once at batch ``fail_at`` while ``broken``."""

    def __init__(self, batches, fail_at: int) -> None:
        self.batches, self.fail_at, self.broken = batches, fail_at, True

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_at and self.broken:
                self.broken = False
                raise OSError("disk read failed")
            yield b


def test_data_pipeline_error_is_recorded_and_the_epoch_restarts_on_retry():
    data = FlakyData(make_batches(3), fail_at=1)
    runner = make_runner(make_mlp(), data)
    errors = _errors(runner)
    result = runner.run()
    assert result.stopped_by == "error" and result.steps == 1
    assert result.record.stage is Stage.FETCH and result.record.error.type == "OSError"
    assert len(errors) == 1 and runner.stage is Stage.FETCH
    # The generator that raised is finished; the retry makes the epoch's iterator again, skips the
    # batch already trained on and fetches the one that failed: the epoch is not cut short.
    rest = runner.run()
    assert rest.stopped_by == "epochs" and rest.steps == 2
    assert runner.epoch == 1 and runner.history.epochs[-1].batches == 3 and runner.history.epochs[-1].ok


class FailingSGD(torch.optim.SGD):
    """SGD that changes the weights and then raises while ``fail`` is set."""

    fail = False

    def step(self, closure=None):
        out = super().step(closure)
        if self.fail:
            raise RuntimeError("optimizer exploded after writing the weights")
        return out


def _momentum(opt) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"]]


def _reference_step(model_state, opt_state, batch):
    """One plain step from the given state, for the expected weights after a successful retry."""
    model = make_mlp()
    model.load_state_dict(model_state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(opt_state)
    x, y = batch
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    return snapshot(model)


def test_failing_optimizer_step_in_step_stage_leaves_weights_and_state_unchanged():
    model = make_mlp()
    opt = FailingSGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = make_runner(model, optimizer=opt)
    runner.step()  # momentum buffers exist now
    for _ in range(6):
        runner.step_stage()
    assert runner.stage is Stage.STEP
    before, mom_before = snapshot(model), _momentum(opt)
    opt_state = copy.deepcopy(opt.state_dict())
    opt.fail = True
    errors = _errors(runner)
    rec = runner.step_stage()
    assert not rec.ok and rec.data["rolled_back"] is True
    assert "optimizer exploded" in rec.error.message and len(errors) == 1
    assert weights_equal(before, snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(mom_before, _momentum(opt)))
    assert runner.stage is Stage.STEP and runner.global_step == 1 and len(runner.history) == 1
    # Retry once fixed: exactly one step is applied, as a plain loop would apply it.
    opt.fail = False
    rec = runner.step_stage()
    assert rec.ok and runner.global_step == 2
    expected = _reference_step(before, opt_state, make_batches()[1])
    assert weights_equal(expected, snapshot(model))


def test_failing_optimizer_step_in_run_with_safe_step_rolls_back():
    model = make_mlp()
    opt = FailingSGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = make_runner(model, optimizer=opt, safe_step=True)
    runner.run(steps=1)
    before, mom_before = snapshot(model), _momentum(opt)
    opt.fail = True
    result = runner.run(steps=1)
    assert result.stopped_by == "error" and result.record.stage is Stage.STEP
    assert result.record.data["rolled_back"] is True
    assert weights_equal(before, snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(mom_before, _momentum(opt)))


# ---------------------------------------------------------------------- non-finite values
class NaNGrad(nn.Module):
    """Identity forward; NaN gradient backward (the loss stays finite)."""

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(lambda g: g * float("nan"))
        return x


def test_non_finite_grads_stop_run_after_backward_before_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), NaNGrad(), nn.ReLU(), nn.Linear(16, 3))
    runner = make_runner(model)
    before = snapshot(model)
    result = runner.run(steps=3)
    assert result.stopped_by in ("finding", "non-finite-grad")
    assert result.record.stage is Stage.BACKWARD and result.record.ok
    assert result.record.data["non_finite_grad"] == ["0.weight", "0.bias"]
    assert math.isfinite(runner.records[Stage.LOSS].data["loss"])
    assert runner.stage is Stage.STEP and runner.global_step == 0
    assert weights_equal(before, snapshot(model))
    found = [f for f in runner.findings if f.code == "non-finite-grad"]
    assert len(found) == 1 and found[0].severity == "error" and found[0].params == ("0.weight", "0.bias")
    assert result.finding is found[0]


def test_step_also_holds_back_non_finite_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), NaNGrad(), nn.ReLU(), nn.Linear(16, 3))
    runner = make_runner(model)
    before = snapshot(model)
    rec = runner.step()
    assert rec.stage is Stage.BACKWARD and runner.stage is Stage.STEP
    assert weights_equal(before, snapshot(model))


class LogOfShifted(nn.Module):
    """``log(x - shift)``: NaN for inputs below the shift (a log of a negative number) while ``on``."""

    def __init__(self, shift: float = 100.0) -> None:
        super().__init__()
        self.shift, self.on = shift, True

    def forward(self, x):
        return torch.log(x - self.shift) if self.on else x


def _nan_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), log=LogOfShifted(), fc2=nn.Linear(16, 3))
    )


def test_nan_loss_names_the_module_where_nan_starts_and_weights_stay():
    model = _nan_model()
    runner = make_runner(model)
    before = snapshot(model)
    result = runner.run(steps=3)
    assert result.stopped_by in ("finding", "non-finite-grad")
    assert runner.stage in (Stage.BACKWARD, Stage.STEP) and runner.global_step == 0
    assert weights_equal(before, snapshot(model))
    nf = [f for f in runner.findings if f.code == "non-finite-loss"]
    assert len(nf) == 1 and nf[0].severity == "error"
    assert nf[0].params == ("log",) and "log" in nf[0].message
    assert runner.records[Stage.FORWARD].data["non_finite_origin"] == "log"


def test_nan_loss_at_a_step_without_activation_statistics_is_still_located():
    model = _nan_model()
    model.log.on = False
    runner = make_runner(model, make_batches(8), activation_every=0)
    assert runner.run(steps=5).stopped_by == "steps"
    assert runner.records[Stage.FORWARD].data["activations"] == {}
    model.log.on = True
    rng = torch.get_rng_state()
    before = snapshot(model)
    result = runner.run(steps=3)
    assert result.stopped_by in ("finding", "non-finite-grad") and runner.global_step == 5
    assert weights_equal(before, snapshot(model))
    nf = [f for f in runner.findings if f.code == "non-finite-loss"]
    assert nf and nf[0].params == ("log",)
    # Locating the origin re-runs the forward: it must not disturb the RNG or the buffers.
    assert torch.equal(rng, torch.get_rng_state())


def test_nan_from_the_loss_function_itself():
    runner = make_runner(loss_fn=lambda out, y: F.cross_entropy(out, y) * float("nan"))
    before = snapshot(runner.model)
    result = runner.run(steps=2)
    assert result.stopped_by in ("finding", "non-finite-grad") and runner.global_step == 0
    assert weights_equal(before, snapshot(runner.model))
    nf = [f for f in runner.findings if f.code == "non-finite-loss"]
    assert nf and "loss function" in nf[0].message


def test_non_finite_input_stops_run_at_fetch():
    batches = make_batches(2)
    batches[0][0][0, 3] = float("nan")
    runner = make_runner(make_mlp(), batches)
    before = snapshot(runner.model)
    result = runner.run(steps=2)
    assert result.stopped_by == "finding" and result.finding.code == "non-finite-input"
    assert result.record.stage is Stage.FETCH and result.record.data["non_finite"] == 1
    assert runner.stage is Stage.ZERO_GRAD and runner.global_step == 0
    assert weights_equal(before, snapshot(runner.model))


def test_validation_error_is_recorded_on_the_epoch_record():
    bad_val = [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))]  # wrong feature count
    runner = make_runner(make_mlp(), make_batches(2), val_data=bad_val)
    result = runner.run()
    assert isinstance(result.record, EpochRecord)
    assert result.stopped_by in ("error", "epochs")
    assert not result.record.ok and result.record.error.type == "RuntimeError"
    assert runner.epoch == 1 and runner.model.training
    assert "shape-mismatch" in _codes(runner.findings)


def test_api_misuse_raises():
    runner = make_runner()
    with pytest.raises(ValueError, match="no checkpoint"):
        runner.rewind()
    with pytest.raises(TypeError):
        runner.rewind("step 3")
    runner.step_stage()
    with pytest.raises(RuntimeError, match="step boundary"):
        runner.checkpoint()


class InplaceSigmoid(nn.Module):
    """``sigmoid(x) * 2``; done in place (breaking backward) while ``inplace`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.inplace = True

    def forward(self, x):
        s = torch.sigmoid(x)
        return s.mul_(2) if self.inplace else s * 2


def _inplace_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), InplaceSigmoid(), nn.Dropout(0.3), nn.Linear(16, 3))


def test_backward_failure_is_explained_and_retryable():
    model = _inplace_model()
    runner = make_runner(model)
    result = runner.run(steps=1)
    assert result.stopped_by == "error" and runner.stage is Stage.BACKWARD
    assert result.record.stage is Stage.BACKWARD and "inplace" in result.record.error.message
    assert result.finding.code == "inplace-modification"
    model[1].inplace = False
    assert runner.run(steps=1).stopped_by == "steps" and runner.global_step == 1


def test_backward_retry_equals_a_plain_step_bit_for_bit():
    model = _inplace_model()
    runner = make_runner(model)
    torch.manual_seed(7)
    runner.run(steps=1)  # fails at BACKWARD (in-place modification)
    loss_seen = runner.records[Stage.LOSS].data["loss"]
    model[1].inplace = False
    runner.run(steps=1)

    # The same step in a plain loop with the fixed model: same loss, same weights, same RNG.
    plain = _inplace_model()
    plain[1].inplace = False
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    x, y = make_batches()[0]
    torch.manual_seed(7)
    opt.zero_grad()
    loss = nn.CrossEntropyLoss()(plain(x), y)
    loss.backward()
    opt.step()
    assert loss.item() == loss_seen
    assert torch.equal(torch.get_rng_state(), _rng_after_one_forward())
    assert weights_equal(snapshot(plain), snapshot(model))


def _rng_after_one_forward() -> torch.Tensor:
    torch.manual_seed(7)
    torch.nn.functional.dropout(torch.ones(8, 16), 0.3, training=True)  # what one forward consumes
    return torch.get_rng_state()


def test_reduce_on_plateau_per_step_is_rejected_or_works():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    try:
        runner = make_runner(model, optimizer=opt, scheduler=sched, scheduler_interval="step")
    except ValueError:
        return  # rejected up front with a clear message: fine
    before = snapshot(model)
    result = runner.run(steps=3)
    if result.stopped_by == "error":  # a failed STEP must at least leave the weights as they were
        assert weights_equal(before, snapshot(model))
        runner.run(steps=1)
        assert weights_equal(before, snapshot(model))
    else:
        assert result.stopped_by == "steps" and runner.global_step == 3


def test_non_finite_grad_outside_the_sampled_subset_is_still_caught():
    # Default grad_budget=None: the grad-norm pass is exact every step, so a single NaN element
    # that the sampled subset never reads still stops the run before STEP. (With an explicit
    # grad_budget the check between exact passes is sampled, as documented.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))  # 4096 weights > sample_size
    runner = make_runner(model, make_batches(8, in_features=64))
    runner.run(steps=2)
    sampler = runner.tracker.stats.sampler
    _blocks, length, period, offset = sampler.layouts[0]
    assert length < period
    outside = offset + length  # the element after the first block: the subset never reads it
    model[0].weight.register_hook(
        lambda g: g.reshape(-1).index_fill(0, torch.tensor([outside]), float("nan")).view_as(g)
    )
    before = snapshot(model)
    result = runner.run(steps=1)
    assert result.stopped_by in ("finding", "non-finite-grad")
    assert weights_equal(before, snapshot(model))
    assert not torch.isnan(model[0].weight).any()
    # Running again does not apply the held-back gradients; skip_batch() discards them.
    again = runner.run(steps=1)
    assert again.stopped_by == "non-finite-grad" and weights_equal(before, snapshot(model))
    runner.skip_batch()
    assert runner.stage.value == "fetch"
