"""Small helpers shared by the writers."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from datetime import datetime, timezone
from typing import Any


def collective_device():
    """The device a collective's tensors must live on: CPU under gloo or MPI, else the
    current accelerator (NCCL's GPU, or XPU / NPU backends')."""
    import torch

    if torch.distributed.get_backend() in ("gloo", "mpi"):
        return torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(
            accelerator.current_accelerator().type, accelerator.current_device_index()
        )
    return torch.device("cpu")


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second (``2026-11-23T18:00:00Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename: readers see the old
    file or the new one, never a part."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


# Files and folders apply_plan writes beside the served models: no served model may take them.
RESERVED_NAMES = frozenset({"routing.json", "mergekit", "peft_merge.py", "heads"})
