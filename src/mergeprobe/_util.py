"""Small helpers shared by the writers."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second (``2026-11-23T18:00:00Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def clean_json(value: Any) -> Any:
    """JSON-safe values: NaN and infinities become null (missing), tensors and numpy scalars
    plain numbers, anything else unknown its string."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
