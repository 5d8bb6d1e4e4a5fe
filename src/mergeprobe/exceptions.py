"""Errors raised by mergeprobe.

MergeprobeError
 ├── InvalidParameterError        (also a ValueError)
 ├── IncompatibleSignatureError   (also a ValueError)
 └── CorruptSignatureError
"""

from __future__ import annotations

__all__ = [
    "CorruptSignatureError",
    "IncompatibleSignatureError",
    "InvalidParameterError",
    "MergeprobeError",
]


class MergeprobeError(Exception):
    """Base class of every error mergeprobe raises on purpose."""


class InvalidParameterError(MergeprobeError, ValueError):
    """A parameter has a value outside the allowed ones; the message names both."""


class IncompatibleSignatureError(MergeprobeError, ValueError):
    """Two signatures cannot be compared (different base model, anchor set or sketch size)."""


class CorruptSignatureError(MergeprobeError):
    """A store entry cannot be read back; listing skips it, loading it raises this."""
