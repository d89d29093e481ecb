"""``tlw.watch()`` in a DDP run: 2 gloo ranks on CPU, started with ``torch.multiprocessing.spawn``.

Every scenario runs in one spawn (starting processes and importing torch costs seconds; the
scenarios take well under a second each): the workers write what their watchers saw to a JSON file
per rank, and each test reads the scenario it is about. A deadlock fails the fixture through its
timeout instead of hanging the suite.

Without the sync of ``tlwidgets.core.distributed`` rank 0 would not see rank 1's finding, a
replica changed by hand or a buffer that is not broadcast, and its loss history would be its own
shard's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_rules_support import cnn_bn, digits, mlp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tlwidgets as tlw
from tlwidgets.core import distributed

WORLD = 2
#: Seconds the whole spawn may take before the fixture fails (a deadlock, not a slow machine).
SPAWN_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------- the workers
def _batches(
    rank: int, steps: int, batch: int = 32, scale: float = 1.0, seed: int = 0
) -> list[tuple[Any, Any]]:
    """Rank ``rank``'s shard of the digits, ``steps`` batches (each rank its own examples)."""
    x, y = digits(1200)
    x, y = x[rank::WORLD] * scale, y[rank::WORLD]
    g = torch.Generator().manual_seed(seed + rank)
    out = []
    while len(out) < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            out.append((x[idx], y[idx]))
    return out[:steps]


def _summary(w: Any, local_losses: list[float]) -> dict[str, Any]:
    sync = w.distributed
    return {
        "findings": [
            {
                "code": f.code,
                "severity": f.severity,
                "message": f.message,
                "params": list(f.params),
                "ranks": f.evidence.get("ranks"),
            }
            for f in w.findings
        ],
        "loss": [float(v) for v in w.history.loss],
        "local": local_losses,
        "steps": int(w.global_step),
        "stopped": sync.stopped if sync is not None else "no sync",
        "syncs": sync.syncs if sync is not None else 0,
        "sync_seconds": sync.sync_seconds if sync is not None else 0.0,
        "errors": list(w.diagnostic_errors),
    }


def _train(
    rank: int,
    *,
    model: nn.Module,
    steps: int = 60,
    lr: float = 0.05,
    momentum: float = 0.0,
    wrap: bool = True,
    watch_inner: bool = False,
    broadcast_buffers: bool = True,
    leave_out: str | None = None,
    scale: float = 1.0,
    tamper: tuple[int, int, str] | None = None,
    raise_at: tuple[int, int] | None = None,
    accumulate: int = 1,
    validate_every: int = 0,
    local_step_at: int | None = None,
    set_lr_at: tuple[int, int, float] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A plain DDP loop under ``tlw.watch``; returns what rank ``rank``'s watcher saw."""
    ddp = DDP(model, broadcast_buffers=broadcast_buffers) if wrap else model
    params = [p for n, p in model.named_parameters() if n != leave_out]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    crit = nn.CrossEntropyLoss()
    local: list[float] = []
    x_val, y_val = digits(64, offset=1200)
    w = tlw.watch(model if watch_inner else ddp, opt, loss_fn=crit, **options)
    start = time.perf_counter()
    try:
        with w:
            for step, (x, y) in enumerate(_batches(rank, steps, scale=scale)):
                if raise_at is not None and raise_at == (rank, step):
                    raise RuntimeError("rank left the loop")
                opt.zero_grad()
                # Gradient accumulation the DDP way: no all-reduce on all but the last micro-batch.
                for i, (xb, yb) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
                    last = i == accumulate - 1
                    with contextlib.nullcontext() if last or not wrap else ddp.no_sync():
                        loss = crit(ddp(xb), yb)
                        (loss / accumulate).backward()
                if step == local_step_at:  # the bug: a step on gradients that were never all-reduced
                    with ddp.no_sync():
                        crit(ddp(x), y).backward()
                    opt.step()
                    opt.zero_grad()
                opt.step()
                local.append(float(loss.detach()))
                if set_lr_at is not None and set_lr_at[:2] == (rank, step):
                    w.set_lr(set_lr_at[2])  # a dashboard's slider on one rank only
                if validate_every and step % validate_every == 0:
                    ddp.eval()
                    with torch.no_grad():  # held-out examples (the same ones would be data leakage)
                        crit(ddp(x_val), y_val)
                    ddp.train()
                if tamper is not None and tamper[:2] == (rank, step):
                    with torch.no_grad():
                        dict(model.named_parameters())[tamper[2]].add_(1.0)
    except RuntimeError as exc:
        if "rank left the loop" not in str(exc):
            raise
    out = _summary(w, local)
    out["seconds"] = time.perf_counter() - start
    return out


def _scenarios(rank: int) -> dict[str, dict[str, Any]]:
    torch.manual_seed(0)
    res: dict[str, dict[str, Any]] = {}
    res["healthy"] = _train(rank, model=mlp((64, 32, 10)))
    res["healthy-bn-inner"] = _train(rank, model=cnn_bn(classes=10), watch_inner=True)
    res["not-in-optimizer"] = _train(rank, model=mlp((64, 32, 10)), leave_out="2.bias", steps=30)
    res["lr-too-high"] = _train(rank, model=mlp((64, 32, 10)), lr=3.0, momentum=0.9, steps=30)
    res["lr-too-low"] = _train(rank, model=mlp((64, 32, 10)), lr=1e-6, steps=30)
    res["tampered"] = _train(rank, model=mlp((64, 32, 10)), tamper=(1, 20, "0.weight"), steps=40)
    sparse = {"dense_steps": 20, "measure_every": 10}  # syncs at steps 0-19, then 20, 30, 40, 50
    res["tampered-inner"] = _train(
        rank, model=mlp((64, 32, 10)), watch_inner=True, tamper=(1, 43, "2.weight"), steps=60, **sparse
    )
    # Ranks given different schedules: all follow rank 0's (else they would meet at different steps).
    mixed = {"dense_steps": 5} if rank == 0 else {"dense_steps": 10, "measure_every": 7}
    res["mixed-options"] = _train(rank, model=mlp((64, 32, 10)), steps=45, **mixed)
    # Accumulation under no_sync() with batch norm and no-grad validation: DDP skips the buffer
    # broadcast before some forwards, healthy all the same.
    res["accumulate-bn"] = _train(rank, model=cnn_bn(classes=10), accumulate=2, validate_every=3, steps=30)
    res["accumulate-bn-inner"] = _train(
        rank, model=cnn_bn(classes=10), accumulate=2, validate_every=3, steps=30, watch_inner=True
    )
    res["step-under-no-sync"] = _train(rank, model=mlp((64, 32, 10)), local_step_at=10, steps=20)
    res["set-lr-on-rank0"] = _train(rank, model=mlp((64, 32, 10)), set_lr_at=(0, 8, 0.2), steps=20)
    res["opted-out"] = _train(rank, model=mlp((64, 32, 10)), steps=10, sync_ranks=False)
    res["buffers-not-broadcast"] = _train(rank, model=cnn_bn(classes=10), broadcast_buffers=False, steps=20)
    res["rank1-only"] = _train(rank, model=mlp((64, 32, 10)), scale=1.0 if rank == 0 else 300.0, steps=20)
    # Last: rank 1 leaves its loop with an exception at step 5 while rank 0 goes on (a model without
    # DDP, so only tlwidgets could make rank 0 wait); its next sync must give up, not hang.
    res["rank1-raises"] = _train(rank, model=mlp((64, 32, 10)), wrap=False, raise_at=(1, 5), steps=40)
    return res


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["TLW_STRICT_RULES"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    distributed.TIMEOUT_S = 20.0  # a rank that never comes fails fast here (the store says so sooner)
    try:
        res = _scenarios(rank)
    except BaseException:
        res = {"crash": traceback.format_exc()}
    _finish(rank, out_dir, res)


def _finish(rank: int, out_dir: str, res: dict[str, Any]) -> None:
    """Write this rank's results, wait for every rank's, then leave without any teardown.

    A rank that finished first must not exit on its own: a gloo or Lightning teardown racing a
    peer that is still running has ended in SIGABRT on some machines (seen in CI), and a spawn
    whose process dies takes its siblings down before they wrote their results. The results are
    what the tests judge; the teardown is torch's, not under test.
    """
    out = Path(out_dir)
    tmp = out / f"rank{rank}.json.part"
    tmp.write_text(json.dumps(res))
    tmp.rename(out / f"rank{rank}.json")  # atomic: the parent never reads half a file
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline and not all((out / f"rank{r}.json").exists() for r in range(WORLD)):
        time.sleep(0.1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn: Any, args: tuple[Any, ...], tmp: Path, what: str) -> list[dict[str, Any]]:
    """Run ``fn(rank, *args)`` on 2 processes; each writes ``tmp/rank<r>.json``; fail on a deadlock.

    The processes are watched one by one rather than through ``ProcessContext.join``, which
    terminates every other process as soon as one exits badly, results written or not.
    """
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while any(p.is_alive() for p in ctx.processes):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {SPAWN_TIMEOUT_S} s (deadlock?)")
        time.sleep(0.2)
    for p in ctx.processes:
        p.join()
    bad = [f"rank {r}: exit code {p.exitcode}" for r, p in enumerate(ctx.processes) if p.exitcode != 0]
    exit_error = "; ".join(bad) or None
    files = [tmp / f"rank{r}.json" for r in range(WORLD)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"{what}: no results from {missing} ({exit_error})"
    out = [json.loads(f.read_text()) for f in files]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    if exit_error is not None:  # every result is in: a process died in teardown, outside the test
        warnings.warn(f"{what}: a process exited badly after writing its results: {exit_error}", stacklevel=2)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run every scenario on 2 gloo ranks; the results of rank 0 and rank 1."""
    tmp = tmp_path_factory.mktemp("ddp")
    return _spawn(_worker, (str(tmp / "init"), str(tmp)), tmp, "the 2-rank run")


def _problems(res: dict[str, Any]) -> list[str]:
    return [f"{f['code']}: {f['message']}" for f in res["findings"] if f["severity"] in ("warning", "error")]


def _top3(res: dict[str, Any]) -> list[str]:
    return [f["code"] for f in res["findings"][:3]]


def _find(res: dict[str, Any], code: str) -> dict[str, Any]:
    got = [f for f in res["findings"] if f["code"] == code]
    assert got, f"no {code} in {[f['code'] for f in res['findings']]}"
    return got[0]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("scenario", ["healthy", "healthy-bn-inner"])
def test_healthy_ddp_run_is_silent_and_has_one_loss_per_step(ranks, scenario) -> None:
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert _problems(r0) == [] and _problems(r1) == []
    assert r0["errors"] == [] and r1["errors"] == []
    assert len(r0["loss"]) == r0["steps"] == 60
    assert r0["stopped"] == "finished" and r0["syncs"] == 61  # 60 steps (all dense) and the end


def test_rank0_loss_is_the_mean_over_ranks(ranks) -> None:
    r0, r1 = ranks[0]["healthy"], ranks[1]["healthy"]
    mean = (np.array(r0["local"]) + np.array(r1["local"])) / 2
    np.testing.assert_allclose(r0["loss"], mean, rtol=1e-6)
    assert not np.allclose(r0["loss"], r0["local"])  # not rank 0's own shard


@pytest.mark.parametrize(
    "scenario, code, named",
    [
        ("not-in-optimizer", "param-not-in-optimizer", "2.bias"),
        ("lr-too-high", "lr-too-high", "0.weight"),
        ("lr-too-low", "lr-too-low", "0.weight"),
    ],
)
def test_the_bug_is_named_in_rank0s_top_three(ranks, scenario, code, named) -> None:
    r0 = ranks[0][scenario]
    assert code in _top3(r0), r0["findings"]
    assert any(p.endswith(named) for p in _find(r0, code)["params"])
    # Every rank raised it: listed once, naming both.
    assert _find(r0, code)["ranks"] == [0, 1]


def test_a_replica_changed_by_hand_is_rank_divergence(ranks) -> None:
    r0 = ranks[0]["tampered"]
    f = _find(r0, "rank-divergence")
    assert f["params"] == ["module.0.weight"] and f["severity"] == "error"
    assert "rank 1" in f["message"] and f["ranks"] == [1]
    assert "rank-divergence" in _top3(r0)
    assert "rank-divergence" not in [g["code"] for g in ranks[0]["healthy"]["findings"]]


def test_divergence_in_the_sparse_phase_of_the_inner_module(ranks) -> None:
    """Watching the module inside DDP; the change at step 43, in the sparse phase (found at step 50)."""
    r0 = ranks[0]["tampered-inner"]
    f = _find(r0, "rank-divergence")
    assert f["params"] == ["2.weight"] and "rank 1" in f["message"]
    assert r0["syncs"] == 20 + 4 + 1  # dense for 20 steps, then every 10th (20..50), the end


def test_every_rank_follows_rank0s_sync_schedule(ranks) -> None:
    r0, r1 = ranks[0]["mixed-options"], ranks[1]["mixed-options"]
    assert r0["stopped"] == r1["stopped"] == "finished"
    assert r0["syncs"] == r1["syncs"] == 5 + 2 + 1  # steps 0-4, 20, 40 and the end
    np.testing.assert_allclose(r0["loss"][:5], r1["loss"][:5])  # both record the mean there


@pytest.mark.parametrize("scenario", ["accumulate-bn", "accumulate-bn-inner"])
def test_accumulation_under_no_sync_with_batch_norm_is_healthy(ranks, scenario) -> None:
    r0 = ranks[0][scenario]
    assert _problems(r0) == [] and r0["errors"] == []
    assert len(r0["loss"]) == r0["steps"] == 30


def test_a_step_on_gradients_never_all_reduced_is_rank_divergence(ranks) -> None:
    r0 = ranks[0]["step-under-no-sync"]
    f = _find(r0, "rank-divergence")
    assert set(f["params"]) == {"module.0.weight", "module.0.bias", "module.2.weight", "module.2.bias"}
    assert "rank 1" in f["message"]


def test_set_lr_on_rank0_alone_is_rank_divergence(ranks) -> None:
    f = _find(ranks[0]["set-lr-on-rank0"], "rank-divergence")
    assert "module.0.weight" in f["params"] and "rank 1" in f["message"]


def test_buffers_that_are_not_broadcast_are_rank_divergence(ranks) -> None:
    r0 = ranks[0]["buffers-not-broadcast"]
    f = _find(r0, "rank-divergence")
    assert f["params"] and all("running_" in p for p in f["params"]), f["params"]
    assert "buffer" in f["message"] and "rank 1" in f["message"]


def test_a_finding_only_rank1_sees_reaches_rank0_naming_rank1(ranks) -> None:
    r0, r1 = ranks[0]["rank1-only"], ranks[1]["rank1-only"]
    assert "input-not-normalized" in [f["code"] for f in r1["findings"]]
    f = _find(r0, "input-not-normalized")
    assert f["ranks"] == [1] and f["message"].startswith("on rank 1: ")
    assert len([g for g in r0["findings"] if g["code"] == "input-not-normalized"]) == 1


def test_an_exception_on_one_rank_does_not_hang_the_other(ranks) -> None:
    r0, r1 = ranks[0]["rank1-raises"], ranks[1]["rank1-raises"]
    assert r1["steps"] == 5 and "exception" in r1["stopped"]
    assert r0["steps"] == 40 and len(r0["loss"]) == 40
    assert "left" in r0["stopped"]
    assert r0["seconds"] < 10  # told by the store, not by the 20 s timeout


def test_sync_ranks_false_watches_each_rank_alone(ranks) -> None:
    r0 = ranks[0]["opted-out"]
    assert r0["stopped"] == "no sync" and r0["loss"] == pytest.approx(r0["local"])


def test_single_process_watch_has_no_sync() -> None:
    assert not dist.is_initialized()
    model = mlp((64, 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for x, y in _batches(0, 5):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    assert w.distributed is None and len(w.history.loss) == 5
    assert all("ranks" not in f.evidence for f in w.findings)


def test_fingerprints_see_small_drifts_and_not_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    ref = distributed.fingerprints([w])
    same, _ = distributed._differs(ref, distributed.fingerprints([w.clone()]), distributed.TOLERANCE)
    assert not same.any()
    # The same tensor summed in another order (another thread count) rounds differently.
    shuffled = w.reshape(-1)[torch.randperm(w.numel())].reshape(w.shape)
    rounding, _ = distributed._differs(ref, distributed.fingerprints([shuffled]), distributed.TOLERANCE)
    assert not rounding.any()
    # One SGD step at an update/weight ratio of 1e-4, orthogonal-ish to the weights.
    step = torch.randn_like(w) * (1e-4 * w.norm() / w.numel() ** 0.5)
    drift, rel = distributed._differs(ref, distributed.fingerprints([w + step]), distributed.TOLERANCE)
    assert drift.all(), rel
    ints = distributed.fingerprints([torch.tensor(7), torch.zeros(3, dtype=torch.bfloat16)])
    assert np.isfinite(ints).all()


# ------------------------------------------------------------------------- Lightning's DDP strategy
def _lightning_fit(rank: int, L: Any, tamper_at: int | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    from tlwidgets.integrations.lightning import DebugCallback

    class DigitsMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp((64, 32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if tamper_at is not None and self.global_step == tamper_at and self.global_rank == 1:
                with torch.no_grad():
                    self.net[0].weight.add_(1.0)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = digits(1200)
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    cb = DebugCallback()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(DigitsMLP(), data)
    return _summary(cb.session, [])


def _lightning_worker(rank: int, port: int, out_dir: str) -> None:
    import logging

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    # What torchrun sets: Lightning then joins this process group instead of launching processes.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        TLW_STRICT_RULES="1",
    )
    distributed.TIMEOUT_S = 20.0
    try:
        import lightning.pytorch as L

        res = {"healthy": _lightning_fit(rank, L, None), "tampered": _lightning_fit(rank, L, 12)}
    except BaseException:
        res = {"crash": traceback.format_exc()}
    _finish(rank, out_dir, res)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lightning_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two Lightning DDP fits (healthy, then a replica changed by hand) with DebugCallback, 2 ranks."""
    pytest.importorskip("lightning")
    tmp = tmp_path_factory.mktemp("lightning-ddp")
    return _spawn(_lightning_worker, (_free_port(), str(tmp)), tmp, "the 2-rank Lightning fit")


def test_lightning_ddp_fit_with_the_callback_covers_both_ranks(lightning_ranks) -> None:
    r0, r1 = lightning_ranks[0]["healthy"], lightning_ranks[1]["healthy"]
    assert _problems(r0) == [] and _problems(r1) == [] and r0["errors"] == []
    assert r0["steps"] == 30 and len(r0["loss"]) == 30
    assert r0["syncs"] == 31 and r0["stopped"] == "finished"
    np.testing.assert_allclose(r0["loss"], r1["loss"])  # both hold the mean over the ranks


def test_lightning_ddp_replica_changed_by_hand_is_rank_divergence(lightning_ranks) -> None:
    r0 = lightning_ranks[0]["tampered"]
    f = _find(r0, "rank-divergence")
    assert f["params"] == ["net.0.weight"] and "rank 1" in f["message"]
    assert "rank-divergence" in _top3(r0)


def test_structure_hash_ignores_wrapper_prefixes_and_sees_shapes() -> None:
    a = mlp((64, 32, 10))
    named = list(a.named_parameters())
    wrapped = [(f"module._orig_mod.{n}", p) for n, p in named]
    assert distributed._structure_hash(named) == distributed._structure_hash(wrapped)
    other = list(mlp((64, 16, 10)).named_parameters())
    assert distributed._structure_hash(named) != distributed._structure_hash(other)
    assert not distributed._sharded(a)


def test_non_finite_fingerprints_differ_only_when_one_side_is_not_finite() -> None:
    nan = np.array([[np.nan, np.nan]])
    one = np.array([[1.0, 0.5]])
    assert not distributed._differs(nan, nan, 1e-5)[0][0]  # both diverged to NaN: the same
    assert distributed._differs(one, nan, 1e-5)[0][0] and distributed._differs(nan, one, 1e-5)[0][0]


def _aborting_worker(rank: int, out_dir: str) -> None:
    """Rank 1 writes at once and dies with SIGABRT (a teardown crash); rank 0 writes a second later."""
    if rank == 0:
        time.sleep(1.0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank}))
    if rank == 1:
        os.abort()


def test_a_rank_that_dies_after_writing_does_not_take_the_other_down(tmp_path: Path) -> None:
    # What failed CI once: rank 1 aborted in teardown, and the spawn killed rank 0 before it wrote.
    with pytest.warns(UserWarning, match="rank 1: exit code -6"):
        out = _spawn(_aborting_worker, (str(tmp_path),), tmp_path, "the aborting pair")
    assert out == [{"rank": 0}, {"rank": 1}]
