"""tlwidgets: step through PyTorch training in Jupyter and get named diagnoses.

>>> import tlwidgets as tlw
>>> runner = tlw.Runner(model, loss_fn, optimizer, train_loader)   # doctest: +SKIP
>>> runner.step_stage(); runner.run(steps=100); runner.findings   # doctest: +SKIP
>>> tlw.Dashboard(runner)                                          # doctest: +SKIP

``Dashboard`` (ipywidgets + bqplot) is imported on first use, so using the
runner alone never loads a UI library.
"""

from typing import Any

from tlwidgets import diagnostics as _diagnostics  # registers the default rule set
from tlwidgets.core import (
    Checkpoint,
    Code,
    ControlChange,
    EpochRecord,
    Event,
    Finding,
    History,
    Runner,
    RunResult,
    Severity,
    Stage,
    StageRecord,
)
from tlwidgets.core.actions import Action
from tlwidgets.core.watch import Watcher, watch

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Checkpoint",
    "Code",
    "ControlChange",
    "Dashboard",
    "EpochRecord",
    "Event",
    "Finding",
    "History",
    "RunResult",
    "Runner",
    "Severity",
    "Stage",
    "StageRecord",
    "Watcher",
    "__version__",
    "watch",
]

del _diagnostics


def __getattr__(name: str) -> Any:
    # Lazy: importing tlwidgets must not import ipywidgets/bqplot.
    if name == "Dashboard":
        from tlwidgets.ui import Dashboard

        return Dashboard
    raise AttributeError(f"module 'tlwidgets' has no attribute {name!r}")
