"""Reading decisions without a dashboard: text tables of a decision log or a plan, and a
heatmap of predicted pairwise retention (matplotlib, optional)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .exceptions import InvalidParameterError

__all__ = ["decisions_table", "load_report_source", "plan_table", "plot_retention_heatmap"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{float(value):.{digits}f}"


def _span(interval: Sequence[float] | None) -> str:
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else ""


def _signals(signals: Mapping[str, Any] | None) -> str:
    """``name=value`` of the signals a prediction read (``—`` for a missing one; three
    significant digits, so a small signal does not read as zero)."""

    def value(v: Any) -> str:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return f"{v:.3g}" if math.isfinite(v) else "—"
        return "—" if v is None else str(v)

    return ", ".join(f"{name}={value(v)}" for name, v in (signals or {}).items())


def load_report_source(path: str | os.PathLike) -> tuple[str, Any]:
    """``("plan", document)`` for a plan JSON, ``("log", records)`` for a decision log."""
    from .decision_log import read_log
    from .policy import PLAN_SCHEMA

    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"{path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict) and document.get("schema") == PLAN_SCHEMA:
        return "plan", document
    records = read_log(path)
    if not records:
        raise InvalidParameterError(f"{path} is neither a mergeprobe plan nor a decision log")
    return "log", records


def decisions_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The last decision of each run in a log: one row per compared partner, then the reason."""
    latest: dict[str, Mapping[str, Any]] = {}
    stopped: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if record.get("event") == "decision":
            latest[record.get("run", "?")] = record
        elif record.get("event") == "stopped":
            stopped[record.get("run", "?")] = record
    if not latest:
        return ["(no decision record)"]
    lines = [
        f"{'run':<20} {'decision':<9} {'step':>6} {'partner':<20} {'R self':>7} "
        f"{'R partner':>9}  {'interval':<16} {'partner state':<14} predicted from"
    ]
    for run, record in latest.items():
        pairs = record.get("pairs") or [{}]
        for k, pair in enumerate(pairs):
            first = k == 0
            row = (
                f"{run if first else '':<20} {record.get('decision', '') if first else '':<9} "
                f"{str(record.get('step', '')) if first else '':>6} {pair.get('with', '—'):<20} "
                f"{_fmt(pair.get('retention_self')):>7} {_fmt(pair.get('retention_other')):>9}  "
                f"{_span(pair.get('interval')):<16} {pair.get('partner_state') or '':<14} "
                f"{_signals(pair.get('signals'))}"
            )
            lines.append(row.rstrip())
        for reason in record.get("reasons") or []:
            lines.append(f"{'':<20} reason: {reason}")
        if run in stopped:
            lines.append(f"{'':<20} stopped at step {stopped[run].get('step')}")
    return lines


def plan_table(plan: Mapping[str, Any]) -> list[str]:
    """Served models with their members' predicted retention, then pruned adapters."""
    summary = plan.get("summary") or {}
    policy = plan.get("policy") or {}
    lines = [
        f"{summary.get('adapters', '?')} adapters -> {summary.get('served_models', '?')} served "
        f"models ({summary.get('merged_groups', 0)} merged, {summary.get('routed', 0)} routed, "
        f"{summary.get('pruned', 0)} pruned); tau {policy.get('tau', '?')}",
        "",
        f"{'model':<20} {'decision':<9} {'method':<7} {'member':<20} {'weight':>6} "
        f"{'R pred':>7}  interval",
    ]
    for served in plan.get("served", []):
        weights = served.get("weights") or {}
        for k, member in enumerate(served["members"]):
            first = k == 0
            predicted = (served.get("predicted") or {}).get(member) or {}
            lines.append(
                f"{served['name'] if first else '':<20} "
                f"{served['decision'] if first else '':<9} "
                f"{(served.get('method') or '—') if first else '':<7} {member:<20} "
                f"{_fmt(weights.get(member, 1.0), 2):>6} {_fmt(predicted.get('retention')):>7}  "
                f"{_span(predicted.get('interval'))}"
            )
    for entry in plan.get("pruned", []):
        lines.append(
            f"{'(pruned)':<20} {'prune':<9} {'—':<7} {entry['name']:<20} {'':>6} {'':>7}  "
            f"served by {entry['served_by']}"
        )
    return lines


def _retention_matrix(kind: str, source: Any, method: str) -> tuple[list[str], list[list[float]]]:
    values: dict[tuple[str, str], float] = {}
    if kind == "plan":
        names = list(source.get("adapters") or {})
        for pair in source.get("pairs", []):
            value = (pair.get("retention") or {}).get(method)
            if value is not None:
                values[(pair["self"], pair["other"])] = float(value)
    else:
        names = []
        for record in source:
            if record.get("event") != "decision":
                continue
            run = record.get("run", "?")
            for pair in record.get("pairs") or []:
                if pair.get("method", method) != method:
                    continue
                for a, b, key in (
                    (run, pair["with"], "retention_self"),
                    (pair["with"], run, "retention_other"),
                ):
                    if pair.get(key) is not None:
                        values[(a, b)] = float(pair[key])
                names += [n for n in (run, pair["with"]) if n not in names]
    matrix = [[values.get((a, b), math.nan) if a != b else math.nan for b in names] for a in names]
    return names, matrix


def plot_retention_heatmap(
    source: Any, path: str | os.PathLike, *, kind: str = "plan", method: str = "direct"
) -> Path:
    """Heatmap of predicted ``R_{row|column}`` (row's retention when merged with column)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidParameterError(
            "the heatmap needs matplotlib: pip install 'mergeprobe[plot]'"
        ) from exc
    import numpy as np

    names, matrix = _retention_matrix(kind, source, method)
    if not names:
        raise InvalidParameterError(f"no predicted {method} retention to plot")
    data = np.array(matrix, dtype=float)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(np.ma.masked_invalid(data), cmap="RdYlGn", vmin=0.5, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("merged with")
    ax.set_ylabel("adapter whose retention is predicted")
    ax.set_title(f"predicted retention, {method} merge")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if math.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
