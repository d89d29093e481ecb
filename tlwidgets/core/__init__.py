"""The core: runner, stages, records, tracking, controls and checkpoints.

Imports torch and numpy only; never ipywidgets, bqplot or IPython.
"""

from tlwidgets.core.checkpoint import Checkpoint
from tlwidgets.core.events import Event, EventBus
from tlwidgets.core.findings import Code, Finding, Severity
from tlwidgets.core.history import History
from tlwidgets.core.records import ControlChange, EpochRecord, ErrorInfo, StageRecord, StepSummary
from tlwidgets.core.runner import Runner, RunResult
from tlwidgets.core.stages import Stage

__all__ = [
    "Checkpoint",
    "Code",
    "ControlChange",
    "EpochRecord",
    "ErrorInfo",
    "Event",
    "EventBus",
    "Finding",
    "History",
    "RunResult",
    "Runner",
    "Severity",
    "Stage",
    "StageRecord",
    "StepSummary",
]
