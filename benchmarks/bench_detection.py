"""Detection scoreboard over the bug zoo: what a plain run reports, read from ``findings`` only.

For every broken setup of :mod:`tlwidgets.zoo` and three seeds (weights and data), the setup is trained
two ways, with no check function called:

* ``runner``: ``tlw.Runner(**setup.build()).run(**setup.run)`` (setups whose bug lives in an own loop
  are skipped: a Runner owns its loop);
* ``watch``: the same parts trained by a plain loop under ``tlw.watch`` (epochs of zero_grad, forward,
  loss, backward, step, then validation under ``no_grad``), or the setup's own loop.

It reports, per path, the share of runs where an expected code is among the findings (detected), is the
first finding (root cause first) and is in the top three; and, for the healthy setups, every warning or
error (false alarms). The zoo is what the rules were built against, so these figures are an upper bound
of what setups written elsewhere get; they catch regressions.

Usage: ``python benchmarks/bench_detection.py [--seeds 3] [--only NAME ...] [--json out.json]``.
Exits 1 when a healthy run raised a warning or an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any

import torch

import tlwidgets as tlw
from tlwidgets import zoo


def plain_loop(parts: dict[str, Any], epochs: int = 1, **_: Any) -> None:
    """The loop most people write: train an epoch, then validate under no_grad."""
    model, loss_fn, opt = parts["model"], parts["loss_fn"], parts["optimizer"]
    sched, interval = parts.get("scheduler"), parts.get("scheduler_interval", "epoch")
    # The modes the setup left (a frozen backbone's batch norm in eval mode): model.train() would undo
    # them, which is a bug of its own (frozen-bn-stats-drift), not the setup's.
    modes = [(m, m.training) for m in model.modules()]
    for _ in range(epochs):
        for m, mode in modes:
            m.train(mode)
        for batch in parts["train_data"]:
            x, y = batch[0], batch[1]
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None and interval == "step":
                sched.step()
        if sched is not None and interval == "epoch":
            sched.step()
        if parts.get("val_data") is not None:
            model.eval()
            with torch.no_grad():
                for batch in parts["val_data"]:
                    loss_fn(model(batch[0]), batch[1])


def run_one(setup: zoo.Setup, seed: int, path: str) -> list[tuple[str, str]] | None:
    """``(code, severity)`` of the findings, most likely cause first; None when the path does not apply."""
    if path == "runner":
        if setup.loop is not None:
            return None
        parts = setup.build(seed, data_seed=seed)
        session = tlw.Runner(**parts)
        session.run(**setup.run)
    else:
        if setup.loop is not None:
            session = setup.watch(seed, data_seed=seed)
        else:
            parts = setup.build(seed, data_seed=seed)
            if "steps" in setup.run:
                return None  # the plain loop runs whole epochs
            try:
                with tlw.watch(parts["model"], parts["optimizer"], loss_fn=parts["loss_fn"]) as session:
                    plain_loop(parts, **setup.run)
            except Exception:  # the bug raises in the loop (shape, dtype, ...): what the watcher saw
                pass
    return [(f.code, str(f.severity)) for f in session.findings]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--paths", nargs="*", default=["runner", "watch"], choices=["runner", "watch"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = args.only or zoo.names(healthy=False) + zoo.names(healthy=True)
    rows = []
    t0 = time.perf_counter()
    for name in names:
        setup = zoo.get(name)
        for path in args.paths:
            for seed in range(args.seeds):
                try:
                    got = run_one(setup, seed, path)
                except Exception as exc:  # the setup raised where the session should have handled it
                    got = [("<raised>", f"{type(exc).__name__}: {exc}")]
                if got is None:
                    continue
                codes = [c for c, _ in got]
                row = {"setup": name, "path": path, "seed": seed, "healthy": setup.healthy, "codes": codes}
                if setup.healthy:
                    row["alarms"] = [c for c, sev in got if sev in ("warning", "error")]
                else:
                    exp = set(setup.expected)
                    row["detected"] = bool(exp & set(codes))
                    row["first"] = bool(codes) and codes[0] in exp
                    row["top3"] = bool(exp & set(codes[:3]))
                rows.append(row)
                mark = (
                    ("ALARM " + ",".join(row["alarms"]) if row["alarms"] else "ok")
                    if setup.healthy
                    else (
                        "first"
                        if row["first"]
                        else "top3"
                        if row["top3"]
                        else "found"
                        if row["detected"]
                        else "MISSED"
                    )
                )
                print(f"{name:<32} {path:<6} seed {seed}: {mark:<10} {codes[:4]}", flush=True)
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    alarms = 0
    for path in ("runner", "watch"):
        broken = [r for r in rows if r["path"] == path and not r["healthy"]]
        healthy = [r for r in rows if r["path"] == path and r["healthy"]]
        if broken:
            n = len(broken)
            print(
                f"{path:<6}: {n} broken runs: detected {sum(r['detected'] for r in broken) / n:.0%}, "
                f"root cause first {sum(r['first'] for r in broken) / n:.0%}, "
                f"top three {sum(r['top3'] for r in broken) / n:.0%}"
            )
        loud = [r for r in healthy if r["alarms"]]
        alarms += len(loud)
        print(f"{path:<6}: {len(healthy)} healthy runs, {len(loud)} with a warning or error")
        for r in loud:
            print(f"        {r['setup']} seed {r['seed']}: {r['alarms']}")
        for r in broken:
            if not r["top3"]:
                print(f"        not in top three: {r['setup']} seed {r['seed']}: {r['codes'][:5]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
