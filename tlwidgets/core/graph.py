"""Which parameters a loss's autograd graph reaches, and where NaN/Inf first appears."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tlwidgets.core.activations import first_tensor

__all__ = ["locate_non_finite", "reached_params", "reaches_any"]


def _graph_leaves(fn: Any) -> Iterator[torch.Tensor]:
    """The tensors (``AccumulateGrad`` leaves) an autograd graph from ``fn`` accumulates into.

    Walks ``next_functions`` depth first, each node once; a generator, so a
    caller that stops at the first leaf it wants walks no further.
    """
    seen: set[int] = set()
    stack = [fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            yield var
        stack.extend(f for f, _ in fn.next_functions)


def reached_params(loss: torch.Tensor, named_params: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the parameters that ``loss.backward()`` would give a gradient.

    Walks ``loss.grad_fn`` through ``next_functions`` to the ``AccumulateGrad``
    leaves. Returns an empty list when the loss has no graph (detached).
    """
    if loss.grad_fn is None:
        return []
    by_id = {id(p): n for n, p in named_params}
    found = {by_id[id(v)] for v in _graph_leaves(loss.grad_fn) if id(v) in by_id}
    return [n for n, _ in named_params if n in found]


def reaches_any(root: torch.Tensor, param_ids: Collection[int]) -> bool:
    """Whether ``root.backward()`` would give any of the parameters with these ``id()`` s a gradient.

    The same walk as :func:`reached_params`, but it stops at the first such
    parameter: for a loss computed from the model's output that is a few
    nodes (the output layer's ``AccumulateGrad`` sits right under it), so it
    is cheap enough to ask of every criterion call. A graph that does not
    reach them (a probe trained on ``features.detach()``, a discriminator's
    loss on ``fake.detach()`` seen by the generator's watcher) is walked to
    its end; such graphs are the small ones.
    """
    if root.grad_fn is None:
        return root.requires_grad and id(root) in param_ids  # the parameter itself
    return any(id(v) in param_ids for v in _graph_leaves(root.grad_fn))


def locate_non_finite(
    model: nn.Module, forward: Callable[[], Any], rng_state: torch.Tensor | None = None
) -> dict[str, Any]:
    """Re-run ``forward`` with checks on every module to find where NaN/Inf starts.

    Runs under ``torch.no_grad()`` and restores the model's buffers (batch-norm
    running statistics) and the RNG state afterwards, so it changes nothing.
    ``rng_state`` (the CPU RNG state at the original forward's start) makes
    dropout masks identical to the original pass.

    Returns
    -------
    dict
        ``module``: the first module (execution order) whose output holds a
        non-finite value while its inputs are finite (None if none does);
        ``inputs_non_finite``: name of the first module that *received*
        non-finite input; ``output_non_finite``: whether the model's output
        holds one.
    """
    result: dict[str, Any] = {"module": None, "inputs_non_finite": None, "output_non_finite": False}
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if result["module"] is not None:
                return
            tin = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            bad_in = any(not _all_finite(a) for a in tin)
            t = first_tensor(output)
            bad_out = t is not None and not _all_finite(t)
            if bad_in and result["inputs_non_finite"] is None:
                result["inputs_non_finite"] = name
            if bad_out and not bad_in:
                result["module"] = name

        return hook

    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(make(name)))
    buffers = [b.detach().clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    try:
        with torch.no_grad():
            out = first_tensor(forward())
        result["output_non_finite"] = out is not None and not _all_finite(out)
    except Exception as exc:  # the replay is best effort; never mask the real finding
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return result


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``; for a sparse tensor, in its stored values (the implicit zeros are finite)."""
    if t.layout == torch.sparse_coo:
        t = t._values()  # also defined on an uncoalesced tensor, where values() raises
    elif t.layout != torch.strided:
        t = t.values()
    return bool(torch.isfinite(t).all()) if t.is_floating_point() or t.is_complex() else True
