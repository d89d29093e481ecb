"""Action buttons: one ``tlw-fix`` button per :class:`~tlwidgets.core.actions.Action`, shared by panels.

The findings panel (a button box on each finding's card) and the fit panel (one box for the fit's
fixes) show actions the same way: a button whose label is the action's, never squeezed (a label cut
off with an ellipsis would hide what the action does: "Rewind to step 0 and set lr=0.044"), that
applies the action through the session's controls when clicked, pausing a dashboard run first (a
rewind cannot happen mid-run), and a confirmation line (``tlw-fix-done``) of what was done.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ipywidgets as widgets

__all__ = ["NO_SHRINK", "ActionButtons", "confirmation_html"]

#: Flex of a box of buttons: as wide as their labels, never squeezed by the text beside them.
NO_SHRINK = "0 0 auto"


def confirmation_html(lines: Iterable[str]) -> str:
    """The confirmation lines of applied actions, one ``<div class="tlw-fix-done">`` each (HTML)."""
    return "".join(f'<div class="tlw-fix-done">&#10003; {html.escape(line)}</div>' for line in lines)


class ActionButtons:
    """The ``tlw-fix`` buttons of one offer of actions (a finding's, or the fit panel's), in :attr:`box`.

    :meth:`show` sets the actions offered; the buttons are rebuilt only when their labels change (a
    redraw with the same offer keeps the widgets, and a click then applies the newest action of that
    label). A click applies the action through ``guard`` (an exception is shown in the dashboard);
    while the host's run goes on, the run is paused first and the action applied once it stopped.
    The buttons are as wide as their labels.

    Parameters
    ----------
    guard
        Decorator factory reporting callback exceptions (``guard(where)(callback)``).
    on_applied
        Called after an action was applied (the panel redraws: the action changed the session).
    where
        What a click is reported as in the dashboard's error area, e.g. ``"fix lr-too-high"``.
    host
        The dashboard (its ``task``, the run under way, and ``pause()``); ``None``: applied at once.
    vertical
        A column of buttons that never shrinks (beside a finding's card text, which wraps instead)
        rather than rows that wrap (the fit panel).

    Attributes
    ----------
    box
        The widget to place: a ``VBox`` (vertical) or ``HBox`` with CSS class ``tlw-fixes``.
    """

    def __init__(
        self,
        guard: Callable[[str], Callable],
        on_applied: Callable[[], None],
        *,
        where: str = "fix",
        host: Any = None,
        vertical: bool = False,
    ) -> None:
        self.box: widgets.Box
        if vertical:
            column = widgets.Layout(width="auto", align_items="stretch", flex=NO_SHRINK)
            self.box = widgets.VBox(layout=column)
        else:
            self.box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.box.add_class("tlw-fixes")
        self._guard = guard
        self._on_applied = on_applied
        self._where = where
        self._host = host
        self._session: Any = None
        self._labels: tuple[str, ...] = ()
        self._actions: dict[str, Any] = {}

    @property
    def buttons(self) -> list[widgets.Button]:
        """The ``tlw-fix`` buttons shown, first action first."""
        return list(self.box.children)

    def show(self, actions: Sequence[Any], session: Any = None) -> None:
        """Offer ``actions`` (each with ``label``, ``description`` and ``apply()``) of ``session``."""
        actions = tuple(actions)
        self._session = session
        self._actions = {a.label: a for a in actions}
        labels = tuple(a.label for a in actions)
        if labels == self._labels:
            return
        for b in self.box.children:
            b.close()
        buttons = []
        for a in actions:
            b = widgets.Button(
                description=a.label,
                tooltip=a.description,
                button_style="success",
                layout=widgets.Layout(width="auto"),
            )
            b.add_class("tlw-fix")
            b.on_click(self._guard(self._where)(self._clicked(a.label)))
            buttons.append(b)
        self.box.children = buttons
        self._labels = labels

    def close(self) -> None:
        """Close the buttons and the box."""
        for b in self.box.children:
            b.close()
        self.box.close()

    def _clicked(self, label: str) -> Callable[[Any], None]:
        def click(_button: Any) -> None:
            action = self._actions.get(label)
            if action is None:
                raise RuntimeError(f"{label!r} is no longer offered")
            task = getattr(self._host, "task", None)
            if getattr(self._session, "running", False) and task is not None and not task.done():
                # Pause first; apply once the run task has stopped (after the dashboard's own callback).
                self._host.pause()
                later = self._guard(f"fix {label}")(lambda _task: self._apply(action))
                task.add_done_callback(later)
                return
            self._apply(action)

        return click

    def _apply(self, action: Any) -> None:
        """Apply ``action`` (its confirmation line is kept by the session) and let the panel redraw."""
        action.apply()
        self._on_applied()
