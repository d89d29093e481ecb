"""Headless throughput with a Dashboard attached (DESIGN.md section 7: >= 0.85x without it).

Runs ``runner.run(steps=1000)`` on fresh runners, alternately without and with a
``tlw.Dashboard`` attached (interleaved repeats in one process, one thread), and
prints the steps/s of both and their ratio. With a dashboard attached every
stage, step and finding event reaches its handlers, and the throttled refresher
redraws the panels inline (at most ~10 times a second, less when a redraw is
slow) exactly as it would in a notebook; only the front end is missing.

The budget is judged on CPU time of this process (``time.process_time``): on
one thread that is the cost of the steps plus everything the dashboard does,
and it stays meaningful when other processes share the machine (wall-clock
ratios on a shared 2-core machine swing by +-15% from run to run). Wall-clock
steps/s are printed too; the dashboard throttles redraws on wall time, so on a
loaded machine it redraws more often per step, which the CPU figure includes.

Run: ``python benchmarks/bench_dashboard.py`` (about a minute on 2 cores;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch import nn

import tlwidgets as tlw

MODELS = {
    # name: (hidden widths, input size, batch)
    "mlp-270k": ((256, 256), 784, 64),
    "mlp-tiny": ((32,), 20, 32),
}


def make_runner(widths: tuple[int, ...], d_in: int, batch: int, seed: int = 0) -> tlw.Runner:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    layers.append(nn.Linear(d, 10))
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(batch, d_in, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(50)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return tlw.Runner(model, nn.CrossEntropyLoss(), opt, data)


def timed_run(spec: tuple, steps: int, with_dashboard: bool) -> tuple[float, dict]:
    runner = make_runner(*spec)
    runner.run(steps=5)  # warm-up (first-step costs, activation probes)
    dash = tlw.Dashboard(runner) if with_dashboard else None
    gc.collect()
    redraws0 = dash.refresher.redraws if dash else 0
    t0, c0 = time.perf_counter(), time.process_time()
    result = runner.run(steps=steps)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert result.steps == steps, result
    info: dict = {"wall_rate": steps / elapsed}
    if dash is not None:
        info |= {
            "redraws": dash.refresher.redraws - redraws0,
            "redraw_s": dash.refresher.total_cost,
            "errors": dash.errors.count,
        }
        dash.close()
    runner.close()
    return steps / cpu, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="200 steps, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 200, 2
    torch.set_num_threads(1)
    print(f"headless runner.run(steps={args.steps}), {args.repeats} interleaved repeats, 1 thread")
    worst = float("inf")
    for name, spec in MODELS.items():
        bare, dashed, infos, walls = [], [], [], {False: [], True: []}
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_dash in order:
                rate, info = timed_run(spec, args.steps, with_dash)
                (dashed if with_dash else bare).append(rate)
                walls[with_dash].append(info["wall_rate"])
                if with_dash:
                    infos.append(info)
        ratio = statistics.median(d / b for d, b in zip(dashed, bare))
        worst = min(worst, ratio)
        redraws = statistics.median(i["redraws"] for i in infos)
        draw_ms = 1000 * statistics.median(i["redraw_s"] / max(i["redraws"], 1) for i in infos)
        errors = sum(i["errors"] for i in infos)
        wall_ratio = statistics.median(d / b for d, b in zip(walls[True], walls[False]))
        print(
            f"{name:9s}  CPU: without {statistics.median(bare):7.1f} steps/s, with Dashboard "
            f"{statistics.median(dashed):7.1f} steps/s, ratio {ratio:.3f} | wall: "
            f"{statistics.median(walls[False]):7.1f} vs {statistics.median(walls[True]):7.1f} steps/s, "
            f"ratio {wall_ratio:.3f} | {redraws:.0f} redraws per run, {draw_ms:.1f} ms each, {errors} errors"
        )
    verdict = "OK" if worst >= 0.85 else "OVER BUDGET"
    print(f"budget: with/without >= 0.85 (CPU steps/s) -> worst ratio {worst:.3f}: {verdict}")
    return 0 if worst >= 0.85 else 1


if __name__ == "__main__":
    raise SystemExit(main())
