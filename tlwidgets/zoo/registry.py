"""The zoo's registry: named, reproducible training setups and how to diagnose them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

from tlwidgets.core.findings import Finding, Severity
from tlwidgets.core.runner import Runner, RunResult
from tlwidgets.core.watch import Watcher, watch

__all__ = ["CHECKS", "Diagnosis", "Setup", "get", "names", "register", "setups"]

#: Keys every ``build()`` result holds (it may add other ``Runner`` keywords, e.g. ``unpack``).
PART_KEYS = ("model", "loss_fn", "optimizer", "train_data", "val_data", "scheduler", "scheduler_interval")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A named training setup: broken on purpose, or its healthy twin.

    Attributes
    ----------
    name
        Unique name, e.g. ``"lr-too-high"``.
    description
        What the setup trains and, for a broken one, what is wrong and where.
    builder
        ``builder(seed) -> dict`` of fresh ``Runner`` keyword arguments.
    expected
        Finding codes the bug should produce (empty for healthy setups).
    healthy
        True for setups that must train with no warning or error finding.
    twin
        Name of the healthy setup that differs only by the fix (for a broken
        one), or of a broken setup it is the twin of (for a healthy one).
    checks
        Explicit checks (keys of :data:`CHECKS`) that detect this bug; rules
        alone cannot (e.g. ``"data-leakage"``).
    run
        Keyword arguments of ``Runner.run`` for the default run (kept short:
        most setups run well under 100 steps); for an own-loop setup, of ``loop``.
    fix
        One sentence: the change that turns it into its twin.
    loop
        For bugs that live in the user's own training loop: ``loop(parts, **run)``
        is that loop, run under ``tlw.watch`` by :meth:`watch` and :meth:`diagnose`
        (a Runner owns its loop, so :meth:`runner` does not show these bugs).
    """

    name: str
    description: str
    builder: Callable[[int], dict[str, Any]]
    expected: tuple[str, ...] = ()
    healthy: bool = False
    twin: str | None = None
    checks: tuple[str, ...] = ()
    run: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epochs": 1})
    fix: str = ""
    loop: Callable[..., None] | None = None

    def build(self, seed: int = 0, *, data_seed: int = 0) -> dict[str, Any]:
        """Fresh model, loss, optimizer, data, scheduler: ``tlw.Runner(**setup.build())`` works.

        The global torch RNG is seeded with ``seed`` first, so the same seed
        gives the same weights and (shuffled) batch order. ``data_seed`` draws
        the data itself: the train/validation split and any generated inputs
        or labels (a rule that holds for one split only is not a rule).
        """
        from tlwidgets.zoo._parts import using_data_seed

        torch.manual_seed(seed)
        with using_data_seed(data_seed):
            parts = self.builder(seed)
        parts.setdefault("val_data", None)
        parts.setdefault("scheduler", None)
        parts.setdefault("scheduler_interval", "epoch")
        missing = [k for k in PART_KEYS if k not in parts]
        if missing:  # a zoo bug, not a user error
            raise RuntimeError(f"setup {self.name!r} did not build {missing}")
        return parts

    def runner(self, seed: int = 0, *, data_seed: int = 0, **kwargs: Any) -> Runner:
        """A :class:`~tlwidgets.core.runner.Runner` on a fresh build; ``kwargs`` go to the Runner."""
        parts = self.build(seed, data_seed=data_seed)
        parts.update(kwargs)
        return Runner(**parts)

    def watch(self, seed: int = 0, *, data_seed: int = 0, **watch_kwargs: Any) -> Watcher:
        """Run :attr:`loop` on a fresh build under ``tlw.watch``; return the finished watcher.

        Raises
        ------
        ValueError
            When this setup has no own loop (use :meth:`runner`).
        """
        if self.loop is None:
            raise ValueError(f"setup {self.name!r} has no own training loop; use setup.runner()")
        parts = self.build(seed, data_seed=data_seed)
        watcher = watch(parts["model"], parts["optimizer"], loss_fn=parts["loss_fn"], **watch_kwargs)
        with watcher:
            self.loop(parts, **self.run)
        return watcher

    def diagnose(
        self,
        seed: int = 0,
        *,
        data_seed: int = 0,
        checks: Iterable[str] | None = None,
        train: bool = True,
        **runner_kwargs: Any,
    ) -> Diagnosis:
        """Build a runner, run this setup's explicit checks, then its default run.

        Parameters
        ----------
        seed
            Build seed (weights, batch order).
        data_seed
            Seed of the data (split, generated inputs and labels).
        checks
            Check names to run (default: :attr:`checks`). The checks restore
            every state they touch, so they do not change the run.
        train
            Also run the default training (:attr:`run`).
        **runner_kwargs
            Passed to the Runner (or to ``tlw.watch`` for an own-loop setup).
        """
        if self.loop is not None:
            if checks:
                raise ValueError("explicit checks need a Runner; own-loop setups have none")
            return Diagnosis(self, self.watch(seed, data_seed=data_seed, **runner_kwargs), None, [])
        runner = self.runner(seed, data_seed=data_seed, **runner_kwargs)
        found = []
        for name in self.checks if checks is None else tuple(checks):
            f = CHECKS[name](runner)
            if f is not None:
                found.append(f)
        result = runner.run(**self.run) if train else None
        return Diagnosis(self, runner, result, found)


@dataclasses.dataclass
class Diagnosis:
    """What :meth:`Setup.diagnose` found: the session's findings plus the explicit checks'.

    ``runner`` is the :class:`Runner` (or, for an own-loop setup, the finished :class:`Watcher`).
    """

    setup: Setup
    runner: Runner | Watcher
    result: RunResult | None
    check_findings: list[Finding]

    @property
    def findings(self) -> list[Finding]:
        return [*self.runner.findings, *self.check_findings]

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def problems(self, severity: str = "warning") -> list[Finding]:
        """Findings of ``severity`` or worse."""
        limit = Severity(severity).rank
        return [f for f in self.findings if Severity(f.severity).rank <= limit]

    def __str__(self) -> str:
        lines = [f"{self.setup.name}: {self.result}"]
        lines += [str(f) for f in self.findings]
        return "\n".join(lines)


# ---------------------------------------------------------------------- explicit checks
def _first_inputs(runner: Runner) -> Any:
    from tlwidgets.diagnostics.checks_data import as_batches, rng_preserved

    with rng_preserved():
        inputs, _ = next(iter(as_batches(runner.train_data, runner.unpack)))
    return inputs


def _batch_independence(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import check_batch_independence

    return check_batch_independence(runner.model, _first_inputs(runner), forward=runner.forward)


def _channel_order(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import check_channel_order

    return check_channel_order(runner.train_data, unpack=runner.unpack)


def _labels_decoupled(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import check_labels_decoupled

    return check_labels_decoupled(runner)


def _data_leakage(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import check_data_leakage

    return check_data_leakage(runner.train_data, runner.val_data, unpack=runner.unpack)


def _train_val_shift(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import check_train_val_shift

    return check_train_val_shift(runner.train_data, runner.val_data, unpack=runner.unpack)


def _overfit(runner: Runner) -> Finding | None:
    from tlwidgets.diagnostics.checks import overfit_one_batch

    return overfit_one_batch(runner).finding


#: Explicit checks by name: ``check(runner) -> Finding | None`` (state restored).
CHECKS: dict[str, Callable[[Runner], Finding | None]] = {
    "batch-independence": _batch_independence,
    "channel-order": _channel_order,
    "labels-decoupled": _labels_decoupled,
    "data-leakage": _data_leakage,
    "train-val-shift": _train_val_shift,
    "overfit-one-batch": _overfit,
}


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, Setup] = {}


def register(setup: Setup) -> Setup:
    """Add ``setup`` to the zoo (names are unique)."""
    if setup.name in _REGISTRY:
        raise ValueError(f"a zoo setup named {setup.name!r} already exists")
    for c in setup.checks:
        if c not in CHECKS:
            raise ValueError(f"unknown check {c!r}; known: {sorted(CHECKS)}")
    _REGISTRY[setup.name] = setup
    return setup


def names(healthy: bool | None = None) -> list[str]:
    """Names of the setups, in registration order; ``healthy=True/False`` filters."""
    return [n for n, s in _REGISTRY.items() if healthy is None or s.healthy == healthy]


def setups(healthy: bool | None = None) -> list[Setup]:
    """The setups themselves, in registration order."""
    return [_REGISTRY[n] for n in names(healthy)]


def get(name: str) -> Setup:
    """The setup called ``name``.

    Raises
    ------
    KeyError
        Naming the known setups.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no zoo setup named {name!r}; known: {', '.join(_REGISTRY)}") from None
