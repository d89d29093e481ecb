"""The tracking core shared by :class:`Runner` and :func:`watch`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tlwidgets.core.activations import ActivationProbe, as_table
from tlwidgets.core.controls import effective_lrs
from tlwidgets.core.history import History
from tlwidgets.core.stats import ParamStats

__all__ = ["Tracker"]


class Tracker:
    """Parameter statistics, activation probes and history for one model.

    Parameters
    ----------
    model, optimizer
        What is trained.
    sample_size
        Elements per tensor for sampled (non-exact) statistics.
    history_size
        Steps kept in the ring buffers.
    grad_budget
        Fraction of step time the exact grad-norm pass may use.
    activation_every
        Measure activations every this many steps (and in the first 3); 0 = never
        (except exact stages). Each measurement hooks every leaf module (PyTorch's
        slower call path) and takes a few reductions per module.
    detail_every
        Describe the batch (value ranges, label counts) and the devices every this
        many steps (and in the first 3); 0 = never (except exact stages).
    measure_every
        Once the run is past its dense phase, measure the per-parameter
        statistics (grad, weight and update norms) and run the rules every this
        many steps; the steps in between record loss and LR only (NaN
        statistics). 1 = every step.
    dense_steps
        Length of a dense phase: every step is measured during the first
        ``dense_steps`` steps and again for ``dense_steps`` steps after
        :meth:`densify` (a control change, a rewind, a jump of the LR).
    diagnose_every
        Past the first :attr:`FULL_DIAGNOSIS` steps of a dense phase, diagnose
        at most one step in this many (see :meth:`diagnosing`); 1: every
        measured step.

    Notes
    -----
    Measuring and diagnosing are two schedules (see :meth:`diagnosing`): a
    measured step writes its statistics into the history; a *diagnosed* step
    also takes the stage facts and runs the rules. The first
    :attr:`FULL_DIAGNOSIS` steps of a dense phase are all diagnosed; past
    them, a measured step is diagnosed when ``diagnose_every`` steps or more
    passed since the last diagnosis: in a sparse phase with the defaults
    (``measure_every`` = 20, ``diagnose_every`` = 10) that is every measured
    step; a dense phase past its first steps is diagnosed on one step in 10
    while its statistics stay complete.
    """

    #: Steps at the start of a dense phase (the first steps, after a change) diagnosed one by one.
    FULL_DIAGNOSIS = 50
    #: The default ``diagnose_every``: past those, a step is diagnosed at most once in this many steps.
    #: A diagnosed step costs several undiagnosed measured ones (the stage facts and the rules are
    #: Python on small arrays), while the statistics stay measured on every step and the trend rules
    #: read them all from the history. 10 is the period of the LR rule (``every=10``), whose
    #: persistence test counts evaluations: a longer gap in a dense phase lets a too-high LR whose
    #: jumps fade within ~100 steps go unnamed (tests/test_rules_whole_runs.py, lr 0.5, seed 1).
    DIAGNOSE_EVERY = 10

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sample_size: int = 1024,
        history_size: int = 10_000,
        grad_budget: float | None = None,
        activation_every: int = 25,
        detail_every: int = 10,
        measure_every: int = 20,
        dense_steps: int = 200,
        diagnose_every: int = DIAGNOSE_EVERY,
    ) -> None:
        _check_count("measure_every", measure_every, low=1)
        _check_count("dense_steps", dense_steps, low=0)
        _check_count("diagnose_every", diagnose_every, low=1)
        self.diagnose_every = diagnose_every
        self.model = model
        self.optimizer = optimizer
        self.named_params: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
        self.param_names = [n for n, _ in self.named_params]
        self.params = [p for _, p in self.named_params]
        self.stats = ParamStats(self.params, sample_size=sample_size, grad_budget=grad_budget)
        self.history = History(self.param_names, capacity=history_size)
        self.probe = ActivationProbe(model)
        self.activation_every = activation_every
        self.detail_every = detail_every
        self.last_activations: dict[str, dict[str, float]] = {}
        self.measure_every = measure_every
        self.dense_steps = dense_steps
        self._dense_until = dense_steps
        self._full_until = min(dense_steps, self.FULL_DIAGNOSIS)
        self._lr_mark: list[float] = effective_lrs(optimizer)
        self._trainable: list[bool] = [p.requires_grad for p in self.params]
        self._nan = np.full(len(self.params), np.nan)
        self._nan.flags.writeable = False  # shared by every unmeasured row
        self._grad: np.ndarray = self._nan
        self._grad_exact = False
        self._last_due: dict[str, int] = {}

    def activations_due(self, step: int) -> bool:
        """Measure per-module activation statistics at ``step``? (Asked on measured steps only.)"""
        return self._due("activations", step, self.activation_every)

    def details_due(self, step: int) -> bool:
        """Describe the batch (ranges, label counts) and devices at ``step``? (Measured steps only.)"""
        return self._due("details", step, self.detail_every)

    def _due(self, what: str, step: int, every: int) -> bool:
        """True on the first 3 steps, and ``every`` steps or more after the last step it was True.

        Counted from the last time, not as ``step % every``: the steps asked
        about are the measured ones, which in a sparse phase fall every
        ``measure_every`` steps and would meet a modulo test only at their
        common multiples (or never). Asking twice about one step gives the same
        answer; a step before the last one (a rewind) is due.
        """
        if step < 3:
            return True
        if every <= 0:
            return False
        last = self._last_due.get(what, 0)  # from step 0: in a dense phase, the multiples of every
        if step <= last or step - last >= every:
            self._last_due[what] = step
            return True
        return False

    def measuring(self, step: int) -> bool:
        """Measure the per-parameter statistics (and run the rules) at ``step``?

        Every step of a dense phase (the first ``dense_steps`` steps, and after
        :meth:`densify`); every ``measure_every``-th step otherwise. Problems
        of the setup show in the first steps, or right after something
        changed: that is where the detail goes. A long healthy run pays for one
        measured step in ``measure_every``.
        """
        return step < self._dense_until or step % self.measure_every == 0

    def diagnosing(self, step: int) -> bool:
        """Take the stage facts and run the rules at measured step ``step``?

        Every measured step of the first :attr:`FULL_DIAGNOSIS` steps of a
        dense phase (where a change shows); otherwise a step ``diagnose_every``
        steps or more after the last diagnosed one (so with the defaults every
        measured step of a sparse phase, which fall ``measure_every`` = 20
        apart, and one step in 10 of a dense phase past its first steps; a
        ``measure_every`` below ``diagnose_every``, such as 1, diagnoses every
        ``diagnose_every``-th step). The rules keep their own cadence on
        the diagnosed steps (``every``), and the statistics of the steps in
        between are in the history rows they read. Asked on measured steps
        only; ``step`` counts the steps completed once the step asked about
        is (what the trend rules see after it).
        """
        if step < self._full_until:
            return True
        return self._due("diagnose", step, self.diagnose_every)

    def densify(self, step: int) -> None:
        """Measure every step from ``step`` on for ``dense_steps`` steps (something changed), and
        diagnose each of the first :attr:`FULL_DIAGNOSIS` of them."""
        self._dense_until = max(self._dense_until, step + self.dense_steps)
        self._full_until = max(self._full_until, step + min(self.dense_steps, self.FULL_DIAGNOSIS))

    def note_trainable(self, step: int) -> bool:
        """``requires_grad`` changed since the last look (a freeze by hand): measure densely again.

        Called once per step, before :meth:`measuring`: frozen parameters that
        still move show on the next steps, whoever froze them. Returns whether
        a flag changed.
        """
        flags = [p.requires_grad for p in self.params]
        if flags != self._trainable:
            self._trainable = flags
            self.densify(step)
            return True
        return False

    def note_lrs(self, step: int, lrs: list[float]) -> None:
        """A scheduler moved a group's LR by 2x or more since the last mark: measure densely again."""
        mark = self._lr_mark
        if lrs == mark:  # (the common case, a constant LR: one comparison)
            return
        if len(lrs) != len(mark) or any(new > 2 * old or old > 2 * new for new, old in zip(lrs, mark)):
            self._lr_mark = list(lrs)
            self.densify(step)

    def skip_grads(self) -> None:
        """An unmeasured step: no grad norms for its history row."""
        self._grad, self._grad_exact = self._nan, False

    def measure_grads(self, exact: bool | None = None) -> tuple[np.ndarray, bool]:
        """Grad norms now (NaN where grad is None); kept for the step's history row."""
        self._grad, self._grad_exact = self.stats.grad_norms(exact)
        return self._grad, self._grad_exact

    def finish_activations(self, step: int) -> dict[str, dict[str, float]]:
        stats = self.probe.collect()
        if stats:
            self.last_activations = stats
            self.history.add_activations(step, as_table(stats))
        return stats

    def record_step(
        self,
        *,
        step: int,
        epoch: int,
        loss: float,
        exact: bool,
        lrs: list[float] | None = None,
        measured: bool = True,
    ) -> dict[str, Any]:
        """After ``optimizer.step()``: update norms, append the history row, return the numbers.

        ``lrs`` are the learning rates the step used (read before a per-step
        scheduler changed them); default: the optimizer's current ones.
        ``measured=False`` (no :meth:`ParamStats.before_step` this step): NaN
        weight and update norms.
        """
        if measured:
            weight, update, update_exact = self.stats.after_step()
        else:
            weight = update = self._nan
            update_exact = False
        lrs = effective_lrs(self.optimizer) if lrs is None else lrs
        self.note_lrs(step, lrs)
        self.history.append(
            step=step,
            epoch=epoch,
            loss=loss,
            lr=lrs,
            grad_norm=self._grad,
            weight_norm=weight,
            update_norm=update,
            exact=exact and update_exact and self._grad_exact,
            measured=measured,
        )
        return {"grad_norm": self._grad, "weight_norm": weight, "update_norm": update, "lr": lrs}

    def close(self) -> None:
        self.probe.close()


def _check_count(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
