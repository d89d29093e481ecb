"""Distributed (DDP) runs: a watcher on every rank, and rank 0 speaking for all of them.

Under ``torch.distributed`` (any backend, world size > 1) each rank's
:class:`~tlwidgets.core.watch.Watcher` gets a :class:`RankSync` (its
``distributed`` attribute; ``None`` in a single process, where nothing here
runs and nothing costs). At **sync steps** every rank contributes one small
float64 vector to one ``all_gather``:

* a header (what kind of sync, the step, the rank's loss, how many bytes of
  new findings it has to send, ...);
* a **fingerprint** of every parameter (after ``optimizer.step()``) and of
  every buffer (at the start of the step's forward, after DDP broadcast
  them): the tensor's norm and its sum, two numbers per tensor whatever its
  size. DDP replicas are bitwise equal after each step (the same averaged
  gradient, the same optimizer), so any difference beyond floating-point
  reduction noise means the replicas drifted apart (``rank-divergence``).

Only when some rank has new findings to send does a second collective follow
(their pickled bytes, padded to the longest): every rank sees the byte counts
in the first gather, so all of them agree whether it happens.

Sync schedule
-------------
A collective deadlocks unless every rank calls it, so sync steps follow a
rule all ranks agree on: the watcher's *base* measuring schedule, ``step <
dense_steps or step % measure_every == 0`` (rank 0's options, adopted by all
at the first sync, step 0). Dense phases after a control change or an LR jump
are rank-local and add measured steps only on that rank: they never add sync
steps. Every sync step is a measured step on a rank with the same options, so
per-parameter statistics and rules see the reduced loss. A clean end of the
``with`` block is one more sync (the findings of the loop's end, a last
fingerprint); an exception or interrupt never issues one.

Never hanging inside tlwidgets
------------------------------
The collectives run on a process group of their own (gloo on CPU, so a
mismatch can never shift the sequence of the user's collectives, and timeouts
work on any device), asynchronously, waited for in short slices. A rank that
leaves (its ``with`` block ended by an exception, or it gave up waiting)
says so in the job's store; a waiting rank checks the store between slices
and stops syncing as soon as a peer left, or after ``timeout_s`` at the most.
Ranks that disagree about what a sync is (different steps, one at its end)
all see it in the same gather and all stop. Once stopped, a rank never issues
another collective; its watcher goes on alone (``RankSync.stopped`` says why).

What is reduced
---------------
On sync steps the history's loss is the mean over the ranks' finite losses
(``rank_losses`` keeps the last per-rank values); on the other steps it is the
rank's own. Gradient, weight and update norms are not reduced: after DDP's
all-reduce the gradients, hence the weights and updates, are the same on every
rank (which is what the fingerprints check). Findings of other ranks reach
rank 0 at the next sync, with the rank in their message and
``evidence["ranks"]``; a finding several ranks raise is listed once, "on ranks
0, 1".
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import logging
import math
import pickle
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.findings import Finding
from tlwidgets.core.stats import to_host

__all__ = ["Divergence", "RankSync", "attach", "fingerprints", "is_distributed"]

log = logging.getLogger(__name__)

#: Relative difference of a fingerprint above which two replicas differ. Replicas of a healthy DDP
#: run are bitwise equal; the same tensor reduced in another order (another thread count) differs by
#: about 1e-7 of its norm in float32, so 1e-5 leaves a wide margin and still sees a drift of one SGD
#: step at an update/weight ratio of 1e-4.
TOLERANCE = 1e-5
#: Seconds a rank waits at a sync for the others before it stops syncing (a peer that died or hangs).
TIMEOUT_S = 60.0
#: Seconds between looks at the store for a peer that left, while waiting.
_POLL_S = 0.2
#: Findings' evidence larger than this (pickled) is not sent to rank 0.
_MAX_EVIDENCE_BYTES = 16_384
#: Header of the gathered vector: kind, step, loss, finding bytes, buffers taken, structure hash,
#: measure_every, dense_steps.
_H = 8
_STEP, _FINAL = 1.0, 2.0
#: Codes computed on every rank from the same gathered numbers: never forwarded.
_LOCAL_CODES = frozenset({"rank-divergence"})

_GROUP: Any = None  # tlwidgets' own process group, shared by every watcher of the process
_GROUP_FOR: Any = None  # the default group it was made for (a new init_process_group makes a new one)
_SESSIONS = itertools.count()


def is_distributed() -> bool:
    """A ``torch.distributed`` process group is initialized with more than one rank."""
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    except Exception:  # a torch build without distributed, or a half-initialized group
        return False


@dataclasses.dataclass(frozen=True)
class Divergence:
    """A parameter or buffer whose value differs between replicas.

    Attributes
    ----------
    name
        Its name in the watched model (``module.`` prefix and all, as the watcher names it).
    kind
        ``"parameter"`` or ``"buffer"``.
    ranks
        Ranks whose copy differs from rank 0's.
    rel_diff
        Largest relative difference of the fingerprints (norm or sum) over those ranks.
    """

    name: str
    kind: str
    ranks: tuple[int, ...]
    rel_diff: float


def fingerprints(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """``(len(tensors), 2)`` float64 array: each tensor's norm and sum (NaN where unreadable).

    Floating-point tensors are reduced in their own dtype (float32 for half
    precision) on their own device: one fused norm over all of them, one sum
    each, and one transfer per device. Integer and bool tensors (a batch-norm
    layer's ``num_batches_tracked``) are converted to float64 first.
    """
    n = len(tensors)
    out = np.full((n, 2), np.nan)
    if not n:
        return out
    with torch.no_grad():
        native, low, other = [], [], []
        for i, t in enumerate(tensors):
            if t.layout != torch.strided or t.device.type == "meta" or t.is_complex():
                continue
            if t.dtype in (torch.float32, torch.float64):
                native.append(i)
            elif t.is_floating_point():
                low.append(i)
            else:
                other.append(i)
        values: list[torch.Tensor] = []
        order: list[int] = []
        for idx, dtype in ((native, None), (low, torch.float32)):
            if not idx:
                continue
            ts = [tensors[i].detach() for i in idx]
            norms = torch._foreach_norm(ts, 2, dtype=dtype) if dtype else torch._foreach_norm(ts)
            values += [v.double() for v in norms] + [t.sum(dtype=dtype).double() for t in ts]
            order += [2 * i for i in idx] + [2 * i + 1 for i in idx]
        for i in other:
            t = tensors[i].detach().double()
            values += [torch.linalg.vector_norm(t), t.sum()]
            order += [2 * i, 2 * i + 1]
        if values:
            out.reshape(-1)[order] = to_host(values)
    return out


def _differs(ref: np.ndarray, other: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor: does ``other`` (fingerprints, ``(n, 2)``) differ from ``ref``, and by how much?

    The norm is compared relative to the larger norm; the sum relative to the
    larger of the norms and the sums (a sum of zero-mean weights is near zero,
    its rounding scales with the norm; a sum of positive values, a variance
    buffer, scales with itself). NaN on both sides is equal; on one side, not.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        # fmax ignores a NaN side without the all-NaN warning of nanmax (NaN is settled below).
        scale = np.fmax(np.abs(ref[:, 0]), np.abs(other[:, 0]))
        sum_scale = np.fmax(scale, np.fmax(np.abs(ref[:, 1]), np.abs(other[:, 1])))
        d_norm = np.abs(ref[:, 0] - other[:, 0]) / np.maximum(scale, 1e-30)
        d_sum = np.abs(ref[:, 1] - other[:, 1]) / np.maximum(sum_scale, 1e-30)
    rel = np.fmax(d_norm, d_sum)
    nan_ref, nan_other = np.isnan(ref).any(axis=1), np.isnan(other).any(axis=1)
    both = nan_ref & nan_other
    rel = np.where(both, 0.0, np.where(nan_ref | nan_other, np.inf, rel))
    return rel > tol, rel


def _strip(name: str) -> str:
    """A name without the wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    while True:
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        else:
            return name


def _structure_hash(named: Iterable[tuple[str, torch.Tensor]]) -> float:
    """A number equal on ranks holding the same tensors (names without wrapper prefixes, shapes)."""
    text = ";".join(f"{_strip(n)}:{tuple(t.shape)}:{t.dtype}" for n, t in named)
    return float(zlib.crc32(text.encode()))


def _ddp_inner(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module DDP runs (its ``.module``) and whether ``model`` is a DDP wrapper."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except Exception:
        return model, False
    if isinstance(model, DistributedDataParallel):
        return model.module, True
    return model, False


def _active_ddp() -> Any:
    """The DDP wrapper whose forward is running now (torch records it for its compiler), or ``None``."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except Exception:
        return None
    return getattr(DistributedDataParallel, "_active_ddp_module", None)


def _sharded(model: nn.Module) -> bool:
    """FSDP and tensor-parallel models hold a different shard on each rank: nothing to compare."""
    name = type(model).__name__
    if name in ("FullyShardedDataParallel", "FSDPModule") or any(
        type(m).__name__.startswith("FSDP") for m in model.modules()
    ):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _group(timeout_s: float) -> Any:
    """tlwidgets' own gloo group (made once per default group; a collective over all ranks)."""
    import torch.distributed as dist

    global _GROUP, _GROUP_FOR
    default = dist.group.WORLD
    if _GROUP is None or _GROUP_FOR is not default:
        backend = "gloo" if dist.is_gloo_available() else None
        _GROUP = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        _GROUP_FOR = default
    return _GROUP


def _default_store() -> Any:
    """The job's key-value store (where a leaving rank says so), or ``None`` if torch hides it."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


class RankSync:
    """One watcher's share of a distributed run; see the module docstring.

    Parameters
    ----------
    session
        The watcher (its ``model``, ``tracker``, ``param_names``, ``global_step``
        and findings log are read).
    timeout_s
        Longest wait at a sync for the other ranks before this rank stops syncing
        (default :data:`TIMEOUT_S`).
    tolerance
        Relative fingerprint difference that counts as replicas drifting apart
        (default :data:`TOLERANCE`).

    Attributes
    ----------
    rank, world_size
        This process's rank and the number of ranks.
    stopped
        ``None`` while syncing; otherwise why this rank stopped (a peer left,
        a timeout, ranks out of step, an internal error). No collective is
        issued after that.
    replicated
        Whether the model is a replica on every rank: ``True`` for a DDP
        wrapper, or for a model whose parameters were equal on all ranks at
        the first comparison; ``False`` for models that differ by design
        (other shapes, a sharded model, independent models per rank), which
        are never reported as diverging. ``None`` until known.
    divergence
        The parameters and buffers that differed at the latest comparison.
    comparisons
        How many fingerprint comparisons were made (rules use it to see a new one).
    rank_losses
        Each rank's loss at the latest sync.
    syncs
        Sync steps completed.
    """

    def __init__(
        self, session: Any, *, timeout_s: float | None = None, tolerance: float | None = None
    ) -> None:
        import torch.distributed as dist

        self.session = session
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Read at construction (not bound as defaults) so a test or a job can set the module's values.
        self.timeout_s = float(TIMEOUT_S if timeout_s is None else timeout_s)
        self.tolerance = float(TOLERANCE if tolerance is None else tolerance)
        self.stopped: str | None = None
        self.replicated: bool | None = None
        self.divergence: tuple[Divergence, ...] = ()
        self.comparisons = 0
        self.rank_losses = np.full(self.world_size, np.nan)
        self.syncs = 0
        self.sync_seconds = 0.0  # time spent in collectives (for the docs' cost figure)
        self._id = next(_SESSIONS)
        model = session.model
        inner, self._ddp = _ddp_inner(model)
        #: Forward pre-hooks go here: DDP broadcasts the buffers before it calls it.
        self.forward_module = inner
        self._buffers: list[tuple[str, torch.Tensor]] = list(model.named_buffers())
        self._params: list[torch.Tensor] = list(session.tracker.params)
        self._param_names: list[str] = list(session.param_names)
        # A sharded model (FSDP, DTensor) has nothing to compare: -1, which every rank then sees, so
        # the decision to compare (and the vector's length) is the same on all of them.
        self._hash = -1.0 if _sharded(model) else _structure_hash([*session.named_params, *self._buffers])
        self._schedule: tuple[int, int] = (session.tracker.measure_every, session.tracker.dense_steps)
        self._compare = False  # decided at the first sync: same structure everywhere
        self._buf_fp: np.ndarray | None = None
        self._buf_step = -1
        self._sent: set[tuple[str, tuple[str, ...]]] = set()
        self._ranks: dict[tuple[str, tuple[str, ...]], set[int]] = {}
        self._remote: list[Finding] = []
        self._store = _default_store()
        self._left_key = f"tlwidgets/{self._id}/left"

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Is ``step`` a sync step? The same answer on every rank (see the module docstring)."""
        if self.stopped is not None:
            return False
        every, dense = self._schedule
        return step < dense or step % every == 0

    # ------------------------------------------------------------------ hooks
    def on_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the module DDP runs: the buffers as DDP just broadcast them."""
        if not self._buffers or not self._compare or not torch.is_grad_enabled():
            return
        step = int(self.session.global_step)
        if not self.due(step):
            return
        ddp = _active_ddp()
        if ddp is not None:
            # DDP broadcasts rank 0's buffers before a forward only when the forward before it was a
            # synchronized training forward (not under no_sync(), not under no_grad()); the flag it
            # decides by is still the previous forward's here. broadcast_buffers=False is ignored on
            # purpose: then the buffers *should* have been equal, and differ (the bug to report).
            if not getattr(ddp, "require_forward_param_sync", True):
                return
        elif self._buf_step == step:
            return  # no DDP in sight (a hand-made all-reduce): the step's first forward
        self._buf_fp = fingerprints([b for _, b in self._buffers])
        self._buf_step = step

    def on_step(self, step: int, loss: float) -> float:
        """After ``optimizer.step()`` of ``step`` (0-based): sync if due; the loss to record."""
        if not self.due(step):
            return loss
        return self._sync(_STEP, step, loss)

    def on_finish(self, step: int, loss: float) -> None:
        """The ``with`` block ended cleanly: a last sync (findings of the loop's end, fingerprints)."""
        if self.stopped is None:
            self._sync(_FINAL, step, loss)
        self.leave("finished")

    def leave(self, reason: str) -> None:
        """Stop syncing for good and tell the other ranks (no collective: safe after an exception)."""
        if self.stopped is None:
            self.stopped = reason
            if reason != "finished":  # the rest of the run is watched per rank: say so once
                log.warning("tlwidgets: rank %d stops syncing with the other ranks: %s", self.rank, reason)
        if self._store is not None:
            # The store may be gone (the process group destroyed): then nobody is waiting.
            with contextlib.suppress(Exception):
                self._store.add(self._left_key, 1)

    # ------------------------------------------------------------------ the sync
    def _sync(self, kind: float, step: int, loss: float) -> float:
        if not is_distributed():  # the user destroyed the process group before the loop's end
            self.stopped = self.stopped or "the process group is gone"
            return loss
        start = time.perf_counter()
        try:
            return self._exchange(kind, step, loss)
        except Exception as exc:  # tlwidgets' own failure: stop syncing, say so, let the loop go on
            self.leave(f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            self.sync_seconds += time.perf_counter() - start

    def _exchange(self, kind: float, step: int, loss: float) -> float:
        import torch.distributed as dist

        group = _group(self.timeout_s)
        first = self.syncs == 0
        payload = b"" if self.rank == 0 else self._outgoing()
        compare = self._compare and not first
        head = [kind, float(step), float(loss), float(len(payload)), 0.0, self._hash, *self._schedule]
        parts = [np.asarray(head, dtype=np.float64)]
        if compare:
            params = fingerprints(self._params)
            taken = self._buf_fp is not None and self._buf_step == step and kind == _STEP
            bufs = self._buf_fp if taken else np.full((len(self._buffers), 2), np.nan)
            parts[0][4] = 1.0 if taken else 0.0
            parts += [params.reshape(-1), bufs.reshape(-1)]
        mine = torch.from_numpy(np.concatenate(parts))
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        if not self._wait(dist.all_gather(gathered, mine, group=group, async_op=True)):
            return loss
        rows = torch.stack(gathered).numpy()
        heads = rows[:, :_H]
        if not ((heads[:, 0] == kind).all() and (heads[:, 1] == step).all()):
            # Every rank sees the same rows, so every rank stops here: no collective is left unmatched.
            self.leave(f"ranks out of step at step {step}: {heads[:, :2].tolist()}")
            return loss
        self.syncs += 1
        if first:
            self._schedule = (int(heads[0, 6]), int(heads[0, 7]))  # rank 0's schedule, for all
            self._compare = bool((heads[:, 5] == heads[0, 5]).all() and heads[0, 5] >= 0)
            if not self._compare:
                self.replicated = False
        self.rank_losses = heads[:, 2].copy()
        if compare:
            self._compare_rows(rows[:, _H:], heads[:, 4])
        nbytes = heads[:, 3].astype(np.int64)
        if nbytes.max() > 0 and not self._gather_findings(payload, int(nbytes.max()), nbytes, group):
            return loss
        mean = _nan_mean(self.rank_losses)
        return mean if math.isfinite(mean) else loss

    def _wait(self, work: Any) -> bool:
        """Wait for a collective in short slices; stop (False) when a peer left or time ran out."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                work.wait(timeout=datetime.timedelta(seconds=max(0.001, min(_POLL_S, left))))
                return True
            except RuntimeError as exc:
                text = str(exc).lower()
                if "timed out" not in text and "timeout" not in text:
                    # A peer closed its connections (it left and tore the process group down).
                    self.leave(f"another rank left the run (the collective failed: {exc})")
                    return False
            if self._peer_left():
                self.leave("another rank left the run (its loop ended or raised)")
                return False
            if time.monotonic() >= deadline:
                self.leave(f"no answer from the other ranks within {self.timeout_s:g} s")
                return False

    def _peer_left(self) -> bool:
        if self._store is None:
            return False
        try:
            return int(self._store.add(self._left_key, 0)) > 0
        except Exception:
            return False

    # ------------------------------------------------------------------ fingerprints
    def _compare_rows(self, fps: np.ndarray, buffers_taken: np.ndarray) -> None:
        """Compare every rank's fingerprints with rank 0's; keep what differs in :attr:`divergence`."""
        n_params = len(self._params)
        table = fps.reshape(self.world_size, -1, 2)
        params, bufs = table[:, :n_params], table[:, n_params:]
        found: dict[int, list[tuple[int, float]]] = {}
        for r in range(1, self.world_size):
            bad, rel = _differs(params[0], params[r], self.tolerance)
            for i in np.flatnonzero(bad):
                found.setdefault(int(i), []).append((r, float(rel[i])))
        if self.replicated is None:
            # A DDP wrapper is a replica by construction; another model is one if it starts equal.
            self.replicated = self._ddp or not found
        if not self.replicated:
            return
        out = [
            Divergence(self._param_names[i], "parameter", tuple(r for r, _ in v), max(d for _, d in v))
            for i, v in sorted(found.items())
        ]
        if self._buffers and (buffers_taken > 0).all():
            for i, _ in enumerate(self._buffers):
                ranks = []
                for r in range(1, self.world_size):
                    bad, rel = _differs(bufs[0, i : i + 1], bufs[r, i : i + 1], self.tolerance)
                    if bad[0]:
                        ranks.append((r, float(rel[0])))
                if ranks:
                    name = self._buffers[i][0]
                    out.append(
                        Divergence(name, "buffer", tuple(r for r, _ in ranks), max(d for _, d in ranks))
                    )
        self.divergence = tuple(out)
        self.comparisons += 1

    # ------------------------------------------------------------------ findings
    def _outgoing(self) -> bytes:
        """This rank's findings rank 0 has not been sent yet, pickled (b"" when none)."""
        log_ = getattr(self.session, "_log", ())
        new = [f for f in log_ if f.key not in self._sent and f.code not in _LOCAL_CODES]
        if not new:
            return b""
        items = []
        for f in new:
            evidence = dict(f.evidence)
            try:
                if len(pickle.dumps(evidence)) > _MAX_EVIDENCE_BYTES:
                    evidence = {}
            except Exception:
                evidence = {}
            items.append(
                {
                    "code": f.code,
                    "severity": f.severity,
                    "message": f.message,
                    "cause": f.cause,
                    "fix": f.fix,
                    "step": f.step,
                    "stage": f.stage.value if f.stage is not None else None,
                    "params": tuple(f.params),
                    "evidence": evidence,
                    "first_step": f.first_step,
                }
            )
            self._sent.add(f.key)
        return pickle.dumps(items)

    def _gather_findings(self, payload: bytes, size: int, nbytes: np.ndarray, group: Any) -> bool:
        import torch.distributed as dist

        buf = torch.zeros(size, dtype=torch.uint8)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        gathered = [torch.empty_like(buf) for _ in range(self.world_size)]
        if not self._wait(dist.all_gather(gathered, buf, group=group, async_op=True)):
            return False
        if self.rank != 0:
            return True
        for r in range(1, self.world_size):
            if nbytes[r] <= 0:
                continue
            for item in pickle.loads(gathered[r][: int(nbytes[r])].numpy().tobytes()):
                try:
                    f = Finding(**item)
                except (TypeError, ValueError):  # a code this version does not know (mixed installs)
                    continue
                self._remote.append(self._annotate(f, r))
        return True

    def _annotate(self, f: Finding, rank: int) -> Finding:
        """Name the ranks that raised ``f`` (its key) in its message and ``evidence["ranks"]``."""
        ranks = self._ranks.setdefault(f.key, set())
        ranks.add(rank)
        f.evidence = {**f.evidence, "ranks": sorted(ranks)}
        if ranks != {0}:
            who = f"rank {rank}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, sorted(ranks)))
            f.message = f"on {who}: {f.message}"
        return f

    def own(self, findings: Iterable[Finding]) -> list[Finding]:
        """This rank's own findings, on rank 0 annotated with the other ranks that raised them too."""
        if self.rank != 0:
            return list(findings)
        return [self._annotate(f, 0) if f.code not in _LOCAL_CODES else f for f in findings]

    def take_remote(self) -> list[Finding]:
        """Findings of the other ranks received since the last call (rank 0; annotated)."""
        got, self._remote = self._remote, []
        return got

    def __repr__(self) -> str:
        state = f"stopped: {self.stopped}" if self.stopped else "syncing"
        return f"RankSync(rank {self.rank} of {self.world_size}, {state}, syncs={self.syncs})"


def attach(session: Any, **options: Any) -> RankSync | None:
    """A :class:`RankSync` for ``session`` in a distributed run; ``None`` otherwise (zero cost)."""
    if not is_distributed():
        return None
    return RankSync(session, **options)


def _nan_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
