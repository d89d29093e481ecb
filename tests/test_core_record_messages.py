"""A record or fact that is not there says why (#16: a click on "Step stage" between two notebook cells
made the next cell fail with a bare ``KeyError: 'tensors'``, the one after with ``KeyError: Stage.LOSS``)."""

from __future__ import annotations

import pytest
from helpers import one_thread  # noqa: F401

import tlwidgets as tlw
from tlwidgets import zoo
from tlwidgets.core.records import RecordMissing

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_fact_of_another_stage_names_the_record_and_the_stage_that_has_it():
    runner = zoo.get("mlp-digits").runner(0)
    runner.step_stage()
    zero_grad = runner.step_stage()  # what a cell expecting FETCH's record gets after one click
    with pytest.raises(KeyError) as info:
        zero_grad["tensors"]
    assert isinstance(info.value, RecordMissing)
    text = str(info.value)
    assert "ZERO_GRAD record (step 0, batch 1)" in text and "FETCH stage records it" in text
    assert "runner.records[tlw.Stage.FETCH]" in text
    assert (
        runner.records[tlw.Stage.FETCH]["tensors"]["inputs"]["shape"][0] == 64
    )  # where it said: a batch of 64


def test_a_stage_not_run_yet_this_step_says_where_the_runner_is():
    runner = zoo.get("mlp-digits").runner(0)
    runner.step_stage()
    runner.step_stage()
    with pytest.raises(KeyError) as info:
        runner.records[tlw.Stage.LOSS]
    text = str(info.value)
    assert "no LOSS record for this step yet" in text
    assert "(FETCH, ZERO_GRAD)" in text and "at TO_DEVICE (it runs next), 0 step(s) done" in text
    assert "runner.step()" in text
    assert runner.records.get(tlw.Stage.LOSS) is None  # get() stays quiet
    runner.step()  # as the message says
    assert runner.records[tlw.Stage.LOSS]["loss"] > 0


def test_unknown_keys_list_what_there_is():
    runner = zoo.get("mlp-digits").runner(0)
    fetch = runner.step_stage()
    with pytest.raises(KeyError, match=r"is not a stage; runner\.records is keyed by tlw\.Stage: FETCH"):
        runner.records["fetchh"]
    with pytest.raises(KeyError, match=r"has no fact 'nonsense'; facts here: .*tensors"):
        fetch["nonsense"]
    assert runner.records["fetch"] is fetch  # a stage's name works as the key


def test_records_start_over_after_a_rewind_with_the_same_message():
    runner = zoo.get("mlp-digits").runner(0)
    ck = runner.checkpoint()
    runner.step()
    runner.rewind(ck)
    with pytest.raises(RecordMissing, match=r"records hold the stages run since the step's FETCH \(none\)"):
        runner.records[tlw.Stage.STEP]


def test_a_nan_traced_to_a_module_without_parameters_names_its_class():
    """#16 point 10: the NaN finding said "head.0" for a parameterless LogFeatures module."""
    import torch
    from torch import nn

    class LogFeatures(nn.Module):
        def forward(self, x):
            return torch.log(x)  # ReLU outputs are often exactly 0 -> -inf

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(LogFeatures(), nn.Linear(8, 3)))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data)
    runner.run(steps=2)
    f = next(f for f in runner.findings if f.code == "non-finite-loss")
    assert f.params == ("2.0",)
    assert "first appears in 2.0 (LogFeatures)" in f.message
