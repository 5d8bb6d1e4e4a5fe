"""Merge rehearsal: each finished adapter's own outputs, alone and merged with each other one.

The signature signals see a partner only on the shared anchor set. For finished adapters the
merge itself can be rehearsed on a few of each task's own inputs: adapter i's output
distribution with ``W0 + ΔW_i`` against ``W0 + ΔW_i + ΔW_j`` (the direct merge), both read
through i's own task head. On the benchmark the mean KL divergence between the two, from 128
unlabeled inputs per task, ranks pairs by measured retention at Spearman 0.72 (the signature
signals of the same adapters: 0.33 to 0.45; benchmarks/results/rehearsal_eval.md). Each
task's inputs stay with the one who rehearses it; only the adapters' weights are shared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..exceptions import InvalidParameterError

if TYPE_CHECKING:
    from ..merge import AdapterWeights


@torch.no_grad()
def rehearsal_kl(
    model: torch.nn.Module,
    adapters: Mapping[str, AdapterWeights | str | os.PathLike],
    batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Pairwise merge rehearsal of finished LoRA adapters on their own inputs.

    Args:
        model: the bare base model (for classification, a task model whose head is replaced
            by each adapter's saved head, whatever its size). Its weights are restored before
            returning.
        adapters: name -> PEFT LoRA adapter directory (or ``AdapterWeights``).
        batches: name -> a few batches of that adapter's own inputs (``input_ids``,
            ``attention_mask``; ``labels`` are ignored). An adapter without batches is still
            a partner of the others; its own row stays missing (NaN).
        progress: show a bar over the adapters rehearsed.

    Returns:
        ``{"names": [...], "rehearsal_kl": (n, n) array}``: entry ``[i, j]`` is the mean KL
        divergence from i's output distribution alone to i's distribution merged with j, over
        i's inputs (over its non-padding tokens for a language model). NaN on the diagonal,
        in the rows of adapters without batches and where every position is padding. An
        adapter without a saved head is read through the model's own head.

    Memory: i's own log-probabilities are kept for all its batches (float32, positions ×
    classes or vocabulary), so give a language model a few short batches. The merged weights
    are summed in the model's dtype: in bfloat16 their rounding sets a floor under the KL.
    """
    from ..merge import _MergeSandbox

    names = list(adapters)
    if len(names) < 2:
        raise InvalidParameterError("rehearsal_kl needs at least two adapters to compare")
    unknown = sorted(set(batches) - set(names))
    if unknown:
        raise InvalidParameterError(f"batches for adapters not given: {unknown}")
    if not any(batches.get(n) for n in names):
        raise InvalidParameterError("no batches: at least one adapter needs its own inputs")
    n = len(names)
    kl = np.full((n, n), np.nan)
    own = [i for i, name in enumerate(names) if batches.get(name)]
    if progress:
        from tqdm.auto import tqdm

        own = tqdm(own, desc="rehearsing merges", unit="adapter")
    sandbox = _MergeSandbox(model, adapters)
    try:
        for i in own:
            name = names[i]
            own_batches = list(batches[name])  # read once: the same inputs for every partner
            sandbox.use_head(name)
            sandbox.write({name: 1.0})
            # kept in float32: batches x positions x classes (or vocabulary) values
            alone = [_logits(model, batch) for batch in own_batches]
            for j, partner in enumerate(names):
                if j == i:
                    continue
                sandbox.write({name: 1.0, partner: 1.0})
                total = count = 0.0
                for batch, (logits, mask) in zip(own_batches, alone, strict=True):
                    # log-softmax in float64: the KL of a small change is a small difference
                    log_p = logits.double().log_softmax(-1)
                    log_q = _logits(model, batch)[0].double().log_softmax(-1)
                    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
                    total += float((per_position * mask).sum())
                    count += float(mask.sum())
                kl[i, j] = total / count if count > 0 else np.nan
    finally:
        sandbox.restore()
    return {"names": names, "rehearsal_kl": kl}


def _logits(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, weight of each position): one distribution per input for a
    classifier, one per non-padding token for a language model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    if logits.dim() == 2:  # (batch, classes)
        return logits, torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(logits.shape[:2], device=logits.device)
    return logits, mask.to(device=logits.device, dtype=torch.float64)
