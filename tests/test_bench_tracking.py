"""benchmarks/bench_tracking.py: its pure helpers (schedule period, chunk sizing, amortized ratio, budgets) and
the turns a Runner variant is advanced in (one run() call, taken a few steps at a time)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import count_trend_runs

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tracking.py"


def _load() -> ModuleType:
    # benchmarks/ is not a package: load the script from its path, as `python benchmarks/...` would.
    spec = importlib.util.spec_from_file_location("bench_tracking", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load()


_COUNTED = (25, 10, 1, 5, 10, 20)  # activations, details, rule periods
_MODULO = (50, 10)  # occasional facts, the watcher's clip measurement


def test_schedule_period_of_the_defaults() -> None:
    # Measured every 20th step: activations (25) run every 40th if counted from the last run,
    # every 100th under a modulo test; with the 50-step facts the schedule repeats every 200.
    assert bench.schedule_period(20, _COUNTED, _MODULO) == 200
    # Every step measured: everything on its own period, lcm 100.
    assert bench.schedule_period(1, _COUNTED, _MODULO) == 100


def test_schedule_period_takes_both_readings_of_a_counted_period() -> None:
    # every=30 asked every 20 steps: every 40 steps if counted, 60 if a modulo test -> lcm 120.
    assert bench.schedule_period(20, counted=(30,)) == 120
    assert bench.schedule_period(20, modulo=(30,)) == 60
    assert bench.schedule_period(7, counted=(0,)) == 7  # 0 = never: no period


def test_schedule_period_rejects_a_zero_measure_every() -> None:
    with pytest.raises(ValueError):
        bench.schedule_period(0, (25, 10))


def test_align_up_and_chunk_steps() -> None:
    assert bench.align_up(200, 100) == 200
    assert bench.align_up(201, 100) == 300
    assert bench.align_up(0, 100) == 0
    assert bench.chunk_steps(100, 1) == 100
    assert bench.chunk_steps(100, 100) == 100
    assert bench.chunk_steps(100, 150) == 200
    assert bench.chunk_steps(100, 0) == 100  # never an empty chunk
    with pytest.raises(ValueError):
        bench.align_up(10, 0)


def test_amortized_overhead_counts_work_that_lands_in_few_chunks() -> None:
    bare = [1.0] * 5
    variant = [1.0, 1.0, 1.0, 1.0, 1.5]  # periodic work in one chunk of five
    assert bench.amortized_overhead(variant, bare) == pytest.approx(0.1)
    # The old figure, a median of per-chunk ratios, saw none of it.
    assert statistics.median(v / b for v, b in zip(variant, bare)) - 1 == 0


def test_amortized_overhead_is_the_ratio_of_totals() -> None:
    assert bench.amortized_overhead([2.0, 4.0], [1.0, 5.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        bench.amortized_overhead([1.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        bench.amortized_overhead([], [])


def test_bootstrap_interval_brackets_the_amortized_figure() -> None:
    bare = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2]
    variant = [1.05, 1.2, 0.95, 1.08, 1.0, 1.3]
    lo, hi = bench.bootstrap_interval(variant, bare)
    assert lo <= bench.amortized_overhead(variant, bare) <= hi
    assert bench.bootstrap_interval(variant, bare) == (lo, hi)  # seeded: reproducible
    # Identical ratios in every round: no spread.
    assert bench.bootstrap_interval([1.1, 2.2], [1.0, 2.0]) == pytest.approx((0.1, 0.1))


def test_budget_misses_names_each_miss() -> None:
    budgets = {"~1M": {"runner": 0.05, "dense": 0.08}}
    ok = bench.budget_misses({"~1M": {"runner": 0.05, "dense": 0.02, "other": 9.0}}, budgets, 1e6, 0)
    assert ok == []  # at the budget is within it; a variant without a budget is not checked
    misses = bench.budget_misses({"~1M": {"runner": 0.051, "dense": 0.09}}, budgets, 3 * 2**20, 10**6)
    assert len(misses) == 4
    assert "~1M Runner, default schedule: +5.1% > 5%" in misses
    assert any(m.startswith("~1M Runner, every step measured") for m in misses)
    assert any("MiB per 1,000 steps" in m for m in misses)
    assert any("grows once full" in m for m in misses)


def test_devices_to_run_adds_cuda_only_where_there_is_one() -> None:
    assert bench.devices_to_run("auto", cuda_available=False) == ["cpu"]
    assert bench.devices_to_run("auto", cuda_available=True) == ["cpu", "cuda"]
    assert bench.devices_to_run("cpu", cuda_available=True) == ["cpu"]
    assert bench.devices_to_run("cuda", cuda_available=True) == ["cuda"]
    with pytest.raises(ValueError):
        bench.devices_to_run("cuda", cuda_available=False)
    with pytest.raises(ValueError):
        bench.devices_to_run("tpu", cuda_available=True)


def test_syncs_grow_with_params_flags_a_per_parameter_sync() -> None:
    assert not bench.syncs_grow_with_params({8: 4.0, 26: 4.0})  # fused: the same count at any depth
    assert bench.syncs_grow_with_params({8: 12.0, 26: 30.0})  # one more sync per tensor
    assert not bench.syncs_grow_with_params({8: 4.0})  # one model: nothing to compare


def test_the_cpu_chunk_clock_is_cpu_time() -> None:
    assert bench.chunk_clock("cpu") is bench.time.process_time


@pytest.mark.skipif(not bench.torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_steps_do_not_sync_per_parameter_on_a_gpu() -> None:  # pragma: no cover - GPU only
    shallow = bench.count_syncs(64, 3, steps=3)
    deep = bench.count_syncs(64, 12, steps=3)
    assert not bench.syncs_grow_with_params({8: shallow, 26: deep}), (shallow, deep)


def test_turns_split_a_chunk_and_refuse_a_turn_that_does_not_divide_it() -> None:
    assert bench.turns(200, 20) == list(range(0, 200, 20))
    assert bench.turns(200, 200) == [0]
    for bad in (0, 30, -4):
        with pytest.raises(ValueError):
            bench.turns(200, bad)


def _runner(steps_of_data: int) -> tuple[object, list[int]]:
    model, opt, loss_fn = bench.make(16, 2)  # (seeded)
    runner = bench.tlw.Runner(model, loss_fn, opt, bench.batches(steps_of_data), measure_every=1)
    return runner, count_trend_runs(runner)


def test_a_run_taken_in_turns_is_one_run_call() -> None:
    """Steps, diagnosed steps and weights of RunnerTurns(n in turns of k) equal those of run(steps=n)."""
    whole, whole_diag = _runner(40)
    turned, turned_diag = _runner(40)
    try:
        whole.run(steps=60)
        turned.run(steps=60)
        whole_diag.clear()
        turned_diag.clear()
        whole.run(steps=80)  # past step 50: the diagnosis cadence, and the last step of the run
        t = bench.RunnerTurns(turned)
        t.start(80)
        for _ in bench.turns(80, 8):
            t.advance(8)
        t.finish()
        assert turned.global_step == whole.global_step == 140
        assert turned_diag == whole_diag and turned_diag[-1] == 140  # (not the end of every turn)
        for a, b in zip(whole.model.parameters(), turned.model.parameters()):
            assert bench.torch.equal(a, b)
        assert not turned._running  # the run ended as run() ends
    finally:
        whole.close()
        turned.close()
