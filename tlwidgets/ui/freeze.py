"""Freeze panel: the module tree with a trainable / frozen / partly toggle per module."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import numpy as np
from torch import nn
from traitlets import Int

from tlwidgets.ui.panel import LRFollowingPanel, PanelHost

__all__ = ["FreezePanel", "blocks", "module_rows"]

#: Most module rows shown; deeper levels are dropped first when a model has more.
MAX_ROWS = 120
_STATE_LOOK = {
    "trainable": ("success", "unlock", "trainable: click to freeze"),
    "frozen": ("info", "lock", "frozen: click to unfreeze"),
    "partly": ("warning", "adjust", "partly frozen: click to freeze all of it"),
}
#: Tooltip of a toggle whose parameters are trainable but in no optimizer group: freezing them would
#: make the setup consistent and the finding go away while they still never train.
_MISSING_TIP = "in no optimizer group: it cannot train. Use 'add to optimizer'; freezing would not train it"


def module_rows(
    model: nn.Module, param_names: list[str], max_rows: int = MAX_ROWS
) -> list[tuple[str, int, list[int]]]:
    """``(module name, depth, indices of its parameters)`` for modules that hold parameters.

    The deepest levels are dropped until at most ``max_rows`` rows remain.
    """
    index = {n: i for i, n in enumerate(param_names)}
    rows = []
    for name, module in model.named_modules():
        if not name:
            continue
        idx = [index[f"{name}.{k}"] for k, _ in module.named_parameters() if f"{name}.{k}" in index]
        if idx:
            rows.append((name, name.count("."), idx))
    depth = max((d for _, d, _ in rows), default=0)
    while depth > 0 and len(rows) > max_rows:
        rows = [r for r in rows if r[1] < depth]
        depth -= 1
    return rows[:max_rows]


def blocks(model: nn.Module, param_names: list[str]) -> list[str]:
    """Blocks for gradual unfreezing, input side first.

    Starts from the top-level children that hold parameters and splits the
    biggest block into its children while it holds more than half of all
    parameters (e.g. a ResNet's ``layer4`` becomes ``layer4.0``, ``layer4.1``),
    so "the next block" is a meaningful slice of a backbone.
    """
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values()) or 1
    modules = dict(model.named_modules())

    def size(name: str) -> int:
        prefix = name + "."
        return sum(v for k, v in sizes.items() if k.startswith(prefix))

    def children(name: str) -> list[str]:
        mod = modules[name]
        out = [
            f"{name}.{c}" if name else c for c, m in mod.named_children() if any(True for _ in m.parameters())
        ]
        return out

    current = children("")
    if not current:
        return [""]
    for _ in range(8):
        big = max(current, key=size)
        kids = children(big)
        if size(big) <= total / 2 or len(kids) < 2:
            break
        i = current.index(big)
        current = current[:i] + kids + current[i + 1 :]
    # Direct parameters of the root (rare) form their own block at the end.
    if any("." not in n for n in param_names):
        current.append("")
    return current


class FreezePanel(LRFollowingPanel, widgets.VBox):
    """One row per module: name (indented by depth), a toggle (CSS ``tlw-freeze``), parameter
    counts, optimizer group and LR; a "freeze batch-norm statistics" option and a button that
    unfreezes the next block from the output side (gradual unfreezing).

    Parameters
    ----------
    session
        A Runner or Watcher (its ``freeze``/``unfreeze`` do the work).
    guard
        Decorator reporting callback exceptions in the dashboard.
    on_change
        Called after an action so the dashboard redraws.
    """

    name = "freeze"
    slot = "tabs"
    caption = "Freeze"

    frozen_count = Int(0, help="Parameter tensors frozen now.")

    @classmethod
    def build(cls, host: PanelHost) -> FreezePanel:
        panel = cls(host.session, host.guard, host.refresh)
        panel.remember_lrs()
        return panel

    def __init__(
        self, session: Any, guard: Callable[[str], Callable], on_change: Callable[[], None], **kwargs: Any
    ) -> None:
        self.session = session
        self._on_change = on_change
        self._guard = guard
        self._updating = False
        names = list(session.param_names)
        self.rows = module_rows(session.model, names)
        self.sizes = np.array([p.numel() for _, p in session.named_params], dtype=np.int64)
        self.toggles: dict[str, widgets.ToggleButton] = {}
        self.infos: dict[str, widgets.HTML] = {}
        self.states: dict[str, str] = {}
        self._looks: dict[str, tuple[str, bool]] = {}
        #: One "add to optimizer" button per row (CSS ``tlw-add-to-optimizer``), shown while some of the
        #: row's parameters are trainable but in no optimizer group.
        self.add_buttons: dict[str, widgets.Button] = {}
        lines = []
        for name, depth, _idx in self.rows:
            toggle = widgets.ToggleButton(
                value=False, description="trainable", layout=widgets.Layout(width="110px")
            )
            toggle.add_class("tlw-freeze")
            toggle.add_class("tlw-freeze-" + name.replace(".", "-"))
            toggle.observe(guard(f"freeze toggle {name}")(self._toggled(name)), names="value")
            label = widgets.HTML(
                f"<span class='tlw-module' style='padding-left:{14 * depth}px'>{html.escape(name)}</span>",
                layout=widgets.Layout(width="200px"),
            )
            info = widgets.HTML(layout=widgets.Layout(width="auto"))
            add = widgets.Button(
                description="add to optimizer",
                icon="plus",
                button_style="warning",
                layout=widgets.Layout(width="auto", display="none"),
                tooltip="Add the trainable parameters of this module that are in no optimizer group",
            )
            add.add_class("tlw-add-to-optimizer")
            add.on_click(guard(f"add {name} to the optimizer")(self._adder(name)))
            self.toggles[name] = toggle
            self.infos[name] = info
            self.add_buttons[name] = add
            lines.append(
                widgets.HBox([label, toggle, add, info], layout=widgets.Layout(align_items="center"))
            )
        self.tree = widgets.VBox(lines, layout=widgets.Layout(max_height="360px", overflow="auto"))
        self.bn_stats = widgets.Checkbox(
            value=bool(getattr(session, "freeze_bn_stats", False)),
            description="freeze batch-norm statistics",
            indent=False,
            tooltip="Frozen batch-norm layers go to eval mode so their running mean/var stay put",
            layout=widgets.Layout(width="auto"),
        )
        self.bn_stats.add_class("tlw-freeze-bn")
        self.bn_stats.observe(guard("freeze batch-norm statistics")(self._bn_changed), names="value")
        self.blocks = blocks(session.model, names)
        self.next_button = widgets.Button(
            description="unfreeze next block",
            icon="level-down",
            layout=widgets.Layout(width="auto"),
            tooltip="Gradual unfreezing: unfreeze the frozen block closest to the output",
        )
        self.next_button.add_class("tlw-unfreeze-next")
        self.next_button.on_click(guard("unfreeze next block")(lambda _b: self.unfreeze_next()))
        self.summary = widgets.HTML()
        super().__init__(
            children=[
                widgets.HBox(
                    [self.summary, self.bn_stats, self.next_button],
                    layout=widgets.Layout(flex_flow="row wrap", align_items="center"),
                ),
                self.tree,
            ],
            **kwargs,
        )
        self.add_class("tlw-freeze-panel")

    # -- actions ----------------------------------------------------------------------------
    def _toggled(self, name: str) -> Callable[[dict[str, Any]], None]:
        def on_change(change: dict[str, Any]) -> None:
            if self._updating:
                return
            if change["new"]:
                self.session.freeze(name, bn_eval=self.bn_stats.value)
            else:
                self.session.unfreeze(name)
            self.draw(self.session)
            self._on_change()

        return on_change

    def _adder(self, name: str) -> Callable[[Any], None]:
        def on_click(_button: Any) -> None:
            self.add_to_optimizer(name)

        return on_click

    def add_to_optimizer(self, name: str) -> list[str]:
        """Add the trainable parameters of module ``name`` that are in no optimizer group; returns them.

        Through the ``param-not-in-optimizer`` finding's own action when one names them (so the finding
        is resolved and the card shows what was done), else ``unfreeze(*params)`` (a new group with the
        optimizer's defaults).
        """
        missing = self._missing(name)
        if not missing:
            return []
        for f in getattr(self.session, "active_findings", ()):
            if f.code == "param-not-in-optimizer" and set(missing) & set(f.params) and f.actions:
                f.actions[0].apply()
                break
        else:
            self.session.unfreeze(*missing)
        self.draw(self.session)
        self._on_change()
        return missing

    def _missing(self, name: str) -> list[str]:
        """Parameters of row ``name`` that are trainable and in no optimizer group."""
        idx = next((i for n, _d, i in self.rows if n == name), [])
        groups = _groups(self.session)
        params = dict(self.session.named_params)
        names = [self.session.param_names[i] for i in idx]
        return [n for n in names if params[n].requires_grad and groups.get(n) is None]

    def _bn_changed(self, change: dict[str, Any]) -> None:
        if self._updating:
            return
        # One recorded control: the option for later freezes, applied to (or released from) the
        # batch-norm layers frozen already.
        self.session.set_bn_eval(bool(change["new"]))
        self._on_change()

    def next_block(self) -> str | None:
        """The block that "unfreeze next block" would unfreeze (None when all are trainable)."""
        rg = {n: p.requires_grad for n, p in self.session.named_params}
        for block in reversed(self.blocks):
            prefix = block + "." if block else ""
            names = [n for n in rg if (n.startswith(prefix) if block else "." not in n)]
            if any(not rg[n] for n in names):
                return block
        return None

    def unfreeze_next(self) -> str | None:
        """Unfreeze the frozen block closest to the output; returns its name."""
        block = self.next_block()
        if block is None:
            return None
        if block:
            self.session.unfreeze(block)
        else:
            self.session.unfreeze(*[n for n in self.session.param_names if "." not in n])
        self.draw(self.session)
        self._on_change()
        return block

    # -- drawing ------------------------------------------------------------------------------
    def state_of(self, name: str) -> str:
        return self.states.get(name, "trainable")

    def draw(self, session: Any) -> None:
        """Toggle states, counts, groups and LRs from the model and optimizer."""
        rg = np.array([p.requires_grad for _, p in session.named_params], dtype=bool)
        groups = _groups(session)
        group_list = [groups.get(n) for n in session.param_names]
        closed = bool(getattr(session, "closed", False))
        lrs = [float(g["lr"]) for g in session.optimizer.param_groups]
        self._updating = True
        try:
            for name, _depth, idx in self.rows:
                sub = rg[idx]
                state = "trainable" if sub.all() else ("frozen" if not sub.any() else "partly")
                toggle = self.toggles[name]
                missing = [i for i in idx if rg[i] and group_list[i] is None]
                # A row wholly outside the optimizer cannot be "fixed" by freezing it: the toggle waits
                # for "add to optimizer" (freezing from code stays possible, on purpose).
                locked = closed or (bool(missing) and len(missing) == len(idx))
                look = (state, locked)
                if self.states.get(name) != state or self._looks.get(name) != look:
                    style, icon, tip = _STATE_LOOK[state]
                    with toggle.hold_sync():
                        toggle.value = state == "frozen"
                        toggle.description = state
                        toggle.button_style = style
                        toggle.icon = icon
                        toggle.tooltip = (
                            "the session is closed" if closed else _MISSING_TIP if locked else tip
                        )
                        toggle.disabled = locked
                    self.states[name] = state
                    self._looks[name] = look
                add = self.add_buttons[name]
                shown = "inline-flex" if missing and not closed else "none"
                if add.layout.display != shown:
                    add.layout.display = shown
                total = int(self.sizes[idx].sum())
                frozen = int(self.sizes[idx][~sub].sum())
                gs = sorted({group_list[i] for i in idx}, key=lambda g: -1 if g is None else g)
                where = ", ".join(
                    ("not in optimizer: will not train" if missing else "not in optimizer")
                    if g is None
                    else f"group {g} · lr {lrs[g]:.1e}"
                    for g in gs
                )
                text = (
                    f"<small>{total:,} params"
                    + (f" ({frozen:,} frozen)" if 0 < frozen < total else "")
                    + f" · {html.escape(where)}</small>"
                )
                if self.infos[name].value != text:
                    self.infos[name].value = text
            # Checked while the option is on or some frozen batch-norm layer is held in eval mode
            # (freeze(..., bn_eval=True) holds layers without turning the option on).
            option = bool(getattr(session, "freeze_bn_stats", False)) or bool(getattr(session, "bn_eval", ()))
            if self.bn_stats.value != option:  # set from code (set_bn_eval) or restored
                self.bn_stats.value = option
            self.bn_stats.disabled = closed
            self.next_button.disabled = closed
        finally:
            self._updating = False
        n_frozen = int((~rg).sum())
        self.frozen_count = n_frozen
        nxt = self.next_block()
        self.next_button.disabled = closed or nxt is None
        self.next_button.tooltip = (
            f"unfreeze {nxt or '(model root)'}" if nxt is not None else "every block is trainable"
        )
        frozen_params = int(self.sizes[~rg].sum())
        summary = (
            f"<small><b>{int(self.sizes.sum()) - frozen_params:,}</b> trainable / "
            f"{int(self.sizes.sum()):,} parameters · "
            f"{n_frozen} of {len(rg)} tensors frozen</small>"
        )
        if summary != self.summary.value:
            self.summary.value = summary


def _groups(session: Any) -> dict[str, int | None]:
    return session.param_group_of() if hasattr(session, "param_group_of") else _group_of(session)


def _group_of(session: Any) -> dict[str, int | None]:
    where = {id(p): i for i, g in enumerate(session.optimizer.param_groups) for p in g["params"]}
    return {n: where.get(id(p)) for n, p in session.named_params}
