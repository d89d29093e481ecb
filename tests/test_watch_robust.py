"""watch() never breaks the user's program.

- An internal failure in any hook is recorded (``diagnostic_errors``), the
  tracking degrades, and the loop ends with the weights an unwatched loop
  gives.
- Batches tlwidgets' statistics did not expect (a sparse adjacency matrix, a
  batch of 0 examples) are described with NaN where nothing can be computed,
  never raise inside ``loss.backward()``.
- A watched model (and its loss module) pickles, deep-copies and
  ``torch.save``\\ s as it would unwatched: the copy carries the user's own
  hooks but none of the watcher's, and the original stays watched.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from test_rules_support import classification, loader
from torch import nn

import tlwidgets as tlw
import tlwidgets.core.recording as recording_module
import tlwidgets.core.watch as watch_module
from tlwidgets import Stage
from tlwidgets.core.batches import describe

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module, batches: list, *, clip: bool
) -> None:
    torch.manual_seed(1)  # dropout masks
    for xb, yb in batches:
        opt.zero_grad()
        loss = crit(model(xb), yb)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = classification(n=192)
    return list(loader(x, y, batch_size=32))


# ------------------------------------------------------------------ internal failures are not the user's
def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected tlwidgets failure")


INJECTIONS = {
    # where the failure is injected: (object to patch, attribute)
    "forward pre-hook": lambda w: (w.tracker, "note_trainable"),
    "forward hook (activations)": lambda w: (w.tracker, "finish_activations"),
    "clip-measurement grad hook": lambda w: (w.tracker.stats.sampler, "sample"),
    "loss facts (batch description)": lambda w: (recording_module, "describe"),
    "loss graph walk": lambda w: (watch_module, "reached_params"),
    "loss facts (output probabilities)": lambda w: (recording_module, "_probability_facts"),
    "pre-step (grad norms)": lambda w: (w.tracker, "measure_grads"),
    "pre-step (snapshot)": lambda w: (w.tracker.stats, "before_step"),
    "post-step (history row)": lambda w: (w.tracker, "record_step"),
    "rules": lambda w: (w.diagnoser, "on_stage"),
}


@pytest.mark.parametrize("where", list(INJECTIONS))
def test_an_internal_failure_never_reaches_the_users_loop(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches()
    crit = nn.CrossEntropyLoss()
    reference = _model()
    _train(
        reference, torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9), crit, batches, clip=True
    )

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        target, name = INJECTIONS[where](w)
        monkeypatch.setattr(target, name, _boom)
        _train(model, opt, crit, batches, clip=True)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert w.diagnostic_errors, "the failure must be recorded"
    assert any("injected" in e for e in w.diagnostic_errors)
    assert w.closed


def test_a_failing_statistic_degrades_only_its_own_part(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    batches = _batches()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        monkeypatch.setattr(recording_module, "describe", _boom)
        _train(model, opt, crit, batches, clip=False)
    # The batch could not be described; the steps, the losses and the gradient statistics go on.
    assert w.global_step == len(batches) and len(w.history) == len(batches)
    assert np.isfinite(w.history.loss).all() and np.isfinite(w.history.grad_norm).all()
    assert Stage.BACKWARD in w.records and Stage.STEP in w.records
    assert "injected" in w.records[Stage.FETCH].data.tracking_error  # said on the record it spoiled


def test_record_loss_bookkeeping_failure_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with tlw.watch(model, opt) as w:
        monkeypatch.setattr(watch_module, "reached_params", _boom)
        for xb, yb in _batches():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            w.record_loss(loss)
            loss.backward()
            opt.step()
    assert w.global_step == 6 and any("record_loss" in e for e in w.diagnostic_errors)
    with pytest.raises(TypeError):  # misuse of the API still raises
        w.record_loss(torch.ones(3))


# ------------------------------------------------------------------ sparse inputs, empty batches
def _adjacency(n: int, *, coalesce: bool = True, seed: int = 0) -> torch.Tensor:
    """A normalized sparse adjacency with self loops (what a GCN example passes with the features)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (4 * n,), generator=gen)
    dst = torch.randint(0, n, (4 * n,), generator=gen)
    idx = torch.cat([torch.stack([src, dst]), torch.arange(n).repeat(2, 1)], 1)
    adj = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n, n), check_invariants=True)
    adj = adj.coalesce()
    deg = torch.sparse.sum(adj, 1).to_dense()
    values = adj.values() / deg[adj.indices()[0]]
    out = torch.sparse_coo_tensor(adj.indices(), values, (n, n), check_invariants=True)
    return out.coalesce() if coalesce else out


def _dense_row(t: torch.Tensor) -> list[float]:
    d = t.to_dense().double().reshape(-1)
    return [float(d.min()), float(d.max()), float(d.mean()), float(d.std())]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "coo-uncoalesced", "csr"])
@pytest.mark.parametrize("exact", [True, False])
def test_describe_a_batch_holding_a_sparse_tensor(layout: str, exact: bool) -> None:
    adj = _adjacency(50, coalesce=layout != "coo-uncoalesced")
    if layout == "csr":
        adj = adj.to_sparse_csr()
    x = torch.randn(50, 8)
    y = torch.randint(0, 3, (50,))
    info = describe({"x": x, "adj": adj}, y, exact=exact)
    t = info["tensors"]["inputs.adj"]
    assert t["shape"] == (50, 50) and t["non_finite"] == 0
    assert t["layout"] == ("sparse_csr" if layout == "csr" else "sparse_coo")
    np.testing.assert_allclose(
        [t["min"], t["max"], t["mean"], t["std"]], _dense_row(adj), rtol=1e-5, atol=1e-7
    )
    assert 0 < t["bytes"] < 50 * 50 * 4  # what the sparse tensor holds, not its dense size
    assert info["non_finite"] == 0 and info["batch_size"] == 50
    assert info["label_counts"] is not None and info["label_counts"].sum() == 50
    # The dense features still set the input scale; the adjacency is structure.
    assert info["input_std"] == pytest.approx(info["tensors"]["inputs.x"]["std"])


def test_describe_counts_non_finite_values_of_a_sparse_tensor() -> None:
    adj = _adjacency(20)
    values = adj.values().clone()
    values[3] = math.nan
    bad = torch.sparse_coo_tensor(adj.indices(), values, adj.shape, check_invariants=True).coalesce()
    for exact in (True, False):
        info = describe(bad, None, exact=exact)
        assert info["non_finite"] == 1 and info["tensors"]["inputs"]["non_finite"] == 1


@pytest.mark.parametrize("exact", [True, False])
def test_describe_a_batch_of_zero_examples(exact: bool) -> None:
    x, y = torch.randn(0, 8), torch.zeros(0, dtype=torch.long)
    info = describe(x, y, exact=exact)
    assert info["batch_size"] == 0 and info["label_counts"] is None and info["non_finite"] == 0
    for path in ("inputs", "targets"):
        t = info["tensors"][path]
        assert math.isnan(t["min"]) and math.isnan(t["max"]) and t["non_finite"] == 0
    assert math.isnan(info["tensors"]["inputs"]["std"])
    assert info["input_std"] is None and info["input_absmax"] is None


class GCN(nn.Module):
    """Two graph convolutions, ``A @ (X W)``, as the PyTorch GCN examples write them."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.l1 = nn.Linear(features, hidden)
        self.l2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.sparse.mm(adj, self.l1(x)))
        return torch.sparse.mm(adj, self.l2(h))


def test_gcn_with_a_sparse_adjacency_trains_under_watch() -> None:
    torch.manual_seed(0)
    n = 60
    x, adj, y = torch.randn(n, 8), _adjacency(n), torch.randint(0, 3, (n,))
    model = GCN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crit = nn.CrossEntropyLoss()
    losses = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(12):
            opt.zero_grad()
            loss = crit(model(x, adj), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert w.diagnostic_errors == []
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)
    fetch = w.records[Stage.FETCH].data
    assert fetch["tensors"]["inputs[1]"]["layout"] == "sparse_coo"
    assert not [f for f in w.findings if f.severity == "error"]


def test_gcn_with_a_sparse_adjacency_runs_in_a_runner() -> None:
    torch.manual_seed(0)
    n = 60
    x, adj, y = torch.randn(n, 8), _adjacency(n), torch.randint(0, 3, (n,))
    model = GCN()
    runner = tlw.Runner(
        model, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-2), [((x, adj), y)]
    )
    try:
        runner.run(steps=3)
        assert runner.global_step == 3
        assert "stage-error" not in [f.code for f in runner.findings]
        for _ in range(4):  # stepped stage by stage: exact statistics
            runner.step_stage()
        assert runner.records[Stage.FETCH].data["tensors"]["inputs[1]"]["layout"] == "sparse_coo"
    finally:
        runner.close()


def test_a_batch_of_zero_examples_inside_a_watched_loop() -> None:
    model = _model()
    model.eval()  # batch norm cannot train on 0 examples; the loop is what is tested
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss(reduction="sum")
    batches = _batches()
    batches.insert(1, (batches[0][0][:0], batches[0][1][:0]))
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in batches:
            opt.zero_grad()
            crit(model(xb), yb).backward()
            opt.step()
    assert w.global_step == len(batches) and w.diagnostic_errors == []


# ------------------------------------------------------------------ pickling, copying, saving
def user_hook(module: nn.Module, args: Any, output: Any) -> None:
    """The user's own (picklable) forward hook: it must survive in the copies."""


def _hook_entries(module: nn.Module) -> list[Any]:
    """Every hook attached to ``module``, its submodules and its parameters."""
    found: list[Any] = []
    for m in module.modules():
        for name, d in vars(m).items():
            if name.endswith("hooks") and isinstance(d, dict):
                found += list(d.values())
    for p in module.parameters():
        found += list((p._backward_hooks or {}).values())
        found += list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).values())
    return found


def _is_watch_hook(h: Any) -> bool:
    """Hooks defined in tlwidgets (functions, bound methods or callable objects)."""
    return any(str(getattr(o, "__module__", None) or "").startswith("tlwidgets") for o in (h, type(h)))


def _roundtrips() -> dict[str, Any]:
    def saved(obj: Any) -> Any:
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {
        "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
        "deepcopy": copy.deepcopy,
        "torch.save": saved,
    }


@pytest.mark.parametrize("how", list(_roundtrips()))
def test_a_watched_model_pickles_copies_and_saves_as_if_unwatched(how: str) -> None:
    roundtrip = _roundtrips()[how]
    model = _model()
    model[0].register_forward_hook(user_hook)
    unwatched_entries = len(_hook_entries(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    batches = _batches()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        _train(model, opt, crit, batches[:2], clip=True)
        assert any(_is_watch_hook(h) for h in _hook_entries(model))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unwatched model pickles without a warning: so must this
            clone = roundtrip(model)
            saved = roundtrip({"model": model, "loss": crit, "optimizer": opt.state_dict()})
        for copied in (clone, saved["model"]):
            assert copied is not model
            for (k, a), (k2, b) in zip(model.state_dict().items(), copied.state_dict().items()):
                assert k == k2
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            entries = _hook_entries(copied)
            assert not any(_is_watch_hook(h) for h in entries)
            assert len(entries) == unwatched_entries and copied[0]._forward_hooks  # the user's hook stays
            assert "__reduce_ex__" not in vars(copied)
        assert not any(_is_watch_hook(h) for h in _hook_entries(saved["loss"]))
        # The copy trains on its own, unwatched; the original keeps being watched.
        step = w.global_step
        xb, yb = batches[2]
        crit(clone(xb), yb).backward()
        assert w.global_step == step
        _train(model, opt, crit, batches[2:4], clip=True)
        assert w.global_step == 4 and len(w.history) == 4
    assert w.diagnostic_errors == []
    # After the block the model is back to what it was: nothing of the watcher left on it.
    assert "__reduce_ex__" not in vars(model) and "__reduce_ex__" not in vars(crit)
    assert len(_hook_entries(model)) == unwatched_entries
    pickle.loads(pickle.dumps(model))


def test_an_averaged_copy_of_a_watched_model_is_not_watched() -> None:
    """``AveragedModel`` (EMA/SWA) deep-copies the model it averages."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    batches = _batches()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        ema = torch.optim.swa_utils.AveragedModel(model)
        assert not any(_is_watch_hook(h) for h in _hook_entries(ema))
        for xb, yb in batches:
            opt.zero_grad()
            crit(model(xb), yb).backward()
            opt.step()
            ema.update_parameters(model)
            ema(xb)  # its forward is not the watched model's
    assert w.global_step == len(batches) and w.loop.backwards == len(batches)


def test_a_model_watched_twice_pickles_and_is_restored_when_both_close() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    w1 = tlw.watch(model, opt, loss_fn=crit)
    w2 = tlw.watch(model, opt, loss_fn=crit)
    _train(model, opt, crit, _batches()[:2], clip=False)
    assert not any(_is_watch_hook(h) for h in _hook_entries(pickle.loads(pickle.dumps(model))))
    w1.close()
    assert not any(_is_watch_hook(h) for h in _hook_entries(copy.deepcopy(model)))
    assert "__reduce_ex__" in vars(model)  # w2 still watches
    w2.close()
    assert "__reduce_ex__" not in vars(model) and _hook_entries(model) == []
