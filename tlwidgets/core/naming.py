"""Resolve user-given module/parameter names to parameters (dotted-path subtrees)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["matches", "resolve_names"]


def matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` is ``name`` or a dotted-path ancestor of it.

    ``"layer1"`` matches ``"layer1.0.conv.weight"`` but not ``"layer10.weight"``.
    The empty pattern matches everything (the whole model).
    """
    return pattern == "" or name == pattern or name.startswith(pattern + ".")


def resolve_names(patterns: Iterable[str], param_names: Sequence[str]) -> list[str]:
    """Parameter names selected by ``patterns`` (model order, no duplicates).

    Raises
    ------
    TypeError
        When a pattern is not a string.
    KeyError
        When a pattern matches nothing, naming close candidates.
    """
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"names must be strings (module or parameter names), got {type(pattern).__name__}"
            )
        hits = [n for n in param_names if matches(n, pattern)]
        if not hits:
            roots = sorted({n.split(".")[0] for n in param_names})
            raise KeyError(
                f"{pattern!r} matches no module or parameter; top-level names are: {', '.join(roots[:20])}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(param_names)}
    return sorted(chosen, key=order.__getitem__)
