"""The decision log: plain JSONL, one object per line, append-only (design §6)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._util import clean_json, utc_now

DECISION_SCHEMA = "mergeprobe.decision/1"
EVENTS = ("probe", "decision", "stopped", "final")
SCHEMA_PATH = Path(__file__).parent / "schemas" / "decision_log.schema.json"


def decision_log_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every decision-log record satisfies."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


class DecisionLog:
    """Appends records to a JSONL file; each record is one ``write`` of one line.

    Lines are written with a single ``os.write`` on an ``O_APPEND`` descriptor, so records
    from several writers interleave whole, never torn.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(
        self, event: str, *, run: str, step: int | None, max_steps: int | None, **fields: Any
    ) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown decision-log event {event!r}; expected one of {EVENTS}")
        fraction = step / max_steps if step is not None and max_steps else None
        record = {
            "schema": DECISION_SCHEMA,
            "event": event,
            "time": utc_now(),
            "run": run,
            "step": step,
            "max_steps": max_steps,
            "fraction": fraction,
            **fields,
        }
        record = clean_json(record)
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return record


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a decision log; a torn last line (a crash mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
