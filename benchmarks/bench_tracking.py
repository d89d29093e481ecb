"""Tracking overhead and history memory against the budgets of DESIGN.md section 7.

What is timed
-------------
Four variants of the same training step (~1M- and ~10M-parameter MLPs, batch
64, SGD with momentum), each on its own model instance, in one process on one
torch thread:

* ``bare``: a plain training loop;
* ``runner``: ``tlw.Runner.run`` with the default schedule (``measure_every=20``,
  default rules), past its dense phase;
* ``watch``: the bare loop inside ``tlw.watch()`` with the default schedule,
  past its dense phase;
* ``dense``: ``tlw.Runner.run`` with ``measure_every=1`` (every step
  measured): what the dense phases of the default schedule cost (the first
  ``dense_steps=200`` steps, and 200 steps after a control change, a rewind,
  a ``requires_grad`` change or an LR jump).

Before timing, every variant is run to the same start step ``S``: the
smallest multiple of the chunk length ``C`` (below) at or past
``dense_steps``, so the default variants are in their sparse phase and all of
them sit at the same phase of their schedules.

Amortized cost
--------------
The tracking does periodic work, on measured steps: a measured step every 20
steps (``measure_every``), activation statistics (``activation_every=25``),
batch details (``detail_every=10``), rule evaluations (``every`` 5/10/20,
counted from a rule's last run), "occasional" loss facts (``step % 50``), the
watcher's clip measurement (``step % 10``), and one epoch end per pass over the
data. A median of per-chunk ratios drops whatever lands in a minority of
chunks; the figure that matches what a long run pays is the **amortized**
cost: total time over total steps.

So the variants run interleaved in chunks of ``C`` steps, where ``C`` is a
whole number of *schedule periods*: the lcm of every period above, for both
the default and the dense schedule. A period ``p`` counted from the last run
and asked on measured steps ``m`` apart repeats every ``m * ceil(p / m)``
steps (activations every 25 steps, asked every 20th step, run every 40th);
the lcm takes both ``p`` and that, so it holds whether a schedule is counted
or a ``step % p`` test. With the defaults the period is 200 steps, and
``C = 200``. Chunks start at ``S + k*C`` of their run, so every chunk of every
variant holds the same periodic work, that of a long run. The data are one
epoch of ``C`` batches, so the Runner also ends one epoch per chunk (a short
epoch: this overstates the epoch-end cost of a real run).

The reported overhead of a variant is

    sum over chunks of its CPU time / sum over chunks of the bare CPU time - 1

which, with the same number of steps per variant, is the ratio of the mean
step times including all periodic work. Interleaving (bare, runner, watch,
dense in turn, the order rotated each round) makes slow drifts of a shared
machine hit all variants alike. The interval shown next to it is a bootstrap
over rounds (chunks of all variants resampled together), a measure of that
drift, not a bound; the budget check uses the amortized figure itself.

Times are CPU time of this process (``time.process_time``): on one thread that
is the step's cost, and it stays meaningful when other processes share the
machine. The garbage collector is collected before the timed rounds and
between rounds and is off inside them (a collection inside one chunk only
would be noise).

Memory: bytes of history per 1,000 steps for 60 parameter tensors, and growth
(tracemalloc) over 3,000 appends once the ring buffer is full.

Budgets (DESIGN.md section 7): default tracking (runner and watch) <= 5% at
~1M and <= 3% at ~10M; every step measured <= 8% / <= 3%; history < 2 MiB per
1,000 steps and no growth once full. The script exits with status 1 and names
each missed budget. ``--quick`` is a smoke run of the ~1M model only, too short
to judge: it prints the figures and the budgets but does not enforce them.

Run: ``python benchmarks/bench_tracking.py`` (about 7 minutes on 2 cores;
``--quick``: under a minute).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import sys
import time
import tracemalloc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

import tlwidgets as tlw
from tlwidgets.core.history import History
from tlwidgets.core.tracker import Tracker
from tlwidgets.diagnostics.rules import DEFAULT_RULES

#: Periods hard-coded in the sessions rather than set by options: the Runner's and
#: the watcher's "occasional" loss facts (``step % 50``) and the watcher's clip
#: measurement (``step % 10``). Listed here so a chunk holds whole periods of them too.
FIXED_PERIODS = (50, 10)

#: History memory budget (DESIGN.md section 7) and the growth tolerated once the
#: ring is full: tracemalloc sees a few interpreter-internal bytes; a leak of one
#: object per append over 3,000 appends would be tens of kilobytes.
HISTORY_BUDGET_BYTES = 2 * 2**20
GROWTH_TOLERANCE_BYTES = 4096

#: The rules' periods (in steps between runs; evaluated on measured steps only).
RULE_EVERYS = tuple(sorted({r.every for r in DEFAULT_RULES}))

VARIANTS = ("bare", "runner", "watch", "dense")
LABELS = {
    "bare": "bare loop",
    "runner": "Runner, default schedule",
    "watch": "watch(), default schedule",
    "dense": "Runner, every step measured",
}


@dataclass(frozen=True)
class Config:
    label: str
    width: int
    depth: int
    rounds: int
    budget_default: float
    budget_dense: float


CONFIGS = (
    Config("~1M", 512, 3, rounds=8, budget_default=0.05, budget_dense=0.08),
    Config("~10M", 2048, 3, rounds=4, budget_default=0.03, budget_dense=0.03),
)
QUICK = (Config("~1M", 512, 3, rounds=2, budget_default=0.05, budget_dense=0.08),)


# ---------------------------------------------------------------- pure helpers
def schedule_period(measure_every: int, counted: Iterable[int] = (), modulo: Iterable[int] = ()) -> int:
    """Steps after which the schedule of a run past its dense phase repeats (a period of 0 = never).

    Everything but the measurement itself happens on measured steps only, which
    fall ``measure_every`` apart. ``modulo`` periods are ``step % p == 0`` tests:
    period ``p``. ``counted`` periods are counted from the last run ("at least
    ``p`` steps later", the rules' ``every``; the tracker's activation and
    detail schedules have been both kinds): as such the period is the next
    multiple of ``measure_every`` at or above ``p``, so both that and ``p`` go
    into the lcm, and a chunk of whole periods stays one under either reading.
    """
    if measure_every < 1:
        raise ValueError(f"measure_every must be >= 1, got {measure_every}")
    periods = [measure_every, *modulo]
    for p in counted:
        if p > 0:
            periods += [p, measure_every * math.ceil(p / measure_every)]
    out = 1
    for p in periods:
        if p > 0:
            out = math.lcm(out, p)
    return out


def align_up(step: int, period: int) -> int:
    """The smallest multiple of ``period`` at or above ``step``."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    return period * math.ceil(step / period)


def chunk_steps(period: int, min_steps: int) -> int:
    """Chunk length: a whole number (at least one) of schedule periods, at least ``min_steps``."""
    return max(period, align_up(min_steps, period))


def amortized_overhead(variant_times: Sequence[float], bare_times: Sequence[float]) -> float:
    """Total variant time over total bare time, minus 1 (same steps per chunk in both)."""
    if len(variant_times) != len(bare_times) or not bare_times:
        raise ValueError("need the same, non-zero number of chunks for the variant and the bare loop")
    return math.fsum(variant_times) / math.fsum(bare_times) - 1


def bootstrap_interval(
    variant_times: Sequence[float],
    bare_times: Sequence[float],
    level: float = 0.9,
    n: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`amortized_overhead`, resampling rounds.

    A round's variant and bare chunks are resampled together, since they ran
    side by side and share that moment's machine speed.
    """
    v = np.asarray(variant_times, dtype=float)
    b = np.asarray(bare_times, dtype=float)
    if v.shape != b.shape or v.size == 0:
        raise ValueError("need the same, non-zero number of chunks for the variant and the bare loop")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n, v.size))
    ratios = v[idx].sum(axis=1) / b[idx].sum(axis=1) - 1
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def budget_misses(
    overheads: dict[str, dict[str, float]],
    budgets: dict[str, dict[str, float]],
    history_bytes_per_1000: float,
    growth_bytes: float,
) -> list[str]:
    """One line per missed budget (empty when all hold).

    ``overheads[model][variant]`` and ``budgets[model][variant]`` are fractions;
    a variant without a budget is not checked.
    """
    misses = []
    for model, by_variant in overheads.items():
        for variant, value in by_variant.items():
            limit = budgets.get(model, {}).get(variant)
            if limit is not None and value > limit:
                misses.append(f"{model} {LABELS.get(variant, variant)}: {value:+.1%} > {limit:.0%}")
    if history_bytes_per_1000 >= HISTORY_BUDGET_BYTES:
        misses.append(
            f"history memory: {history_bytes_per_1000 / 2**20:.2f} MiB per 1,000 steps >= "
            f"{HISTORY_BUDGET_BYTES / 2**20:.0f} MiB"
        )
    if growth_bytes > GROWTH_TOLERANCE_BYTES:
        misses.append(f"history memory grows once full: {growth_bytes:,.0f} bytes over 3,000 appends")
    return misses


# ---------------------------------------------------------------- measurement
def mlp(width: int, depth: int, d_in: int = 784, d_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


Batch = tuple[torch.Tensor, torch.Tensor]


def batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]


def make(width: int, depth: int) -> tuple[nn.Sequential, torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = mlp(width, depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, nn.CrossEntropyLoss()


def bare_steps(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, data: Iterable[Batch]
) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()


def tracker_period(tracker: Tracker) -> int:
    """The schedule period of a live session's tracker (its own option values)."""
    return schedule_period(
        tracker.measure_every,
        counted=(tracker.activation_every, tracker.detail_every, *RULE_EVERYS),
        modulo=FIXED_PERIODS,
    )


@dataclass
class Result:
    params: int
    chunk: int
    start: int
    rounds: int
    times: dict[str, list[float]]  # CPU seconds per chunk, per variant
    grad_interval: int

    def ms_per_step(self, variant: str) -> float:
        return math.fsum(self.times[variant]) / (len(self.times[variant]) * self.chunk) * 1e3

    def overhead(self, variant: str) -> float:
        return amortized_overhead(self.times[variant], self.times["bare"])

    def interval(self, variant: str) -> tuple[float, float]:
        return bootstrap_interval(self.times[variant], self.times["bare"])


def measure(cfg: Config, rounds: int, min_chunk: int = 100) -> Result:
    parts = {k: make(cfg.width, cfg.depth) for k in VARIANTS}
    n_params = sum(p.numel() for p in parts["bare"][0].parameters())
    rm, ro, rl = parts["runner"]
    dm, do, dl = parts["dense"]
    wm, wo, wl = parts["watch"]
    # The Runners take their data at construction, so the chunk length comes from
    # the documented defaults of the schedule options; checked against the live
    # trackers below, in case a session overrides one of them.
    defaults = {k: v.default for k, v in inspect.signature(tlw.Runner).parameters.items()}
    period = math.lcm(
        *(
            schedule_period(
                every,
                counted=(defaults["activation_every"], defaults["detail_every"], *RULE_EVERYS),
                modulo=FIXED_PERIODS,
            )
            for every in (defaults["measure_every"], 1)
        )
    )
    chunk = chunk_steps(period, min_chunk)
    data = batches(chunk)
    runner = tlw.Runner(rm, rl, ro, data)
    dense = tlw.Runner(dm, dl, do, data, measure_every=1)
    watcher = tlw.watch(wm, wo, loss_fn=wl)
    try:
        for name, session in (("runner", runner), ("dense", dense), ("watch", watcher)):
            if chunk % tracker_period(session.tracker):
                raise RuntimeError(
                    f"{name}: schedule period {tracker_period(session.tracker)} does not divide {chunk}"
                )
        # Aligned to the chunk, which every session's period divides.
        start = align_up(max(runner.tracker.dense_steps, watcher.tracker.dense_steps), chunk)

        # Warm-up: allocator and autograd caches; every session to the same aligned start step.
        bare_steps(*parts["bare"], data)
        runner.run(steps=start)
        dense.run(steps=start)
        for i in range(start):
            bare_steps(wm, wo, wl, [data[i % chunk]])
        for name, step in (
            ("runner", runner.global_step),
            ("dense", dense.global_step),
            ("watch", watcher.global_step),
        ):
            if step != start:
                raise RuntimeError(f"{name} warm-up ended at step {step}, expected {start}")
        for name, session in (("runner", runner), ("watch", watcher)):
            # Past the dense phase, a step that is not a multiple of measure_every goes unmeasured.
            if session.tracker.measuring(start + 1):
                raise RuntimeError(f"{name} is still in a dense phase at step {start}")

        run: dict[str, Callable[[], object]] = {
            "bare": lambda: bare_steps(*parts["bare"], data),
            "runner": lambda: runner.run(steps=chunk),
            "watch": lambda: bare_steps(wm, wo, wl, data),
            "dense": lambda: dense.run(steps=chunk),
        }
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        gc.collect()
        gc.disable()  # a collection inside one chunk only would be noise
        try:
            for r in range(rounds):
                # Rotate the order so no variant always follows the same one (cache state, drift within a round).
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for variant in order:
                    t0 = time.process_time()
                    run[variant]()
                    times[variant].append(time.process_time() - t0)
                gc.collect()
        finally:
            gc.enable()
        end = start + rounds * chunk
        for name, step in (
            ("runner", runner.global_step),
            ("dense", dense.global_step),
            ("watch", watcher.global_step),
        ):
            if step != end:  # a stop (finding, error) would leave a short chunk and a wrong total
                raise RuntimeError(f"{name} stopped at step {step}, expected {end}")
        return Result(n_params, chunk, start, rounds, times, runner.tracker.stats.schedule.interval)
    finally:
        watcher.close()
        runner.close()
        dense.close()


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="~1M model, 2 rounds: a smoke run, budgets not enforced"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per model (default: 8 at ~1M, 4 at ~10M)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configs = QUICK if args.quick else CONFIGS
    print(f"torch {torch.__version__}, 1 thread, batch 64, SGD momentum, CPU time (process_time)")
    print(
        "overhead = sum of a variant's chunk times / sum of the bare chunk times - 1 (amortized, periodic work included)"
    )
    print(
        "interval: 90% bootstrap over rounds (drift of the machine, not a bound); budget checked on the amortized figure"
    )
    overheads: dict[str, dict[str, float]] = {}
    budgets: dict[str, dict[str, float]] = {}
    for cfg in configs:
        r = measure(cfg, args.rounds or cfg.rounds)
        budgets[cfg.label] = {
            "runner": cfg.budget_default,
            "watch": cfg.budget_default,
            "dense": cfg.budget_dense,
        }
        overheads[cfg.label] = {v: r.overhead(v) for v in VARIANTS if v != "bare"}
        print()
        print(
            f"{cfg.label} MLP, {r.params:,} params: {r.rounds} rounds x {r.chunk} steps per variant "
            f"(steps {r.start}-{r.start + r.rounds * r.chunk} of each run; chunk = whole schedule periods); "
            f"exact grad norms every {r.grad_interval} measured step(s)"
        )
        print(f"  {'variant':<28} {'ms/step':>8} {'overhead':>9} {'90% interval':>18} {'budget':>7}")
        for v in VARIANTS:
            if v == "bare":
                print(f"  {LABELS[v]:<28} {r.ms_per_step(v):8.2f}")
                continue
            lo, hi = r.interval(v)
            limit = budgets[cfg.label][v]
            verdict = "ok" if overheads[cfg.label][v] <= limit else "OVER"
            print(
                f"  {LABELS[v]:<28} {r.ms_per_step(v):8.2f} {overheads[cfg.label][v]:+9.1%} "
                f"{f'[{lo:+.1%}, {hi:+.1%}]':>18} {f'<= {limit:.0%}':>7}  {verdict}"
            )
    mem = history_memory()
    print()
    print(
        f"history, 60 parameter tensors: {mem['bytes_per_1000_steps'] / 2**20:.2f} MiB per 1,000 steps "
        f"(budget < 2 MiB); growth over 3,000 appends once the ring is full: "
        f"{mem['growth_after_full_bytes']} bytes (budget: no growth; {GROWTH_TOLERANCE_BYTES} bytes of "
        "interpreter noise tolerated)"
    )
    misses = budget_misses(overheads, budgets, mem["bytes_per_1000_steps"], mem["growth_after_full_bytes"])
    if args.quick:
        print(
            "quick mode: too few steps to judge; budgets NOT enforced"
            + (f" ({len(misses)} over)" if misses else "")
        )
        return 0
    if misses:
        print("BUDGETS MISSED:")
        for m in misses:
            print(f"  {m}")
        return 1
    print("all budgets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
