"""Diagnostics: rules that turn recorded numbers into named findings.

Importing this package registers :class:`~tlwidgets.diagnostics.engine.RuleDiagnoser`
as the default diagnoser of every Runner and watcher (see
``docs/architecture.md``: the core never imports diagnostics).
"""

from tlwidgets.core.plugins import register_default_diagnoser
from tlwidgets.diagnostics.engine import RuleDiagnoser
from tlwidgets.diagnostics.fit import Baseline, FitReport, Verdict, assess_fit, fit_actions, fit_report

__all__ = ["Baseline", "FitReport", "RuleDiagnoser", "Verdict", "assess_fit", "fit_actions", "fit_report"]

register_default_diagnoser(RuleDiagnoser)
