"""In-memory checkpoints: everything needed to replay training bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Checkpoint", "RngState", "capture_optimizer", "capture_rng", "restore_optimizer", "restore_rng"]

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


def capture_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state plus its group structure (groups can be added by ``unfreeze``)."""
    return {
        "groups": [
            (list(g["params"]), {k: copy.deepcopy(v) for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ],
        "state": copy.deepcopy(optimizer.state_dict()),
    }


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    optimizer.param_groups = [
        {"params": list(params), **copy.deepcopy(rest)} for params, rest in saved["groups"]
    ]
    optimizer.load_state_dict(copy.deepcopy(saved["state"]))


@dataclasses.dataclass
class Checkpoint:
    """A handle returned by :meth:`Runner.checkpoint`; pass it to :meth:`Runner.rewind`.

    Holds copies (not aliases) of the weights, buffers, optimizer and scheduler
    state, the RNG states, ``requires_grad`` flags, module modes and the data
    position. It keeps working after the runner forgets it.
    """

    id: int
    step: int
    epoch: int
    batch_index: int
    label: str
    model_state: dict[str, torch.Tensor]
    requires_grad: list[bool]
    training: list[bool]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scheduler_extra: dict[str, Any]
    rng: RngState
    epoch_rng: RngState | None
    iter_started: bool
    runner_state: dict[str, Any]

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
            optimizer=capture_optimizer(runner.optimizer),
            scheduler=copy.deepcopy(sched.state_dict()) if sched is not None else None,
            scheduler_extra=_scheduler_lists(sched),
            rng=capture_rng(),
            epoch_rng=runner._epoch_rng,
            iter_started=runner._iter is not None,
            runner_state=runner._state_for_checkpoint(),
        )

    def __repr__(self) -> str:
        where = f"step={self.step}, epoch={self.epoch}, batch={self.batch_index}"
        return f"Checkpoint(id={self.id}, {where}, {self.label!r})"


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


def restore_scheduler(sched: Any, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    from tlwidgets.core.controls import iter_schedulers

    if sched is None or state is None:
        return
    sched.load_state_dict(copy.deepcopy(state))
    for i, s in enumerate(iter_schedulers(sched)):
        for attr in ("base_lrs", "max_lrs", "lr_lambdas", "min_lrs", "_last_lr"):
            if (i, attr) in extra:
                setattr(s, attr, list(extra[(i, attr)]))
