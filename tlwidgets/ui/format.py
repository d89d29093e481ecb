"""HTML for stage records, numbers and name lists (shared by the panels)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tlwidgets.core.facts import (
    BackwardFacts,
    FetchFacts,
    ForwardFacts,
    LossFacts,
    StageFacts,
    StepFacts,
    ToDeviceFacts,
    ZeroGradFacts,
)

__all__ = ["fmt", "fmt_bytes", "names_html", "record_html", "table_html"]

esc = html.escape

#: Most rows a per-parameter or per-module table shows (the rest are counted).
MAX_ROWS = 40


def fmt(value: Any) -> str:
    """A number in a short human form (3 significant digits, scientific when small/large)."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e4:
            return f"{v:.4g}"
        return f"{v:.2e}"
    if isinstance(value, tuple) and all(isinstance(x, (int, np.integer)) for x in value):
        return "(" + ", ".join(str(int(x)) for x in value) + ("," if len(value) == 1 else "") + ")"
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def fmt_bytes(n: Any) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]], *, css: str = "tlw-table") -> str:
    """A compact HTML table; at most :data:`MAX_ROWS` rows, then a count of the rest."""
    rows = list(rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows[:MAX_ROWS]:
        body.append(
            "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else esc(fmt(c))}</td>" for c in row) + "</tr>"
        )
    if len(rows) > MAX_ROWS:
        body.append(f"<tr><td colspan='{len(header)}'>… {len(rows) - MAX_ROWS} more rows</td></tr>")
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Cell content that is already HTML."""


def names_html(names: Sequence[str], css: str, limit: int = 30) -> str:
    """Names as small coloured chips."""
    shown = "".join(f"<span class='tlw-name {css}'>{esc(n)}</span>" for n in names[:limit])
    more = f" <small>(+{len(names) - limit} more)</small>" if len(names) > limit else ""
    return shown + more


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table class='tlw-kv'>{cells}</table>"


def _list(names: Sequence[str], empty: str = "none") -> str:
    if not names:
        return esc(empty)
    shown = ", ".join(names[:12])
    return shown + (f" (+{len(names) - 12} more)" if len(names) > 12 else "")


def _per_param(names: Sequence[str], columns: dict[str, Any]) -> str:
    arrays = {k: np.asarray(v, dtype=float) for k, v in columns.items() if v is not None}
    rows = []
    for i, n in enumerate(names):
        rows.append([n, *[a[i] if i < len(a) else None for a in arrays.values()]])
    more = " (scroll for all)" if len(names) > 8 else ""
    caption = f"<div><small>{len(names)} parameter tensor(s){more}</small></div>"
    return caption + table_html(["parameter", *arrays.keys()], rows)


def record_html(record: Any, param_names: Sequence[str] = ()) -> str:
    """Everything a stage record holds, as HTML (tables for tensors, parameters and modules)."""
    if record is None:
        return "<i>this stage has not run yet</i>"
    data: StageFacts = getattr(record, "data", None) or StageFacts()
    stage = getattr(record, "stage", None)
    name = getattr(stage, "value", str(stage))
    status = getattr(record, "status", "ok")
    # "step N" is the 1-based optimizer step the stage belongs to, the number the status line shows
    # once that step is done (record.step counts the steps done before it).
    how = (
        "<span title='every element of every tensor was measured'>exact statistics</span>"
        if record.exact
        else "<span title='norms are estimated from a fixed sample of each large tensor "
        "(step a stage alone for exact numbers)'>statistics on a sample</span>"
    )
    head = (
        f"<div class='tlw-record-head tlw-record-{esc(status)}'><b>{esc(name)}</b> · "
        f"<span title='record.step = {record.step} steps done before it'>step {record.step + 1}</span> · "
        f"epoch {record.epoch} · batch {record.batch} · <b>{esc(status)}</b> · "
        f"{how} · {1000 * record.duration_s:.2f} ms</div>"
    )
    parts = [head]
    if record.error is not None:
        parts.append(
            f"<div class='tlw-record-error'><b>{esc(record.error.type)}</b>: {esc(record.error.message)}"
            f"<details><summary>traceback</summary><pre>{esc(record.error.traceback)}</pre></details></div>"
        )
    used: set[str] = set()

    def take(*keys: str) -> list[tuple[str, Any]]:
        out = []
        for k in keys:
            value = getattr(data, k, None)
            if value is not None:
                used.add(k)
                out.append((k.replace("_", " "), value))
        return out

    if isinstance(data, FetchFacts):
        parts.append(_kv(take("structure", "batch_size", "non_finite", "input_std", "input_absmax")))
        tensors = data.tensors or {}
        used.add("tensors")
        if tensors:
            rows = [
                [
                    path,
                    tuple(t.get("shape", ())),
                    t.get("dtype"),
                    t.get("device"),
                    _Raw(esc(fmt_bytes(t.get("bytes")))),
                    t.get("min"),
                    t.get("max"),
                    t.get("mean"),
                    t.get("std"),
                    t.get("non_finite"),
                ]
                for path, t in tensors.items()
            ]
            parts.append(
                table_html(
                    ["tensor", "shape", "dtype", "device", "size", "min", "max", "mean", "std", "NaN/Inf"],
                    rows,
                )
            )
        counts = data.label_counts
        used.add("label_counts")
        if counts is not None and len(counts):
            counts = np.asarray(counts)
            top = counts.max() or 1
            # Inline styles: the bars show even where the dashboard's stylesheet is not loaded (a record
            # rendered on its own, or a front end that drops the <style> element).
            bars = "".join(
                f"<div class='tlw-bar-row' style='display:flex;gap:6px;align-items:center;font-size:11px'>"
                f"<span style='min-width:2em;text-align:right'>{i}</span>"
                f"<span class='tlw-bar' style='display:inline-block;height:8px;background:#6baed6;"
                f"width:{max(80 * c / top, 1 if c else 0):.0f}px'></span><span>{int(c)}</span></div>"
                for i, c in enumerate(counts[:30])
            )
            more = f"<small>(first 30 of {len(counts)} classes)</small>" if len(counts) > 30 else ""
            parts.append(f"<div><b>labels in this batch</b> <small>(class: count)</small>{bars}{more}</div>")
    elif isinstance(data, ZeroGradFacts):
        parts.append(_kv(take("grads_before", "grads_after")))
        used.add("not_cleared")
        parts.append(f"<div>grads not cleared: {esc(_list(data.not_cleared or []))}</div>")
    elif isinstance(data, ToDeviceFacts):
        pairs = take("device", "devices_before", "devices", "param_devices")
        if data.bytes is not None:
            used.add("bytes")
            pairs.append(("bytes moved", fmt_bytes(data.bytes)))
        parts.append(_kv(pairs))
    elif isinstance(data, ForwardFacts):
        parts.append(
            _kv(
                take(
                    "training",
                    "grad_enabled",
                    "eval_modules",
                    "output_shape",
                    "output_dtype",
                    "output_min",
                    "output_max",
                    "output_mean",
                    "output_std",
                    "output_non_finite",
                    "non_finite_origin",
                )
            )
        )
        acts = data.activations or {}
        used.add("activations")
        if acts:
            rows = [
                [m, s.get("mean"), s.get("std"), s.get("frac_zero"), s.get("dead_frac"), s.get("non_finite")]
                for m, s in acts.items()
            ]
            parts.append(table_html(["module", "mean", "std", "frac zero", "dead units", "NaN/Inf"], rows))
        else:
            parts.append(
                "<div><small>no activation statistics this step (they are taken on a schedule)</small></div>"
            )
    elif isinstance(data, LossFacts):
        pairs = take(
            "loss",
            "expected_initial_loss",
            "finite",
            "requires_grad",
            "loss_fn",
            "reduction",
            "output_shape",
            "target_shape",
            "target_dtype",
            "batch_size",
            "output_is_probability",
            "output_is_log_probability",
        )
        for k in ("output_row_sum_dev", "output_logsumexp_dev"):
            used.add(k)
        parts.append(_kv(pairs))
        if data.reached is not None:
            used.update(("reached", "unreached"))
            parts.append(
                f"<div>the loss reaches {len(data.reached)} parameter tensor(s); "
                f"trainable but not reached: {esc(_list(data.unreached or []))}</div>"
            )
    elif isinstance(data, BackwardFacts):
        parts.append(_kv(take("total_grad_norm", "grad_exact", "clip_ratio")))
        used.update(("missing_grad", "non_finite_grad", "grad_norm"))
        parts.append(f"<div>no gradient: {esc(_list(data.missing_grad or []))}</div>")
        parts.append(f"<div>NaN/Inf gradient: {esc(_list(data.non_finite_grad or []))}</div>")
        if data.grad_norm is not None and param_names:
            parts.append(_per_param(param_names, {"grad norm": data.grad_norm}))
    elif isinstance(data, StepFacts):
        parts.append(_kv(take("lr", "update_exact", "rolled_back")))
        used.update(("changed", "frozen_changed", "update_norm", "weight_norm", "update_ratio"))
        parts.append(f"<div>frozen but changed: {esc(_list(data.frozen_changed or []))}</div>")
        if data.update_norm is not None and param_names:
            parts.append(
                _per_param(
                    param_names,
                    {
                        "update norm": data.update_norm,
                        "weight norm": data.weight_norm,
                        "update/weight": data.update_ratio,
                    },
                )
            )
    rest = [(k, v) for k, v in data.items() if k not in used and not isinstance(v, (dict, np.ndarray))]
    if rest:
        parts.append(_kv(rest))
    findings = getattr(record, "findings", None) or []
    if findings:
        parts.append("".join(f._repr_html_() for f in findings))
    return "<div class='tlw-record'>" + "".join(parts) + "</div>"
