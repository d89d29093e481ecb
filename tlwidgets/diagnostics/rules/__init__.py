"""The default rule set: setup audit, per-stage, trend and own-loop rules.

Each rule is a :class:`~tlwidgets.diagnostics.rules.base.Rule` (name, codes,
kind, what data it needs, and a pure function of the session and record).
:class:`~tlwidgets.diagnostics.engine.RuleDiagnoser` runs them; thresholds
and why they hold on healthy runs are listed in ``docs/findings.md``.
"""

from tlwidgets.diagnostics.rules.base import Rule, RuleContext, SessionState, rule
from tlwidgets.diagnostics.rules.distributed import DISTRIBUTED_RULES
from tlwidgets.diagnostics.rules.loop import LOOP_RULES
from tlwidgets.diagnostics.rules.setup import SETUP_RULES
from tlwidgets.diagnostics.rules.stage import STAGE_RULES
from tlwidgets.diagnostics.rules.trend import TREND_RULES

__all__ = ["DEFAULT_RULES", "Rule", "RuleContext", "SessionState", "default_rules", "rule"]

#: Every rule of the default set, in evaluation order.
DEFAULT_RULES: tuple[Rule, ...] = (
    *SETUP_RULES,
    *STAGE_RULES,
    *TREND_RULES,
    *LOOP_RULES,
    *DISTRIBUTED_RULES,
)


def default_rules() -> list[Rule]:
    """A fresh list of the default rules (safe to filter or extend)."""
    return list(DEFAULT_RULES)
