"""The one recording path: typed facts, the schedule decided once, masks, tracking failures."""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import torch
from torch import nn

import tlwidgets as tlw
from tlwidgets.core import recording
from tlwidgets.core.facts import BackwardFacts, FetchFacts, ForwardFacts, LossFacts, StepFacts, facts_for
from tlwidgets.core.records import StageRecord
from tlwidgets.core.stages import Stage


def _data(n_batches=6, batch=16, seed=0, features=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, features, generator=g)
    y = torch.randint(0, classes, (n_batches * batch,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def _mlp(seed=0, features=8, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _codes(session):
    return [f.code for f in session.findings]


# ------------------------------------------------------------------ typed facts
def test_each_stage_records_its_own_facts_class_and_attributes_match_keys():
    model = _mlp()
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), _data())
    kinds = {}
    for _ in range(7):
        rec = runner.step_stage()
        kinds[rec.stage] = type(rec.data)
        for key, value in rec.data.items():  # the mapping view and the attributes agree
            assert getattr(rec.data, key) is value
    assert kinds[Stage.FETCH] is FetchFacts and kinds[Stage.LOSS] is LossFacts
    assert kinds[Stage.FORWARD] is ForwardFacts and kinds[Stage.BACKWARD] is BackwardFacts
    assert kinds[Stage.STEP] is StepFacts
    loss = runner.records[Stage.LOSS]
    assert loss["loss"] == loss.data.loss and math.isfinite(loss.data.loss)
    assert loss.data.reached == [n for n, _ in model.named_parameters()]


def test_facts_reject_unknown_names_and_read_missing_ones_as_none():
    facts = facts_for(Stage.LOSS)
    facts.update(loss=1.5, finite=True)
    assert dict(facts) == {"measured": True, "loss": 1.5, "finite": True}
    assert facts.get("reached") is None and facts["reached"] is None and "reached" not in facts
    with pytest.raises(KeyError, match="declare it"):
        facts["lose"] = 2.0
    with pytest.raises(KeyError, match="no fact 'lose'"):
        facts["lose"]
    rec = StageRecord(Stage.STEP, 0, 0, 0, data={"lr": [0.1]})  # a dict still builds a record
    assert isinstance(rec.data, StepFacts) and rec.data.lr == [0.1]


def test_a_rule_needing_a_fact_its_stage_does_not_record_is_refused():
    from tlwidgets.diagnostics.rules.base import Rule

    with pytest.raises(ValueError, match="lack them"):
        Rule("typo", ("lr-too-high",), "stage", fn=lambda ctx: [], stages=(Stage.LOSS,), needs=("grad_norm",))


# ------------------------------------------------------------------ schedule decided once
def test_code_path_facts_follow_one_schedule_in_the_runner_and_in_watch():
    steps = 52
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), opt, _data(steps), measure_every=1)
    seen_runner = []
    runner.events.on(
        tlw.Event.STAGE,
        lambda rec: (
            seen_runner.append(rec.step) if rec.stage is Stage.LOSS and rec.data.reached is not None else None
        ),
    )
    runner.run(steps=steps)

    model2 = _mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    seen_watch = []
    with tlw.watch(model2, opt2, loss_fn=crit, measure_every=1) as w:
        w.events.on(
            tlw.Event.STAGE,
            lambda rec: (
                seen_watch.append(rec.step)
                if rec.stage is Stage.LOSS and rec.data.reached is not None
                else None
            ),
        )
        for x, y in _data(steps):
            opt2.zero_grad()
            crit(model2(x), y).backward()
            opt2.step()
    expected = [
        s for s in range(steps) if s < recording.OCCASIONAL_FIRST or s % recording.OCCASIONAL_EVERY == 0
    ]
    assert seen_runner == expected
    assert seen_watch == expected


# ------------------------------------------------------------------ -inf masks
class _MaskedAttention(nn.Module):
    """Self-attention over a sequence with an additive causal mask (-inf above the diagonal)."""

    def __init__(self, dim=8, classes=3, broken=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)
        self.broken = broken

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        # The broken variant multiplies the mask in (0 * -inf = NaN) instead of adding it.
        scores = scores * mask if self.broken else scores + mask
        return self.head((scores.softmax(-1) @ v).mean(1))


def _masked_batches(n=8, seq=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = nn.Transformer.generate_square_subsequent_mask(seq)
    assert torch.isinf(mask).any()
    return [
        ((torch.randn(4, seq, dim, generator=g), mask), torch.randint(0, 3, (4,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_an_attention_mask_with_minus_inf_that_the_model_consumes_is_not_an_error(seed):
    torch.manual_seed(seed)
    model = _MaskedAttention()
    runner = tlw.Runner(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        _masked_batches(seed=seed),
    )
    result = runner.run(steps=8)
    assert result.steps == 8 and result.stopped_by == "steps"
    assert "non-finite-input" not in _codes(runner)
    assert not [f for f in runner.findings if f.severity == "error"]
    fetch = runner.records[Stage.FETCH]
    assert fetch.data.non_finite is None or fetch.data.non_finite >= 0


def test_a_mask_the_model_misuses_is_named_with_the_nan_loss():
    torch.manual_seed(0)
    model = _MaskedAttention(broken=True)
    runner = tlw.Runner(
        model, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-3), _masked_batches()
    )
    result = runner.run(steps=8)
    assert result.stopped_by == "finding" and runner.global_step == 0
    codes = _codes(runner)
    assert "non-finite-loss" in codes and "non-finite-input" in codes
    f = next(f for f in runner.findings if f.code == "non-finite-input")
    assert f.params == ("inputs[1]",) and f.evidence["masks"] == ["inputs[1]"]


def test_nan_in_a_batch_is_still_an_error_at_fetch():
    data = _data(4)
    data[0][0][0, 0] = float("nan")
    model = _mlp()
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data)
    result = runner.run(steps=4)
    assert result.stopped_by == "finding" and runner.global_step == 0
    assert _codes(runner)[0] == "non-finite-input"


# ------------------------------------------------------------------ tracking failures
def test_a_failure_in_our_own_statistics_is_recorded_not_the_users_stage_error(monkeypatch):
    def broken_describe(*args, **kwargs):
        raise RuntimeError("describe exploded")

    monkeypatch.setattr(recording, "describe", broken_describe)
    model = _mlp()
    reference = _mlp()
    data = _data(6)
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), data)
    result = runner.run(steps=6)
    assert result.steps == 6 and result.stopped_by == "steps"
    assert "stage-error" not in _codes(runner)
    assert any("describe exploded" in e for e in runner.diagnostic_errors)
    assert runner.records[Stage.FETCH].data.tracking_error.endswith("describe exploded")
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in data:  # training itself was untouched
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


class _GCN(nn.Module):
    """Two graph convolutions over a sparse normalized adjacency matrix (as the PyTorch GCN example)."""

    def __init__(self, features=6, classes=3):
        super().__init__()
        self.l1 = nn.Linear(features, 16)
        self.l2 = nn.Linear(16, classes)

    def forward(self, x, adj):
        h = torch.relu(torch.sparse.mm(adj, self.l1(x)))
        return torch.sparse.mm(adj, self.l2(h))


def _graph(nodes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nodes, (2, 60), generator=g)
    idx = torch.cat([idx, torch.arange(nodes).repeat(2, 1)], dim=1)
    adj = torch.sparse_coo_tensor(idx, torch.full((idx.shape[1],), 0.2), (nodes, nodes)).coalesce()
    return torch.randn(nodes, 6, generator=g), adj, torch.randint(0, 3, (nodes,), generator=g)


def test_a_sparse_adjacency_matrix_in_the_batch_trains_without_a_stage_error():
    x, adj, y = _graph()
    torch.manual_seed(0)
    model = _GCN()
    runner = tlw.Runner(
        model, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-2), [((x, adj), y)] * 5
    )
    result = runner.run(steps=5)
    assert result.steps == 5 and "stage-error" not in _codes(runner)
    assert runner.records[Stage.FORWARD].data.output_shape == (20, 3)


# ------------------------------------------------------------------ outputs that are not tensors
@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class _DataclassModel(nn.Module):
    def __init__(self, namespace=False):
        super().__init__()
        self.body = _mlp()
        self.namespace = namespace

    def forward(self, x):
        logits = self.body(x)
        if self.namespace:
            return types.SimpleNamespace(logits=logits)
        return _Output(logits=logits, hidden=None)


@pytest.mark.parametrize("namespace", [False, True])
def test_models_returning_a_dataclass_or_namespace_get_output_statistics(namespace):
    model = _DataclassModel(namespace)
    runner = tlw.Runner(
        model,
        lambda out, y: nn.functional.cross_entropy(out.logits, y),
        torch.optim.SGD(model.parameters(), lr=0.1),
        _data(3),
    )
    for _ in range(5):
        rec = runner.step_stage()
    assert rec.stage is Stage.LOSS
    fwd = runner.records[Stage.FORWARD].data
    with torch.no_grad():
        logits = model(runner.records[Stage.FETCH] and _data(3)[0][0]).logits
    assert fwd.output_shape == (16, 3)
    assert fwd.output_min == pytest.approx(float(logits.min()), rel=1e-6)
    assert fwd.output_max == pytest.approx(float(logits.max()), rel=1e-6)
    assert rec.data.expected_initial_loss == pytest.approx(math.log(3))
    assert np.isfinite(rec.data.loss)


def test_a_failing_activation_hook_does_not_break_the_forward(monkeypatch):
    from tlwidgets.core import activations

    def broken_summarize(t):
        raise RuntimeError("summarize exploded")

    monkeypatch.setattr(activations, "summarize", broken_summarize)
    model = _mlp()
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), _data(3))
    result = runner.run(steps=3)
    assert result.steps == 3 and "stage-error" not in _codes(runner)
    assert any("summarize exploded" in e for e in runner.diagnostic_errors)
    assert "summarize exploded" in runner.records[Stage.FORWARD].data.tracking_error
