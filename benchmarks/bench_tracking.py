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
step times including all periodic work.

Within a chunk the variants take **turns** of a few steps (20 at ~1M, 4 at
~10M: 100-300 ms each), the order rotated every turn and every round, so a
slow spell of a shared machine hits all variants alike. (Timed chunk after
chunk, two identical bare loops differed by 6-9% per round on this VM, whose
speed moves within a second; in turns of 20 steps, by ~3%.) The Runner
variants are advanced through the generator ``Runner.run`` iterates
(:class:`RunnerTurns`), so each chunk is still one ``run(steps=C)`` call: its
last step diagnosed, the others on the schedule, as in a long run. Each turn
starts with a model the other variants pushed out of the caches; that costs
every variant alike (well under 1% of a step at ~1M). The interval shown next
to the overhead is a bootstrap over rounds (chunks of all variants resampled
together), a measure of what drift is left, not a bound; the budget check
uses the amortized figure itself.

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

GPU path
--------
When a CUDA device exists (``--device auto``, the default; ``--device cuda``
asks for it alone, ``--device cpu`` skips it), the same four variants run on
the GPU after the CPU figures: models and batches on the device, each chunk
timed in wall-clock time between two ``torch.cuda.synchronize()`` calls (CPU
time does not see the GPU's work; one sync per chunk, none inside it). The
GPU figures are reported, not held to the CPU budgets of DESIGN.md section 7.
What is checked there is the property that keeps tracking cheap on a device:
**no host sync per parameter**. The host syncs of a dense (every step
measured) Runner step are counted with ``torch.cuda.set_sync_debug_mode``
for a 3-layer and a 12-layer MLP; a count that grows with the number of
parameter tensors is a budget miss. Nothing of this runs without CUDA (CI
has none; ``tests/test_bench_tracking.py`` runs its GPU test only on a GPU).

Run: ``python benchmarks/bench_tracking.py`` (about 7 minutes on 2 shared
cores; ``--quick``: under a minute; ``--rounds N`` fewer rounds per model).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import signal
import sys
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

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
    #: Steps a variant runs per turn inside a chunk (the variants take turns; see the module notes).
    turn: int = 20


CONFIGS = (
    Config("~1M", 512, 3, rounds=12, budget_default=0.05, budget_dense=0.08, turn=20),
    Config("~10M", 2048, 3, rounds=4, budget_default=0.03, budget_dense=0.03, turn=4),
)
QUICK = (Config("~1M", 512, 3, rounds=2, budget_default=0.05, budget_dense=0.08, turn=20),)


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


def batches(n: int, seed: int = 0, device: str = "cpu") -> list[Batch]:
    """``n`` batches of 64 random inputs and labels (made on the CPU, from the same seed on every
    device, then moved: the data do not depend on the device)."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]
    return out if device == "cpu" else [(x.to(device), y.to(device)) for x, y in out]


def make(
    width: int, depth: int, device: str = "cpu"
) -> tuple[nn.Sequential, torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = mlp(width, depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, nn.CrossEntropyLoss()


def devices_to_run(choice: str, cuda_available: bool) -> list[str]:
    """The devices a run measures: ``auto`` is the CPU, then CUDA when there is one.

    Raises
    ------
    ValueError
        ``choice="cuda"`` without a CUDA device, or an unknown choice.
    """
    if choice == "auto":
        return ["cpu", "cuda"] if cuda_available else ["cpu"]
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        if not cuda_available:
            raise ValueError("--device cuda: no CUDA device here")
        return ["cuda"]
    raise ValueError(f"unknown device choice {choice!r} (auto, cpu or cuda)")


def syncs_grow_with_params(counts: dict[int, float]) -> bool:
    """Do the host syncs per step grow with the number of parameter tensors?

    ``counts`` maps a model's number of parameter tensors to its syncs per
    dense step. A per-parameter ``.item()`` or ``.cpu()`` adds one sync per
    tensor; fused statistics keep the count the same whatever the depth.
    """
    if len(counts) < 2:
        return False
    by_size = [counts[k] for k in sorted(counts)]
    return any(b > a for a, b in zip(by_size, by_size[1:]))


def bare_steps(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, data: Iterable[Batch]
) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()


class RunnerTurns:
    """One ``Runner.run(steps=n)`` call, advanced a few steps at a time.

    Drives the generator that :meth:`Runner.run` itself iterates, so the steps
    are exactly those of one ``run(steps=n)`` call (its last step diagnosed,
    the others on the schedule), while the other variants take their turns in
    between. (A ``run(steps=turn)`` per turn would diagnose the last step of
    every turn: not what a long run pays.)
    """

    def __init__(self, runner: tlw.Runner) -> None:
        self.runner = runner
        self._gen: Iterator[Any] | None = None

    def start(self, steps: int) -> None:
        """Begin a run of ``steps`` steps (nothing runs until :meth:`advance`)."""
        self._gen = self.runner._run_iter(steps, None, lean=True)  # (what run() iterates)

    def advance(self, steps: int) -> None:
        """Run ``steps`` more steps of the run under way."""
        assert self._gen is not None, "start() first"
        stop = self.runner.global_step + steps
        while self.runner.global_step < stop:
            next(self._gen)

    def finish(self) -> None:
        """End the run (its steps all done): the loop's final check, as when run() returns."""
        assert self._gen is not None, "start() first"
        for _ in self._gen:
            raise RuntimeError("the run went on past its steps")
        self._gen = None


def turns(chunk: int, turn: int) -> list[int]:
    """Start offsets of the turns of ``turn`` steps that make up a chunk (``turn`` divides ``chunk``)."""
    if turn < 1 or chunk % turn:
        raise ValueError(f"a turn of {turn} steps does not divide a chunk of {chunk}")
    return list(range(0, chunk, turn))


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


def chunk_clock(device: str) -> Callable[[], float]:
    """The clock a chunk is timed with: CPU time of this process on the CPU; on a GPU, wall-clock
    time after ``torch.cuda.synchronize()`` (the queued kernels are the chunk's cost too; one sync
    at each end of a chunk, none inside it)."""
    if device == "cpu":
        return time.process_time

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return clock


def count_syncs(width: int, depth: int, steps: int = 5, device: str = "cuda") -> float:
    """Host syncs per step of a dense (every step measured) Runner, counted by CUDA's sync debug mode.

    Every synchronizing call (``.item()``, ``.cpu()``, a ``nonzero``) warns in
    mode ``"warn"``; the warnings of ``steps`` steps past the first ones
    (which also run the one-off probes) are counted.
    """
    import warnings

    model, opt, loss_fn = make(width, depth, device)
    runner = tlw.Runner(model, loss_fn, opt, batches(steps + 10, device=device), measure_every=1)
    try:
        runner.run(steps=10)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                runner.run(steps=steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught) / steps
    finally:
        runner.close()


def measure(cfg: Config, rounds: int, min_chunk: int = 100, device: str = "cpu") -> Result:
    parts = {k: make(cfg.width, cfg.depth, device) for k in VARIANTS}
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
    data = batches(chunk, device=device)
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

        sessions = {"runner": RunnerTurns(runner), "dense": RunnerTurns(dense)}
        run: dict[str, Callable[[int], object]] = {
            "bare": lambda i: bare_steps(*parts["bare"], data[i : i + cfg.turn]),
            "runner": lambda i: sessions["runner"].advance(cfg.turn),
            "watch": lambda i: bare_steps(wm, wo, wl, data[i : i + cfg.turn]),
            "dense": lambda i: sessions["dense"].advance(cfg.turn),
        }
        offsets = turns(chunk, cfg.turn)
        times: dict[str, list[float]] = {k: [0.0] * rounds for k in VARIANTS}
        clock = chunk_clock(device)
        sigint = signal.getsignal(signal.SIGINT)
        gc.collect()
        gc.disable()  # a collection inside one chunk only would be noise
        try:
            for r in range(rounds):
                for variant, turner in sessions.items():
                    t0 = clock()
                    turner.start(chunk)
                    times[variant][r] += clock() - t0
                for t, i in enumerate(offsets):
                    # Rotate the order so no variant always follows the same one (cache state, drift).
                    k = (r + t) % len(VARIANTS)
                    for variant in VARIANTS[k:] + VARIANTS[:k]:
                        t0 = clock()
                        run[variant](i)
                        times[variant][r] += clock() - t0
                for variant, turner in reversed(sessions.items()):
                    t0 = clock()
                    turner.finish()
                    times[variant][r] += clock() - t0
                # (Two runs under way at once chain their Ctrl-C handlers; put the original back.)
                signal.signal(signal.SIGINT, sigint)
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


def print_result(cfg: Config, r: Result, device: str, limits: dict[str, float] | None) -> None:
    """One model's table; ``limits`` (budget per variant) None: figures only (the GPU)."""
    print()
    print(
        f"{cfg.label} MLP on {device}, {r.params:,} params: {r.rounds} rounds x {r.chunk} steps per variant "
        f"(steps {r.start}-{r.start + r.rounds * r.chunk} of each run; chunk = whole schedule periods); "
        f"exact grad norms every {r.grad_interval} measured step(s)"
    )
    print(f"  {'variant':<28} {'ms/step':>8} {'overhead':>9} {'90% interval':>18} {'budget':>7}")
    for v in VARIANTS:
        if v == "bare":
            print(f"  {LABELS[v]:<28} {r.ms_per_step(v):8.2f}")
            continue
        lo, hi = r.interval(v)
        value = r.overhead(v)
        limit = None if limits is None else limits.get(v)
        verdict = "" if limit is None else ("  ok" if value <= limit else "  OVER")
        print(
            f"  {LABELS[v]:<28} {r.ms_per_step(v):8.2f} {value:+9.1%} "
            f"{f'[{lo:+.1%}, {hi:+.1%}]':>18} {f'<= {limit:.0%}' if limit is not None else '-':>7}{verdict}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="~1M model, 2 rounds: a smoke run, budgets not enforced"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per model (default: 12 at ~1M, 4 at ~10M)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU, then CUDA when there is one (GPU figures reported, sync count checked)",
    )
    args = parser.parse_args(argv)
    devices = devices_to_run(args.device, torch.cuda.is_available())
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
    extra_misses: list[str] = []
    for device in devices:
        if device != "cpu":
            print()
            print(f"{device}: wall-clock time, torch.cuda.synchronize() at each end of a chunk; figures only")
        for cfg in configs:
            r = measure(cfg, args.rounds or cfg.rounds, device=device)
            if device != "cpu":
                print_result(cfg, r, device, None)
                continue
            budgets[cfg.label] = {
                "runner": cfg.budget_default,
                "watch": cfg.budget_default,
                "dense": cfg.budget_dense,
            }
            overheads[cfg.label] = {v: r.overhead(v) for v in VARIANTS if v != "bare"}
            print_result(cfg, r, device, budgets[cfg.label])
        if device != "cpu":
            counts = {}
            for depth in (3, 12):
                tensors = 2 * (depth + 1)
                counts[tensors] = count_syncs(256, depth, device=device)
            print(
                "  host syncs per dense step: "
                + ", ".join(f"{n} parameter tensors: {c:.1f}" for n, c in sorted(counts.items()))
                + " (must not grow with the tensors)"
            )
            if syncs_grow_with_params(counts):
                extra_misses.append(
                    f"{device}: host syncs per step grow with the parameter tensors: {counts}"
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
    misses += extra_misses
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
