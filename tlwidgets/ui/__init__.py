"""The Jupyter dashboard (ipywidgets + bqplot): ``tlw.Dashboard(runner)``.

Each panel is a small widget class in its own module; :class:`Dashboard`
composes them and wires them to the session's events and controls.
"""

from tlwidgets.ui.controls import ControlsPanel
from tlwidgets.ui.dashboard import Dashboard
from tlwidgets.ui.errors import ErrorArea
from tlwidgets.ui.findings import FindingsPanel
from tlwidgets.ui.freeze import FreezePanel
from tlwidgets.ui.heatmap import HeatmapPanel
from tlwidgets.ui.loss import LossPanel
from tlwidgets.ui.lr import LRPanel
from tlwidgets.ui.pipeline import PipelinePanel
from tlwidgets.ui.refresh import Refresher
from tlwidgets.ui.status import StatusLine

__all__ = [
    "ControlsPanel",
    "Dashboard",
    "ErrorArea",
    "FindingsPanel",
    "FreezePanel",
    "HeatmapPanel",
    "LRPanel",
    "LossPanel",
    "PipelinePanel",
    "Refresher",
    "StatusLine",
]
