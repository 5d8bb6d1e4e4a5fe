"""mergeprobe: will this LoRA adapter merge with the others? Know in the first few percent."""

from ._version import __version__
from .callback import MergeProbeCallback
from .decision_log import read_log
from .exceptions import (
    CorruptSignatureError,
    IncompatibleSignatureError,
    InvalidParameterError,
    MergeprobeError,
)
from .probe import signature_of_adapter
from .signals.compare import pairwise_signals
from .signature import Probe, Signature, check_compatible
from .store import SignatureStore, sanitize_name

__all__ = [
    "CorruptSignatureError",
    "IncompatibleSignatureError",
    "InvalidParameterError",
    "MergeProbeCallback",
    "MergeprobeError",
    "Probe",
    "Signature",
    "SignatureStore",
    "__version__",
    "check_compatible",
    "pairwise_signals",
    "read_log",
    "sanitize_name",
    "signature_of_adapter",
]
