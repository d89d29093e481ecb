"""The Jupyter dashboard (ipywidgets + bqplot): ``tlw.Dashboard(runner)``.

Each panel is a small widget class in its own module that follows the
:class:`Panel` protocol (the events it listens to, where it sits, how it
draws from the session); :data:`PANELS` lists the panels a dashboard builds,
and :class:`Dashboard` wires them to the session's events and controls in one
place. A panel of your own is one class plus :func:`register_panel`.
"""

from tlwidgets.ui.action_buttons import ActionButtons
from tlwidgets.ui.controls import ControlsPanel
from tlwidgets.ui.dashboard import Dashboard
from tlwidgets.ui.errors import ErrorArea
from tlwidgets.ui.findings import FindingsPanel
from tlwidgets.ui.fit import FitPanel
from tlwidgets.ui.freeze import FreezePanel
from tlwidgets.ui.heatmap import HeatmapPanel
from tlwidgets.ui.loss import LossPanel
from tlwidgets.ui.lr import LRPanel
from tlwidgets.ui.panel import LRFollowingPanel, Panel, PanelHost
from tlwidgets.ui.pipeline import PipelinePanel
from tlwidgets.ui.refresh import Refresher
from tlwidgets.ui.registry import PANELS, register_panel, unregister_panel
from tlwidgets.ui.status import StatusLine

__all__ = [
    "PANELS",
    "ActionButtons",
    "ControlsPanel",
    "Dashboard",
    "ErrorArea",
    "FindingsPanel",
    "FitPanel",
    "FreezePanel",
    "HeatmapPanel",
    "LRFollowingPanel",
    "LRPanel",
    "LossPanel",
    "Panel",
    "PanelHost",
    "PipelinePanel",
    "Refresher",
    "StatusLine",
    "register_panel",
    "unregister_panel",
]
