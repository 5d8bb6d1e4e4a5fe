"""mergeprobe: will this LoRA adapter merge with the others? Know in the first few percent."""

from ._version import __version__
from .callback import MergeProbeCallback
from .decision_log import decision_log_schema, read_log
from .exceptions import (
    CorruptSignatureError,
    IncompatibleSignatureError,
    InvalidParameterError,
    MergeprobeError,
)
from .merge import apply_plan, load_served_model
from .policy import (
    Decision,
    PairPrediction,
    Policy,
    build_plan,
    predict_between,
    predict_pairs,
)
from .predictor import (
    RetentionPredictor,
    UnsafePredictorError,
    fit,
    load_predictors,
    save_predictors,
    set_retention,
)
from .probe import signature_of_adapter
from .signals.compare import pairwise_signals
from .signals.rehearsal import rehearsal_kl
from .signature import Probe, Signature, check_compatible
from .store import SignatureStore, sanitize_name

__all__ = [
    "CorruptSignatureError",
    "Decision",
    "IncompatibleSignatureError",
    "InvalidParameterError",
    "MergeProbeCallback",
    "MergeprobeError",
    "PairPrediction",
    "Policy",
    "Probe",
    "RetentionPredictor",
    "Signature",
    "SignatureStore",
    "UnsafePredictorError",
    "__version__",
    "apply_plan",
    "build_plan",
    "check_compatible",
    "decision_log_schema",
    "fit",
    "load_predictors",
    "load_served_model",
    "pairwise_signals",
    "predict_between",
    "predict_pairs",
    "read_log",
    "rehearsal_kl",
    "sanitize_name",
    "save_predictors",
    "set_retention",
    "signature_of_adapter",
]
