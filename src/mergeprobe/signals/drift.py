"""Representation drift on the anchor set: linear CKA against the base model, drift vectors."""

from __future__ import annotations

import torch

from .sketch import projection


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> float:
    """Linear CKA (Kornblith et al. 2019) of two (n, d) representations of the same n inputs.

    ``‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`` on column-centred matrices, computed from the n × n
    Gram matrices so it stays cheap when d is large. 1 for identical inputs.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    kx, ky = x @ x.T, y @ y.T
    denom = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    if float(denom) <= eps:
        return 1.0 if torch.equal(x, y) else 0.0
    return float((kx * ky).sum() / denom)


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real (unpadded) tokens: (batch, seq, d) -> (batch, d) in float32."""
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def sketch_drift(delta: torch.Tensor, hidden_index: int, size: int) -> torch.Tensor:
    """(n, d) drift -> (n, size), with a projection seeded by the hidden-state index."""
    r = projection("drift", f"hidden.{hidden_index}", int(delta.shape[1]), size, delta.device)
    return (delta.float() @ r.T).cpu()
