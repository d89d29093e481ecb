"""ParamStats / ParamSampler: exact norms against naive torch, sampled estimates, layouts, host transfers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    naive_norms,
    one_thread,  # noqa: F401  (fixture)
)
from torch import nn

from tlwidgets.core.stats import GradNormSchedule, ParamSampler, ParamStats, to_host, update_ratio

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(seed: int = 0) -> list[nn.Parameter]:
    """Tensors of several shapes, one larger than the sample size used below."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (16,), (3, 16), (3,), (40, 50), (7, 3, 3, 3)]
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _give_grads(params, seed: int = 1, skip: tuple[int, ...] = ()) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen) * (i + 1)


def _heterogeneous(n: int, seed: int) -> torch.Tensor:
    """Values whose scale varies along the tensor, so a biased subset would show."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.linspace(0.05, 3.0, n) + 0.3


# ---------------------------------------------------------------------- exact mode
def test_exact_grad_norms_equal_naive_norms_and_nan_without_grad():
    params = _params()
    _give_grads(params, skip=(3,))
    stats = ParamStats(params, sample_size=64)
    norms, exact = stats.grad_norms(exact=True)
    assert exact is True
    expected = naive_norms(p.grad for p in params)
    assert math.isnan(norms[3])
    np.testing.assert_allclose(np.delete(norms, 3), np.delete(np.array(expected), 3), rtol=1e-6)


def test_exact_weight_and_update_norms_equal_naive_difference():
    params = _params()
    stats = ParamStats(params, sample_size=64)
    before = [p.detach().clone() for p in params]
    stats.before_step(exact=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, p in enumerate(params):
            if i != 2:  # one parameter does not move: its update must be exactly 0
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * (i + 1))
    weight, update, exact = stats.after_step()
    assert exact is True
    np.testing.assert_allclose(weight, naive_norms(before), rtol=1e-6)
    np.testing.assert_allclose(update, naive_norms(p.detach() - b for p, b in zip(params, before)), rtol=1e-5)
    assert update[2] == 0.0
    ratio = update_ratio(update, weight)
    np.testing.assert_allclose(ratio, np.array(update) / np.array(weight), rtol=1e-12)


def test_restore_puts_the_exact_snapshot_back_bit_for_bit():
    params = _params()
    before = [p.detach().clone() for p in params]
    stats = ParamStats(params)
    stats.before_step(exact=True)
    with torch.no_grad():
        for p in params:
            p.mul_(3.0)
    assert stats.restore() is True
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_restore_without_exact_snapshot_reports_false():
    params = _params()
    stats = ParamStats(params)
    stats.before_step(exact=False)
    assert stats.restore() is False


def test_weight_norms_now_equal_naive():
    params = _params()
    np.testing.assert_allclose(ParamStats(params).weight_norms(), naive_norms(params), rtol=1e-6)


# ---------------------------------------------------------------------- sampled mode
def test_sampled_equals_exact_when_every_tensor_fits_the_sample():
    params = _params()
    _give_grads(params)
    big = max(p.numel() for p in params)
    stats = ParamStats(params, sample_size=big)
    assert all(layout is None for layout in stats.sampler.layouts)
    np.testing.assert_allclose(stats.sampler.scale, 1.0)
    sampled, exact = stats.grad_norms(exact=False)
    assert exact is False
    np.testing.assert_allclose(sampled, naive_norms(p.grad for p in params), rtol=1e-6)

    before = [p.detach().clone() for p in params]
    stats.before_step(exact=False)
    with torch.no_grad():
        for p in params:
            p.sub_(0.01 * p.grad)
    weight, update, exact = stats.after_step()
    assert exact is False
    np.testing.assert_allclose(weight, naive_norms(before), rtol=1e-6)
    np.testing.assert_allclose(update, naive_norms(p.detach() - b for p, b in zip(params, before)), rtol=1e-5)


@pytest.mark.parametrize("n", [10_000, 10_057])  # a multiple of the block count, and not
def test_sampled_squared_norm_is_unbiased_over_offsets(n):
    t = _heterogeneous(n, seed=5)
    true_sq = float(t.double().pow(2).sum())
    estimates = []
    for seed in range(300):
        p = nn.Parameter(t.clone())
        p.grad = t.clone()
        stats = ParamStats([p], sample_size=100, seed=seed)
        blocks, length, period, offset = stats.sampler.layouts[0]
        assert blocks * length <= 100 and period >= length and offset + (blocks - 1) * period + length <= n
        est, _ = stats.grad_norms(exact=False)
        estimates.append(float(est[0]) ** 2)
    estimates = np.array(estimates)
    assert abs(estimates.mean() / true_sq - 1) < 0.03
    # Each single estimate is a real estimate, not a constant: they vary, and stay near the truth.
    assert estimates.std() > 0
    deviation = np.abs(np.sqrt(estimates / true_sq) - 1)
    # 32 blocks of 3 elements of a strongly heterogeneous tensor: typically within 10%, never far off.
    assert np.median(deviation) < 0.1 and np.all(deviation < 0.35)


def test_sampled_update_norm_and_ratio_estimate_the_exact_ones():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(100, 100, generator=gen)
    delta = torch.randn(100, 100, generator=gen) * 1e-3
    exact_ratio = float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(w))
    ratios, updates = [], []
    for seed in range(100):
        p = nn.Parameter(w.clone())
        stats = ParamStats([p], sample_size=256, seed=seed)
        stats.before_step(exact=False)
        with torch.no_grad():
            p.add_(delta)
        weight, update, exact = stats.after_step()
        assert exact is False
        ratios.append(update[0] / weight[0])
        updates.append(update[0] ** 2)
    assert abs(np.mean(updates) / float(delta.double().pow(2).sum()) - 1) < 0.03
    assert abs(np.mean(ratios) / exact_ratio - 1) < 0.03


def test_sampled_weight_norm_is_measured_before_the_step():
    p = nn.Parameter(torch.ones(5000))
    stats = ParamStats([p], sample_size=100)
    stats.before_step(exact=False)
    with torch.no_grad():
        p.mul_(2.0)
    weight, update, _ = stats.after_step()
    # Homogeneous tensor: the estimate is exact up to the count/numel rounding of the subset.
    assert weight[0] == pytest.approx(math.sqrt(5000), rel=1e-6)
    assert update[0] == pytest.approx(math.sqrt(5000), rel=1e-6)


def test_sampler_views_follow_replaced_storage():
    p = nn.Parameter(torch.zeros(3000))
    sampler = ParamSampler([p], sample_size=100)
    assert float(sampler.weight_views()[0].abs().sum()) == 0.0
    p.data = torch.ones(3000)  # storage replaced: cached views must not keep reading the old one
    assert float(sampler.weight_views()[0].min()) == 1.0


def test_sampler_never_touches_the_global_rng():
    state = torch.get_rng_state()
    np_state = np.random.get_state()
    ParamSampler(_params(), sample_size=10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_sample_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="sample_size"):
        ParamSampler(_params(), sample_size=0)


# ---------------------------------------------------------------------- layouts
def test_non_contiguous_param_exact_and_small_sampled_norms():
    p = nn.Parameter(torch.randn(20, 30).t())  # transposed: not contiguous
    assert not p.is_contiguous()
    p.grad = torch.randn(20, 30).t()
    stats = ParamStats([p], sample_size=1024)  # 600 elements: taken whole
    for exact in (True, False):
        norm, _ = stats.grad_norms(exact=exact)
        assert norm[0] == pytest.approx(naive_norms([p.grad])[0], rel=1e-6)
    before = p.detach().clone()
    stats.before_step(exact=False)
    with torch.no_grad():
        p.add_(0.5)
    weight, update, _ = stats.after_step()
    assert weight[0] == pytest.approx(naive_norms([before])[0], rel=1e-6)
    assert update[0] == pytest.approx(0.5 * math.sqrt(600), rel=1e-5)


def test_non_contiguous_param_larger_than_sample_is_estimated_correctly():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(200, 50).t())
    p.grad = torch.randn(200, 50).t()
    stats = ParamStats([p], sample_size=100)
    sampled, _ = stats.grad_norms(exact=False)
    exact = naive_norms([p.grad])[0]
    assert sampled[0] == pytest.approx(exact, rel=0.3)
    before = p.detach().clone()
    stats.before_step(exact=False)
    with torch.no_grad():
        p.add_(0.01)
    weight, update, _ = stats.after_step()
    assert weight[0] == pytest.approx(naive_norms([before])[0], rel=0.3)
    assert update[0] == pytest.approx(0.01 * math.sqrt(p.numel()), rel=0.3)


def test_channels_last_conv_weight():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    w = conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    w.grad = torch.randn(w.shape).to(memory_format=torch.channels_last)
    # Whole-tensor sample: sampled == exact == naive.
    whole = ParamStats([w], sample_size=w.numel())
    np.testing.assert_allclose(whole.grad_norms(exact=False)[0], naive_norms([w.grad]), rtol=1e-6)
    np.testing.assert_allclose(whole.grad_norms(exact=True)[0], naive_norms([w.grad]), rtol=1e-6)
    # A real subset: unbiased over offsets, and each estimate close.
    est = []
    for seed in range(100):
        stats = ParamStats([w], sample_size=100, seed=seed)
        assert stats.sampler.layouts[0] is not None
        est.append(stats.grad_norms(exact=False)[0][0] ** 2)
    assert abs(np.mean(est) / naive_norms([w.grad])[0] ** 2 - 1) < 0.05
    # Update norm of a channels_last tensor in sampled mode.
    stats = ParamStats([w], sample_size=w.numel())
    before = w.detach().clone()
    stats.before_step(exact=False)
    with torch.no_grad():
        w.add_(torch.full_like(w, 0.1))
    weight, update, _ = stats.after_step()
    assert weight[0] == pytest.approx(naive_norms([before])[0], rel=1e-6)
    assert update[0] == pytest.approx(0.1 * math.sqrt(w.numel()), rel=1e-5)


def test_float64_and_half_params():
    ps = [nn.Parameter(torch.randn(30, dtype=torch.float64)), nn.Parameter(torch.randn(30).half())]
    for p in ps:
        p.grad = torch.randn(30, dtype=p.dtype)
    norms, _ = ParamStats(ps).grad_norms(exact=True)
    np.testing.assert_allclose(norms, naive_norms(p.grad for p in ps), rtol=1e-3)


# ---------------------------------------------------------------------- host transfers
class _Counter:
    """Counts host transfers (``numpy()``: every array brought to the host ends in one, with a ``cpu()``
    before it only for a tensor on a device) and ``item()`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.host = 0
        self.item = 0
        orig_numpy, orig_item = torch.Tensor.numpy, torch.Tensor.item

        def numpy(t, *a, **k):
            self.host += 1
            return orig_numpy(t, *a, **k)

        def item(t):
            self.item += 1
            return orig_item(t)

        monkeypatch.setattr(torch.Tensor, "numpy", numpy)
        monkeypatch.setattr(torch.Tensor, "item", item)

    def reset(self) -> None:
        self.host = self.item = 0


def test_one_host_transfer_per_call_and_no_item(monkeypatch):
    params = _params()
    _give_grads(params)
    stats = ParamStats(params, sample_size=64)
    counter = _Counter(monkeypatch)
    for exact in (True, False):
        counter.reset()
        stats.grad_norms(exact=exact)
        assert (counter.host, counter.item) == (1, 0), f"exact={exact}"
        for snap_exact in (True, False):
            stats.before_step(exact=snap_exact)
            counter.reset()
            stats.after_step()
            assert (counter.host, counter.item) == (1, 0), f"after_step exact={snap_exact}"


def test_to_host_stacks_and_returns_float64():
    vals = [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.float64), torch.tensor(3, dtype=torch.int32)]
    out = to_host(vals)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.5, 2.0, 3.0])
    assert to_host([]).shape == (0,)


def test_update_ratio_zero_over_zero_is_zero():
    r = update_ratio(np.array([0.0, 1.0, 0.0, 2.0]), np.array([0.0, 0.0, 1.0, 4.0]))
    assert r[0] == 0.0 and math.isinf(r[1]) and r[2] == 0.0 and r[3] == 0.5


def test_grad_norm_schedule_interval_follows_the_budget():
    s = GradNormSchedule(budget=0.25)
    assert s.interval == 1 and s.due()
    s.record_pass(1.0)  # the exact pass costs 4x the budget of a 1 s step: every 4th step
    s.record_step(1.0)
    assert s.interval == 4
    dues = []
    for _ in range(10):
        d = s.due()
        dues.append(d)
        if d:
            s.record_pass(1.0)
        else:
            s.skipped()
    assert dues == [False, False, False, True] * 2 + [False, False]


def test_sampled_grad_norms_with_a_sparse_gradient():
    # An embedding with sparse=True: its gradient holds only the rows used; it is measured exactly
    # (cheap) while the dense ones are sampled, and training goes on (no tracking error as a stage error).
    torch.manual_seed(0)
    emb = nn.Embedding(5000, 16, sparse=True)
    fc = nn.Linear(16, 3)
    idx = torch.randint(0, 5000, (32, 4))
    fc(emb(idx).mean(1)).sum().backward()
    stats = ParamStats([emb.weight, fc.weight, fc.bias], sample_size=8)
    norms, exact = stats.grad_norms(exact=False)
    assert exact is False
    dense_sparse = float(torch.linalg.vector_norm(emb.weight.grad.to_dense()))
    assert norms[0] == pytest.approx(dense_sparse, rel=1e-5)
    assert np.isfinite(norms[1:]).all() and (norms[1:] > 0).all()


def test_a_bfloat16_model_gets_its_grad_norms_and_data_audits():
    """numpy has no bfloat16: the norms and the audit digests go through float32 (they failed before)."""
    import tlwidgets as tlw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(16, 8, dtype=torch.bfloat16), torch.randint(0, 3, (16,))) for _ in range(10)]
    runner = tlw.Runner(model, nn.CrossEntropyLoss(), opt, data, measure_every=1)
    try:
        runner.run(steps=5)
        assert runner.diagnostic_errors == []
        naive = [torch.linalg.vector_norm(p.grad.float()).item() for p in model.parameters()]
        np.testing.assert_allclose(runner.history.grad_norm[-1], naive, rtol=1e-2)
        assert np.isfinite(runner.history.update_norm[-1]).all()
    finally:
        runner.close()
