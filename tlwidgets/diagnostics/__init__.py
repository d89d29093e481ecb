"""Diagnostics: rules that turn recorded numbers into named findings.

Importing this package registers :class:`~tlwidgets.diagnostics.engine.RuleDiagnoser`
as the default diagnoser of every Runner and watcher (see
``docs/architecture.md``: the core never imports diagnostics).
"""

from tlwidgets.core.plugins import register_default_diagnoser
from tlwidgets.diagnostics.engine import RuleDiagnoser

__all__ = ["RuleDiagnoser"]

register_default_diagnoser(RuleDiagnoser)
