"""In-memory checkpoints: everything needed to replay training bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.findings import Finding
from tlwidgets.core.training import OptimizerSnapshot, snapshot_optimizer

__all__ = [
    "AutoCheckpoints",
    "Checkpoint",
    "RngState",
    "capture_dropout",
    "capture_generators",
    "capture_rng",
    "data_generators",
    "restore_dropout",
    "restore_generators",
    "restore_rng",
]

_ids = itertools.count(1)


@dataclasses.dataclass
class RngState:
    """Global RNG states of torch (CPU and CUDA), numpy and Python's ``random``."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any


def capture_rng() -> RngState:
    return RngState(
        torch_cpu=torch.get_rng_state(),
        torch_cuda=torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        numpy=np.random.get_state(),
        python=random.getstate(),
    )


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    np.random.set_state(state.numpy)
    random.setstate(state.python)


#: The kinds of random generator a data source may own besides the global ones.
_GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def capture_dropout(model: nn.Module) -> list[float]:
    """The ``p`` of every dropout module, in ``model.modules()`` order (a control can change it)."""
    return [float(m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def restore_dropout(model: nn.Module, saved: list[float] | None) -> None:
    """Give the dropout modules back the ``p`` of :func:`capture_dropout` (nothing when ``saved`` is None)."""
    if saved is None:
        return
    mods = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if len(mods) == len(saved):
        for m, p in zip(mods, saved):
            m.p = p


def data_generators(*sources: Any) -> list[Any]:
    """The random generators the data sources shuffle or augment with, besides the global RNGs.

    A ``DataLoader(..., generator=g)`` shuffles with ``g`` (the usual way to make
    a run reproducible), a ``RandomSampler(generator=g)`` too, and a dataset
    may keep a numpy or Python generator for its augmentation: each is found
    among the attributes of the source, its sampler, batch sampler (and that
    one's sampler) and dataset. Torch, numpy (``Generator``, ``RandomState``)
    and Python ``random.Random`` generators are found; each once.
    """
    found: list[Any] = []
    seen: set[int] = set()
    for src in sources:
        if src is None:
            continue
        batch_sampler = getattr(src, "batch_sampler", None)
        holders = [
            src,
            getattr(src, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
            getattr(src, "dataset", None),
        ]
        for obj in holders:
            if obj is None:
                continue
            own = getattr(obj, "__dict__", {})
            values = [obj] if isinstance(obj, _GENERATOR_TYPES) else list(own.values())
            for v in values:
                if isinstance(v, _GENERATOR_TYPES) and id(v) not in seen:
                    seen.add(id(v))
                    found.append(v)
    return found


def capture_generators(generators: list[Any]) -> list[tuple[Any, Any]]:
    """``(generator, state)`` of each generator (see :func:`data_generators`)."""
    out = []
    for g in generators:
        if isinstance(g, torch.Generator):
            state = g.get_state()
        elif isinstance(g, np.random.Generator):
            state = copy.deepcopy(g.bit_generator.state)
        elif isinstance(g, np.random.RandomState):
            state = g.get_state()
        else:
            state = g.getstate()
        out.append((g, state))
    return out


def restore_generators(saved: list[tuple[Any, Any]] | None) -> None:
    """Put back the states :func:`capture_generators` took."""
    for g, state in saved or ():
        if isinstance(g, torch.Generator):
            g.set_state(state)
        elif isinstance(g, np.random.Generator):
            g.bit_generator.state = copy.deepcopy(state)
        elif isinstance(g, np.random.RandomState):
            g.set_state(state)
        else:
            g.setstate(state)


@dataclasses.dataclass
class Checkpoint:
    """A handle returned by :meth:`Runner.checkpoint`; pass it to :meth:`Runner.rewind`.

    Holds copies (not aliases) of the weights, buffers, optimizer and scheduler
    state, the RNG states (global, and the data sources' own generators),
    ``requires_grad`` flags, module modes, the data position and the findings
    as they stood. It keeps working after the runner forgets it.
    """

    id: int
    step: int
    epoch: int
    batch_index: int
    label: str
    model_state: dict[str, torch.Tensor]
    requires_grad: list[bool]
    training: list[bool]
    optimizer: OptimizerSnapshot
    scheduler: dict[str, Any] | None
    scheduler_extra: dict[str, Any]
    rng: RngState
    epoch_rng: RngState | None
    iter_started: bool
    runner_state: dict[str, Any]
    #: States of the data sources' own generators now, and when the epoch's iterator was made.
    data_rng: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    epoch_data_rng: list[tuple[Any, Any]] | None = None
    #: Copies of the findings as they were (a rewind drops those of the abandoned timeline).
    findings: list[Finding] = dataclasses.field(default_factory=list)
    #: Taken by the runner itself (:attr:`Runner.auto_checkpoints`), not by ``checkpoint()``.
    auto: bool = False
    #: ``p`` of the dropout modules (``set_dropout`` changes it; a rewind gives it back).
    dropout: list[float] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors copied (weights, buffers, optimizer state)."""
        total = sum(t.numel() * t.element_size() for t in self.model_state.values())
        for per_param in (self.optimizer.state or {}).values():
            total += sum(_tensor_bytes(v) for v in per_param.values())
        return total

    @classmethod
    def capture(cls, runner: Any, label: str = "") -> Checkpoint:
        model: nn.Module = runner.model
        sched = runner.scheduler
        return cls(
            id=next(_ids),
            step=runner.global_step,
            epoch=runner.epoch,
            batch_index=runner.batch_index,
            label=label or f"step {runner.global_step}",
            model_state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
            requires_grad=[p.requires_grad for _, p in runner.named_params],
            training=[m.training for m in model.modules()],
            optimizer=snapshot_optimizer(runner.optimizer),
            scheduler=_scheduler_state(sched),
            scheduler_extra=_scheduler_lists(sched),
            rng=capture_rng(),
            epoch_rng=runner._epoch_rng,
            iter_started=runner._iter is not None,
            runner_state=runner._state_for_checkpoint(),
            data_rng=capture_generators(data_generators(runner.train_data, runner.val_data)),
            epoch_data_rng=runner._epoch_data_rng,
            findings=runner._log.snapshot(),
            dropout=capture_dropout(model),
        )

    def __repr__(self) -> str:
        where = f"step={self.step}, epoch={self.epoch}, batch={self.batch_index}"
        return f"Checkpoint(id={self.id}, {where}, {self.label!r})"


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class AutoCheckpoints:
    """The checkpoints a runner takes by itself, within a count and a memory bound.

    Checkpoints beyond ``keep`` or ``max_bytes`` are thinned: the oldest (the
    state before the first run, what a rewind "to before the damage" most
    often wants) and the newest always stay; of the others, the one whose
    neighbours are closest in steps goes, so the kept ones stay spread over
    the run (dense recently, sparse long ago, never all bunched at the end).
    The newest checkpoint added as the best validation one (:attr:`best`,
    what early stopping rewinds to) is never the one thinned away: when only
    it and the ends are left, the oldest other one goes (the newest wins).

    Parameters
    ----------
    keep
        At most this many (0: none are taken).
    max_bytes
        At most this many bytes in all (each checkpoint copies weights and
        optimizer state: for a model of S bytes with SGD momentum about 2S,
        with Adam about 3S). A single checkpoint larger than this is not taken.
    """

    def __init__(self, keep: int, max_bytes: float) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.items: list[Checkpoint] = []
        self._best: Checkpoint | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Checkpoint:
        return self.items[i]

    def __repr__(self) -> str:
        return f"AutoCheckpoints({self.items!r})"

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.items)

    @property
    def best(self) -> Checkpoint | None:
        """The newest checkpoint added with ``best=True`` while it is kept (``None`` otherwise): the
        state at the end of the epoch with the best validation loss so far."""
        return self._best if any(c is self._best for c in self.items) else None

    def add(self, ck: Checkpoint, *, best: bool = False) -> None:
        """Keep ``ck`` (newest) and thin the others down to the bounds.

        ``best``: ``ck`` holds the best validation so far; it replaces :attr:`best` and is kept
        through the thinning (the one it replaces is thinned like any other).
        """
        if best:
            self._best = ck
        self.items.append(ck)
        self.items.sort(key=lambda c: (c.step, c.id))
        sizes = {c.id: c.nbytes for c in self.items}
        while len(self.items) > 1 and (len(self.items) > self.keep or sum(sizes.values()) > self.max_bytes):
            self.items.remove(self._victim())
            sizes = {c.id: sizes[c.id] for c in self.items}
        if sum(sizes.values()) > self.max_bytes:  # a single one over the budget: none at all
            self.items.clear()

    def _victim(self) -> Checkpoint:
        items, best = self.items, self.best
        # The interior checkpoint whose removal leaves the smallest gap (ties: the older), never the best.
        inner = [i for i in range(1, len(items) - 1) if items[i] is not best]
        if inner:
            gaps = [items[i + 1].step - items[i - 1].step for i in inner]
            return items[inner[int(np.argmin(gaps))]]
        # (keep=1 or 2, or a tight byte budget) the newest wins, unless the oldest is the best.
        return next(c for c in items if c is not best)

    def drop_after(self, step: int) -> None:
        """Forget those taken after ``step`` (a rewind abandoned their timeline)."""
        self.items = [c for c in self.items if c.step <= step]


def _scheduler_lists(sched: Any) -> dict[str, Any]:
    """Per-group lists that ``state_dict`` does not restore in length (lambdas, bases)."""
    from tlwidgets.core.controls import iter_schedulers

    out = {}
    for i, s in enumerate(iter_schedulers(sched)):
        for attr in ("base_lrs", "max_lrs", "lr_lambdas", "min_lrs", "_last_lr"):
            val = getattr(s, attr, None)
            if isinstance(val, list):
                out[(i, attr)] = list(val)
    return out


def _scheduler_state(sched: Any) -> dict[str, Any] | None:
    """A copy of the scheduler's state (of its attributes, for one of one's own without ``state_dict``)."""
    if sched is None:
        return None
    if hasattr(sched, "state_dict") and hasattr(sched, "load_state_dict"):
        return copy.deepcopy(sched.state_dict())
    return {"__attributes__": {k: copy.deepcopy(v) for k, v in vars(sched).items() if k != "optimizer"}}


def restore_scheduler(sched: Any, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    from tlwidgets.core.controls import iter_schedulers

    if sched is None or state is None:
        return
    if "__attributes__" in state:
        vars(sched).update(copy.deepcopy(state["__attributes__"]))
        return
    sched.load_state_dict(copy.deepcopy(state))
    for i, s in enumerate(iter_schedulers(sched)):
        for attr in ("base_lrs", "max_lrs", "lr_lambdas", "min_lrs", "_last_lr"):
            if (i, attr) in extra:
                setattr(s, attr, list(extra[(i, attr)]))
