"""Merging LoRA adapters on their dense updates: pure tensor functions, no state.

The **direct merge** is exact task arithmetic, ``W = W0 + Σ_k w_k ΔW_k`` with ΔW = s·B·A
(all ``w_k = 1``). PEFT's ``combination_type="linear"`` is not this: it averages A and B
separately, which adds cross terms B_i A_j. TIES and DARE use PEFT's own ``merge_utils`` on the
dense ΔW, never on the factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from peft.utils import merge_utils

from .adapters import find_lora_layers
from .exceptions import InvalidParameterError

MergeMethod = Literal["direct", "mean", "ties", "dare"]
MERGE_METHODS: tuple[str, ...] = ("direct", "mean", "ties", "dare")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}


@torch.no_grad()
def lora_deltas(model, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A (float32, CPU, ``nn.Linear`` layout out × in) of every LoRA layer,
    keyed by normalized layer name (``encoder.layer.0.attention.self.query``)."""
    return {ref.name: ref.update().dense().cpu() for ref in find_lora_layers(model, adapter_name)}


def merge_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod = "direct",
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge several adapters' dense updates, layer by layer.

    Args:
        deltas: one ``{layer: ΔW}`` mapping per adapter. A layer only some adapters have is
            merged over those that have it.
        method: ``"direct"`` (Σ w_k ΔW_k, exact task arithmetic), ``"mean"`` (weights 1/n),
            ``"ties"`` (trim to ``density`` by magnitude, elect sign, disjoint mean; PEFT
            ``merge_utils.ties``) or ``"dare"`` (random drop to ``density`` with rescaling,
            then the weighted sum; PEFT ``merge_utils.dare_linear``).
        weights: per-adapter coefficients (default 1 each; ignored by ``"mean"``).
        density: kept fraction for TIES (default 0.2) and DARE (default 0.5).
        seed: seeds DARE's random masks, so a merge is reproducible.
    """
    if method not in MERGE_METHODS:
        raise InvalidParameterError(
            f"The 'method' parameter of merge_deltas must be one of {MERGE_METHODS}. Got {method!r} instead."
        )
    n = len(deltas)
    if n == 0:
        raise InvalidParameterError("merge_deltas needs at least one adapter's deltas.")
    if method == "mean":
        weights = [1.0 / n] * n
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise InvalidParameterError(f"merge_deltas got {n} adapters but {len(weights)} weights.")
    if density is None:
        density = DEFAULT_DENSITY.get(method)
    if density is not None and not 0 < density <= 1:
        raise InvalidParameterError(
            f"The 'density' parameter must be in (0, 1]. Got {density!r} instead."
        )
    # merge_utils draws DARE masks from the global generator: seed it, and leave the caller's
    # random state (CPU and CUDA) as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        merged = {}
        for layer in sorted({name for d in deltas for name in d}):
            members = [
                (d[layer].float(), w) for d, w in zip(deltas, weights, strict=True) if layer in d
            ]
            tensors = [t for t, _ in members]
            w = torch.tensor([wk for _, wk in members], dtype=torch.float32)
            if method in ("direct", "mean"):
                merged[layer] = merge_utils.task_arithmetic(tensors, w)
            elif method == "ties":
                merged[layer] = merge_utils.ties(tensors, w, density=density)
            else:
                merged[layer] = merge_utils.dare_linear(tensors, w, density=density)
    return merged
