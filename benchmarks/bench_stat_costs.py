"""What each measured statistic costs, one by one (the cost model of docs/architecture.md, #15).

Times, on the ~1M- and ~10M-parameter MLPs of ``bench_tracking.py`` (batch
64, SGD momentum, one torch thread, CPU time, best of repeats so that a
shared machine's slow moments drop out), the bare training step and each
statistic the tracking computes, called directly:

* exact grad norms (one fused ``_foreach_norm`` pass, one host transfer) and
  the sampled ones;
* sampled weight and update norms around a step (snapshot of the blocks,
  difference, norms) and the exact ones of ``step_stage()`` (full snapshot);
* batch description with and without value statistics;
* activation statistics (a forward with the probe's hooks minus a plain one).

It checks no budget (``bench_tracking.py`` does, on whole runs); it says which
part of a measured step is physics. Run:
``python benchmarks/bench_stat_costs.py [--width 512 2048]`` (about a minute).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from tlwidgets.core.activations import ActivationProbe
from tlwidgets.core.batches import describe
from tlwidgets.core.stats import ParamStats

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_tracking as bt  # the same models and data as the overhead benchmark


def best_us(fn: Callable[[], object], number: int = 10, repeat: int = 15) -> float:
    """Best mean CPU time of ``fn`` over ``repeat`` runs of ``number`` calls, in microseconds."""
    fn()
    out = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        out = min(out, (time.process_time() - t0) / number)
    return out * 1e6


def costs(width: int, depth: int = 3) -> dict[str, float]:
    """Microseconds per call of each statistic (and of a bare step) for one MLP."""
    model, opt, loss_fn = bt.make(width, depth)
    data = bt.batches(20)
    x, y = data[0]
    step = best_us(lambda: bt.bare_steps(model, opt, loss_fn, data), number=1, repeat=8) / len(data)
    loss_fn(model(x), y).backward()
    stats = ParamStats(list(model.parameters()))

    def exact_update() -> None:
        stats.before_step(exact=True)
        stats.after_step()

    probe = ActivationProbe(model)

    def hooked_forward() -> None:
        probe.start()
        model(x)
        probe.collect()

    plain = best_us(lambda: model(x))
    return {
        "bare training step": step,
        "exact grad norms (fused, 1 transfer)": best_us(lambda: stats.grad_norms(True)),
        "sampled grad norms": best_us(lambda: stats.grad_norms(False)),
        "sampled weight + update norms": best_us(lambda: (stats.before_step(), stats.after_step())),
        "exact weight + update norms (step_stage)": best_us(exact_update, number=3),
        "batch shapes only": best_us(lambda: describe(x, y, exact=False, stats=False)),
        "batch details (ranges, labels)": best_us(lambda: describe(x, y, exact=False, stats=True)),
        "activation statistics (hooks)": best_us(hooked_forward) - plain,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--width", type=int, nargs="+", default=[512, 2048], help="MLP widths (512: ~1M)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for width in args.width:
        got = costs(width)
        step = got["bare training step"]
        n = sum(p.numel() for p in bt.mlp(width, 3).parameters())
        print(f"MLP width {width} ({n:,} params), CPU time, best of repeats")
        for name, us in got.items():
            share = "" if name == "bare training step" else f"  {us / step:6.1%} of a step"
            print(f"  {name:42s} {us:10.1f} us{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
