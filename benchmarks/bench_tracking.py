"""Tracking overhead and history memory (DESIGN.md section 7).

Measures, interleaved in one process on one thread, the step time of

* a bare training loop,
* ``tlw.Runner.run`` (default tracking + default rules),
* the same bare loop inside ``tlw.watch()``,
* ``tlw.Runner.run`` measuring every step (``measure_every=1``): what the
  dense phases of the default schedule cost (the first ``dense_steps=200``
  steps, and 200 steps after a control change, a rewind or an LR jump),

on ~1M- and ~10M-parameter MLPs with batch 64, and prints the ratios; then
the history memory per 1,000 steps for 60 parameter tensors and whether it
grows once the ring buffer is full.

The budget applies to the default tracking of a run in progress: the Runner
and the watcher are first run past their dense phase (200 steps), then timed.

Times are CPU time of this process (``time.process_time``): on one thread
that is the step's cost, and it stays meaningful when other processes share
the machine.

Run: ``python benchmarks/bench_tracking.py`` (about three minutes on 2 cores;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy as np
import torch
from torch import nn

import tlwidgets as tlw
from tlwidgets.core.history import History


def mlp(width: int, depth: int, d_in: int = 784, d_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]


def make(width: int, depth: int):
    torch.manual_seed(0)
    model = mlp(width, depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, nn.CrossEntropyLoss()


def bare_steps(model, opt, loss_fn, data) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()


def measure(width: int, depth: int, chunk: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of paired per-chunk ratios (runner / bare, watch / bare).

    The three modes alternate every ``chunk`` steps (a multiple of 10, so each
    chunk holds the same share of scheduled work: activation statistics, trend
    rules); a ratio of neighbouring chunks cancels the slow drifts of a shared
    machine, and the median drops the chunks a neighbour disturbed.
    """
    data = batches(chunk)
    parts = {k: make(width, depth) for k in ("bare", "runner", "watch", "dense")}
    n_params = sum(p.numel() for p in parts["bare"][0].parameters())
    runner = tlw.Runner(parts["runner"][0], parts["runner"][2], parts["runner"][1], data)
    dense = tlw.Runner(parts["dense"][0], parts["dense"][2], parts["dense"][1], data, measure_every=1)
    wm, wo, wl = parts["watch"]
    watcher = tlw.watch(wm, wo, loss_fn=wl)
    # Warm-up: allocator and autograd caches; the default schedule past its dense phase.
    past_dense = runner.tracker.dense_steps
    bare_steps(*parts["bare"], data)
    runner.run(steps=past_dense)
    dense.run(steps=chunk)
    while watcher.global_step < past_dense:
        bare_steps(wm, wo, wl, data)
    steps = {
        "bare": lambda: bare_steps(*parts["bare"], data),
        "runner": lambda: runner.run(steps=chunk),
        "watch": lambda: bare_steps(wm, wo, wl, data),
        "dense": lambda: dense.run(steps=chunk),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    gc.collect()
    gc.disable()  # a collection inside one chunk only would be noise
    try:
        for _ in range(rounds):
            for mode, run in steps.items():
                t0 = time.process_time()
                run()
                times[mode].append((time.process_time() - t0) / chunk)
            gc.collect()
    finally:
        gc.enable()
    watcher.close()
    runner.close()
    dense.close()
    bare = np.array(times["bare"])
    med = {k: statistics.median(v) for k, v in times.items()}

    def overhead(mode: str) -> float:
        return float(np.median(np.array(times[mode]) / bare)) - 1

    return {
        "params": n_params,
        "bare_ms": med["bare"] * 1e3,
        "runner_ms": med["runner"] * 1e3,
        "watch_ms": med["watch"] * 1e3,
        "runner_overhead": overhead("runner"),
        "watch_overhead": overhead("watch"),
        "dense_overhead": overhead("dense"),
        "grad_interval": runner.tracker.stats.schedule.interval,
    }


def history_memory() -> dict[str, float]:
    names = [f"layer{i}.weight" for i in range(60)]
    h = History(names, capacity=10_000)
    per_1000 = h.nbytes / 10  # the buffers are allocated up front for 10,000 steps
    # Growth once full: a small ring, filled, then 3x more appends.
    small = History(names, capacity=1_000)
    row = np.ones(60)

    def add(k: int) -> None:
        for i in range(k):
            small.append(
                step=i,
                epoch=0,
                loss=1.0,
                lr=[0.1],
                grad_norm=row,
                weight_norm=row,
                update_norm=row,
                exact=False,
            )

    add(1_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    add(3_000)
    growth = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"bytes_per_1000_steps": per_1000, "growth_after_full_bytes": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [("~1M", 512, 3, 20, 40, 0.05), ("~10M", 2048, 3, 10, 12, 0.03)]
    if args.quick:
        configs = [("~1M", 512, 3, 10, 2, 0.05)]
    print(f"torch {torch.__version__}, 1 thread, batch 64, SGD momentum, medians of paired chunk ratios")
    print(
        "runner, watch: default schedule past its dense phase; dense: every step measured (measure_every=1)"
    )
    print(
        f"{'model':>6} {'params':>10} {'bare ms':>8} {'runner ms':>9} {'watch ms':>9} "
        f"{'runner':>8} {'watch':>8} {'budget':>7} {'dense':>8}  grad-norm every"
    )
    ok = True
    for label, width, depth, steps, rounds, budget in configs:
        r = measure(width, depth, steps, rounds)
        within = r["runner_overhead"] <= budget and r["watch_overhead"] <= budget
        ok &= within
        print(
            f"{label:>6} {r['params']:>10,} {r['bare_ms']:8.2f} {r['runner_ms']:9.2f} {r['watch_ms']:9.2f} "
            f"{r['runner_overhead']:+8.1%} {r['watch_overhead']:+8.1%} {budget:>7.0%} "
            f"{r['dense_overhead']:+8.1%}  {r['grad_interval']} step(s)"
            f"{'' if within else '  OVER BUDGET'}"
        )
    mem = history_memory()
    print(
        f"history, 60 parameter tensors: {mem['bytes_per_1000_steps'] / 2**20:.2f} MiB per 1,000 steps "
        f"(budget < 2 MiB); growth after the ring is full: {mem['growth_after_full_bytes']} bytes"
    )
    print("all within budget" if ok and mem["bytes_per_1000_steps"] < 2 * 2**20 else "SOME BUDGETS MISSED")


if __name__ == "__main__":
    main()
