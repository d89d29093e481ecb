"""Distributed-run rules: replicas of a DDP run whose weights or buffers drifted apart.

The numbers come from :class:`tlwidgets.core.distributed.RankSync` (a
watcher's ``distributed`` attribute under ``torch.distributed``): at each sync
step every rank's fingerprint (norm and sum) of every parameter and buffer,
compared with rank 0's. A rule here only turns the latest comparison into a
finding; it never runs a collective itself (rules run on one rank at a time,
at moments the ranks do not agree on).
"""

from __future__ import annotations

from typing import Any

from tlwidgets.core.findings import Finding
from tlwidgets.diagnostics.rules.base import RuleContext, rule, short_list

__all__ = ["DISTRIBUTED_RULES", "rank_divergence", "rank_divergence_at_end"]


def _check(ctx: RuleContext) -> list[Finding]:
    """A finding for the parameters and buffers that differ between ranks at the newest comparison."""
    sync: Any = getattr(ctx.session, "distributed", None)
    if sync is None:
        return []
    seen = ctx.state.get("comparisons", 0)
    if sync.comparisons == seen:  # nothing new since the last look
        return []
    ctx.state["comparisons"] = sync.comparisons
    diverged = sync.divergence
    if not diverged:
        return []
    names = [d.name for d in diverged]
    ranks = sorted({r for d in diverged for r in d.ranks})
    where = "rank " + str(ranks[0]) if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    buffers = [d.name for d in diverged if d.kind == "buffer"]
    params = [d.name for d in diverged if d.kind == "parameter"]
    what = []
    if params:
        what.append(f"{len(params)} parameter(s) ({short_list(params)})")
    if buffers:
        what.append(f"{len(buffers)} buffer(s) ({short_list(buffers)})")
    worst = max(d.rel_diff for d in diverged)
    return [
        ctx.finding(
            "rank-divergence",
            f"{' and '.join(what)} differ between the replicas on {where} and rank 0 "
            f"(relative difference up to {worst:.3g}); the ranks no longer train the same model",
            params=ctx.stable_params("rank-divergence", names),
            stage=None,
            evidence={
                "ranks": ranks,
                "diverged": {
                    d.name: {"kind": d.kind, "ranks": list(d.ranks), "rel_diff": d.rel_diff} for d in diverged
                },
                "tolerance": sync.tolerance,
                "world_size": sync.world_size,
            },
        )
    ]


@rule("rank-divergence", ["rank-divergence"], "trend")
def rank_divergence(ctx: RuleContext) -> list[Finding]:
    """Replicas differ at the latest sync step (run after measured steps; sync steps are measured).

    Declared for both kinds of session: a session without ``distributed`` (a Runner, a single
    process) returns at once.
    """
    return _check(ctx)


@rule("rank-divergence-at-end", ["rank-divergence"], "loop", sessions=("watch",))
def rank_divergence_at_end(ctx: RuleContext) -> list[Finding]:
    """Replicas differ at the last sync, when the loop ended (the watcher's closing loop event)."""
    return _check(ctx)


DISTRIBUTED_RULES = (rank_divergence, rank_divergence_at_end)
