"""The three signal families of design §3: update alignment, gradient alignment, drift."""

from .compare import pairwise_signals
from .drift import linear_cka, pool_hidden, sketch_drift
from .gradient import GradientSketcher
from .sketch import projection
from .update import (
    LowRankUpdate,
    sample_update_entries,
    sketch_update,
    update_cosine,
    update_inner,
    update_norm,
)

__all__ = [
    "GradientSketcher",
    "LowRankUpdate",
    "linear_cka",
    "pairwise_signals",
    "pool_hidden",
    "projection",
    "sample_update_entries",
    "sketch_drift",
    "sketch_update",
    "update_cosine",
    "update_inner",
    "update_norm",
]
