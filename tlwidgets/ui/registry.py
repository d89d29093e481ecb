"""The panel registry: which panels a dashboard builds, in which order.

``PANELS`` maps each panel's name to its class, in display order within each
slot. A new built-in panel is one line in :data:`BUILTIN_PANELS`; a panel of
your own is one :func:`register_panel` call (or a class passed to
``Dashboard(session, parts=[...])`` for one dashboard only).
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable
from typing import Any

from tlwidgets.core.events import Event
from tlwidgets.ui.controls import ControlsPanel
from tlwidgets.ui.errors import ErrorArea
from tlwidgets.ui.findings import FindingsPanel
from tlwidgets.ui.fit import FitPanel
from tlwidgets.ui.freeze import FreezePanel
from tlwidgets.ui.heatmap import HeatmapPanel
from tlwidgets.ui.loss import LossPanel
from tlwidgets.ui.lr import LRPanel
from tlwidgets.ui.panel import SLOTS, Panel
from tlwidgets.ui.pipeline import PipelinePanel
from tlwidgets.ui.status import StatusLine

__all__ = [
    "BUILTIN_PANELS",
    "PANELS",
    "check_panel_class",
    "register_panel",
    "resolve_parts",
    "unregister_panel",
]

#: The dashboard's own panels, in display order within each slot.
BUILTIN_PANELS: tuple[type[Panel], ...] = (
    StatusLine,
    ControlsPanel,
    ErrorArea,
    PipelinePanel,
    HeatmapPanel,
    LossPanel,
    FindingsPanel,
    FitPanel,
    FreezePanel,
    LRPanel,
)

#: name -> panel class, in display order; what ``Dashboard(session)`` builds.
PANELS: dict[str, type[Panel]] = {}


def check_panel_class(cls: Any) -> type[Panel]:
    """Raise TypeError/ValueError unless ``cls`` is a usable panel class; return it."""
    if not (isinstance(cls, type) and issubclass(cls, Panel)):
        raise TypeError(f"a dashboard panel is a subclass of tlwidgets.ui.Panel, got {cls!r}")
    name = cls.name
    public = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
    if not public or keyword.iskeyword(name):
        raise ValueError(
            f"{cls.__name__}.name must be a public Python identifier "
            f"(it becomes dashboard.<name>), got {name!r}"
        )
    if cls.slot not in SLOTS:
        raise ValueError(f"{cls.__name__}.slot must be one of {', '.join(SLOTS)}, got {cls.slot!r}")
    events = cls.events
    if not isinstance(events, tuple):
        raise TypeError(f"{cls.__name__}.events must be a tuple of tlw.Event, got {type(events).__name__}")
    for ev in events:
        try:
            Event(ev)
        except ValueError:
            known = ", ".join(e.value for e in Event)
            raise ValueError(f"{cls.__name__}.events: {ev!r} is not an event; choose from {known}") from None
    return cls


def register_panel(cls: type[Panel], *, replace: bool = False) -> type[Panel]:
    """Add a panel class to :data:`PANELS` (every later ``Dashboard`` builds it); returns ``cls``.

    Usable as a class decorator. Registered panels are shown after the
    built-in ones of the same slot.

    Parameters
    ----------
    cls
        A :class:`~tlwidgets.ui.Panel` subclass.
    replace
        Replace a registered panel of the same name (else that is a ValueError).
    """
    check_panel_class(cls)
    old = PANELS.get(cls.name)
    if old is not None and old is not cls and not replace:
        raise ValueError(
            f"a panel named {cls.name!r} is registered already ({old.__module__}.{old.__qualname__}); "
            "pass replace=True to replace it"
        )
    PANELS[cls.name] = cls
    return cls


def unregister_panel(name: str) -> type[Panel]:
    """Remove the panel ``name`` from :data:`PANELS`; returns its class."""
    try:
        return PANELS.pop(name)
    except KeyError:
        raise KeyError(f"no panel named {name!r}; registered: {', '.join(PANELS)}") from None


def resolve_parts(parts: Iterable[str | type[Panel]] | None) -> list[type[Panel]]:
    """The panel classes a dashboard builds for ``parts`` (names or classes; None: every registered one).

    Required panels (``required = True``) are always included, in registry
    order before the others asked for.
    """
    if parts is None:
        return list(PANELS.values())
    if isinstance(parts, str):
        raise TypeError(f"parts must be a list of panel names or classes, not the string {parts!r}")
    chosen: list[type[Panel]] = []
    for part in parts:
        if isinstance(part, str):
            if part not in PANELS:
                raise ValueError(f"no panel named {part!r}; registered panels: {', '.join(PANELS)}")
            cls = PANELS[part]
        else:
            cls = check_panel_class(part)
        if any(c.name == cls.name for c in chosen):
            raise ValueError(f"parts names the panel {cls.name!r} twice")
        chosen.append(cls)
    required = [c for c in PANELS.values() if c.required and all(c.name != k.name for k in chosen)]
    return required + chosen


for _cls in BUILTIN_PANELS:
    register_panel(_cls)
del _cls
