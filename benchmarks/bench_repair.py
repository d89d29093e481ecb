"""Repair scoreboard over the bug zoo: does the first offered action fix the run?

For every broken setup of :mod:`tlwidgets.zoo` that a Runner can train (setups whose bug lives in an
own loop are skipped) and three seeds (weights and data), this does what a user clicking the first
``tlw-fix`` button does:

1. train the setup's default run (``setup.run``);
2. take the first finding, in the order ``runner.findings`` lists them (most likely cause first),
   that offers an action, and apply its first action;
3. train on for ``--epochs`` more epochs;
4. compare validation accuracy (loss for regression) with the healthy twin, trained for the same
   default run plus the same extra epochs from the same seed.

A run is **repaired** when its validation accuracy reaches at least ``--target`` (0.9) of the twin's
(for a regression twin: its validation loss is at most the twin's divided by 0.9). The report gives,
per setup, how many runs offered an action, the action taken, and how many were repaired; and over all
runs that offered one, the share repaired (the goal of issue #14 is at least 90%). Setups where no
finding offers an action are listed apart: the runner cannot act on their cause (dead units,
a detached graph, data bugs), which is a limit, not a failed repair.

The zoo is what the rules and actions were built against, so these figures are an upper bound of what
setups written elsewhere get; they catch regressions.

Usage: ``python benchmarks/bench_repair.py [--seeds 3] [--epochs 3] [--only NAME ...] [--json F]``.
Exits 1 when fewer than ``--goal`` (0.9) of the runs that offered an action were repaired.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

import tlwidgets as tlw
from tlwidgets import zoo


@dataclass
class Outcome:
    """One broken run, before and after its first action."""

    setup: str
    seed: int
    finding: str | None  # the code of the first finding that offered an action
    action: str | None  # that action's label
    message: str | None  # what apply() said it did
    score: float  # validation accuracy (loss for regression) after training on
    healthy: float  # the same for the healthy twin
    metric: str  # "accuracy" or "loss"
    repaired: bool


def _score(runner: tlw.Runner) -> tuple[float, str]:
    """Validation accuracy, or loss when the targets are not classes (regression)."""
    result = runner.evaluate()
    if "accuracy" in result:
        return float(result["accuracy"]), "accuracy"
    return float(result["loss"]), "loss"


def _train(runner: tlw.Runner, run: dict[str, Any], extra_epochs: int) -> None:
    runner.run(**run)
    runner.run(epochs=extra_epochs)


def healthy_score(setup: zoo.Setup, seed: int, run: dict[str, Any], extra_epochs: int) -> float:
    """The twin's validation score after the broken setup's default run plus the extra epochs."""
    twin = zoo.get(setup.twin)
    runner = tlw.Runner(**twin.build(seed, data_seed=seed))
    try:
        _train(runner, run, extra_epochs)
        return _score(runner)[0]
    finally:
        runner.close()


def repair_one(setup: zoo.Setup, seed: int, extra_epochs: int, target: float) -> Outcome:
    """Train ``setup``, apply the first offered action, train on, and score it against the twin."""
    runner = tlw.Runner(**setup.build(seed, data_seed=seed))
    finding = action = message = None
    try:
        with contextlib.suppress(Exception):  # a bug that raises (NaN stop, shape) is what the user sees
            runner.run(**setup.run)
        first = next((f for f in runner.findings if f.actions), None)
        if first is not None:
            finding, action = first.code, first.actions[0].label
            message = first.actions[0].apply()
            with contextlib.suppress(Exception):  # a fix that does not hold still gets scored
                runner.run(epochs=extra_epochs)
        try:
            score, metric = _score(runner)
        except Exception:  # no validation possible (the model raises): not repaired
            score, metric = math.nan, "accuracy"
    finally:
        runner.close()
    healthy = healthy_score(setup, seed, setup.run, extra_epochs)
    if metric == "accuracy":
        repaired = finding is not None and score >= target * healthy
    else:
        repaired = finding is not None and math.isfinite(score) and score <= healthy / target
    return Outcome(setup.name, seed, finding, action, message, score, healthy, metric, repaired)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setup (weights and data)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs trained after the action")
    parser.add_argument("--target", type=float, default=0.9, help="share of the twin's accuracy that counts")
    parser.add_argument("--goal", type=float, default=0.9, help="share of runs that must be repaired")
    parser.add_argument("--only", nargs="*", default=None, help="setup names (default: every broken one)")
    parser.add_argument("--json", default=None, help="write every outcome here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    setups = [
        s
        for s in zoo.setups()
        if not s.healthy and s.loop is None and s.twin and (args.only is None or s.name in args.only)
    ]
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    for setup in setups:
        for seed in range(args.seeds):
            out = repair_one(setup, seed, args.epochs, args.target)
            outcomes.append(out)
            mark = "repaired" if out.repaired else ("no action" if out.finding is None else "NOT repaired")
            print(
                f"{setup.name:28s} seed {seed}  {mark:12s}  {out.metric} {out.score:.3f} vs twin {out.healthy:.3f}"
                + (f"  [{out.finding}: {out.action}]" if out.finding else ""),
                flush=True,
            )
    acted = [o for o in outcomes if o.finding is not None]
    repaired = [o for o in acted if o.repaired]
    share = len(repaired) / len(acted) if acted else math.nan
    print()
    print(f"{len(outcomes)} broken runs in {time.perf_counter() - t0:.0f} s")
    print(f"offered an action: {len(acted)} ({len(acted) / max(len(outcomes), 1):.0%})")
    print(
        f"repaired by the first action: {len(repaired)} of {len(acted)} ({share:.0%}; goal {args.goal:.0%})"
    )
    silent = sorted({o.setup for o in outcomes if o.finding is None})
    if silent:
        print("no action offered (the runner cannot act on the cause): " + ", ".join(silent))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(o) for o in outcomes], fh, indent=1)
    return 0 if acted and share >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
