"""Update alignment: signals of the dense LoRA update ΔW = s·B·A, computed from the factors.

Exact inner products never form the (out × in) matrix: by the Gram identity
``<B_i A_i, B_j A_j>_F = tr((B_iᵀ B_j)(A_j A_iᵀ))``, which costs O(r²(out + in)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .sketch import entry_positions, projection


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · B · A (− scale · B0 · A0 when the adapter did not start at zero).

    ``A`` is (r, in), ``B`` is (out, r), in the ``nn.Linear`` convention (out × in) whatever
    the layer's storage layout.

    DoRA (``magnitude`` and ``base_weight`` given) rescales each output row of the adapted
    weight: W' = diag(m / ‖W + sBA‖_row) (W + sBA), so ΔW = W' − (W + s·B0·A0) is no longer
    low-rank; its signals are then computed from the dense matrix.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    A0: torch.Tensor | None = None
    B0: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    base_weight: torch.Tensor | None = None

    @property
    def is_low_rank(self) -> bool:
        return self.magnitude is None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) in float32 with L @ R == ΔW, the scale folded into L."""
        if not self.is_low_rank:
            raise ValueError("a DoRA update is not low-rank: use dense()")
        left = self.B.detach().float() * float(self.scale)
        right = self.A.detach().float()
        if self.A0 is not None and self.B0 is not None:
            left = torch.cat([left, self.B0.detach().float() * float(self.scale)], dim=1)
            right = torch.cat([right, -self.A0.detach().float().to(right.device)], dim=0)
        return left, right

    def dense(self) -> torch.Tensor:
        if self.is_low_rank:
            left, right = self.factors()
            return left @ right
        return self._dora_dense

    @functools.cached_property
    def _dora_dense(self) -> torch.Tensor:
        # Formed once per update: the norm, the sketch and the entries all read it.
        weight = self.base_weight.detach().float()
        lora = (self.B.detach().float() * float(self.scale)) @ self.A.detach().float()
        reference = weight
        if self.A0 is not None and self.B0 is not None:
            reference = weight + (self.B0.float() * float(self.scale)) @ self.A0.float().to(
                weight.device
            )
        adapted = weight + lora
        # The row norm is detached in PEFT too; here it is taken in float32.
        row_scale = self.magnitude.detach().float().to(weight.device) / torch.linalg.norm(
            adapted, dim=1
        )
        return row_scale[:, None] * adapted - reference


def update_inner(u: LowRankUpdate, v: LowRankUpdate) -> float:
    """Exact Frobenius inner product <ΔW_u, ΔW_v> from the factors (Gram identity)."""
    if not (u.is_low_rank and v.is_low_rank):
        du, dv = u.dense(), v.dense()
        return float((du * dv.to(du.device)).sum())
    lu, ru = u.factors()
    lv, rv = v.factors()
    lv, rv = lv.to(lu.device), rv.to(lu.device)
    return float(torch.trace((lu.T @ lv) @ (rv @ ru.T)))


def update_norm(u: LowRankUpdate) -> float:
    """Exact ‖ΔW‖_F from the factors."""
    return max(update_inner(u, u), 0.0) ** 0.5


def update_cosine(u: LowRankUpdate, v: LowRankUpdate, eps: float = 1e-12) -> float:
    """Exact cosine of two dense updates from their factors (0 where either update is 0)."""
    denom = update_norm(u) * update_norm(v)
    return update_inner(u, v) / denom if denom > eps else 0.0


def sketch_update(u: LowRankUpdate, layer: str, size: int) -> torch.Tensor:
    """The (size, size) two-sided sketch P ΔW Qᵀ = (P L)(R Qᵀ), with P, Q seeded by layer."""
    out_dim, in_dim = u.shape
    if not u.is_low_rank:
        dense = u.dense()
        p = projection("out", layer, out_dim, size, dense.device)
        q = projection("in", layer, in_dim, size, dense.device)
        return (p @ dense @ q.T).cpu()
    left, right = u.factors()
    p = projection("out", layer, out_dim, size, left.device)
    q = projection("in", layer, in_dim, size, right.device)
    return ((p @ left) @ (right @ q.T)).cpu()


def sample_update_entries(u: LowRankUpdate, layer: str, count: int) -> torch.Tensor:
    """ΔW at ``count`` fixed positions seeded by layer name (for TIES-style sign agreement)."""
    out_dim, in_dim = u.shape
    if not u.is_low_rank:
        dense = u.dense()
        rows, cols = entry_positions(layer, out_dim, in_dim, count).to(dense.device)
        return dense[rows, cols].cpu()
    left, right = u.factors()
    rows, cols = entry_positions(layer, out_dim, in_dim, count).to(left.device)
    return (left[rows] * right[:, cols].T).sum(dim=1).cpu()
