"""Update alignment: signals of the dense LoRA update ΔW = s·B·A, computed from the factors.

Exact inner products never form the (out × in) matrix: by the Gram identity
``<B_i A_i, B_j A_j>_F = tr((B_iᵀ B_j)(A_j A_iᵀ))``, which costs O(r²(out + in)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sketch import entry_positions, projection


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · B · A (− scale · B0 · A0 when the adapter did not start at zero).

    ``A`` is (r, in), ``B`` is (out, r), in the ``nn.Linear`` convention (out × in) whatever
    the layer's storage layout.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    A0: torch.Tensor | None = None
    B0: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) in float32 with L @ R == ΔW, the scale folded into L."""
        left = self.B.detach().float() * float(self.scale)
        right = self.A.detach().float()
        if self.A0 is not None and self.B0 is not None:
            left = torch.cat([left, self.B0.detach().float() * float(self.scale)], dim=1)
            right = torch.cat([right, -self.A0.detach().float().to(right.device)], dim=0)
        return left, right

    def dense(self) -> torch.Tensor:
        left, right = self.factors()
        return left @ right


def update_inner(u: LowRankUpdate, v: LowRankUpdate) -> float:
    """Exact Frobenius inner product <ΔW_u, ΔW_v> from the factors (Gram identity)."""
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
    left, right = u.factors()
    out_dim, in_dim = u.shape
    p = projection("out", layer, out_dim, size, left.device)
    q = projection("in", layer, in_dim, size, right.device)
    return ((p @ left) @ (right @ q.T)).cpu()


def sample_update_entries(u: LowRankUpdate, layer: str, count: int) -> torch.Tensor:
    """ΔW at ``count`` fixed positions seeded by layer name (for TIES-style sign agreement)."""
    left, right = u.factors()
    out_dim, in_dim = u.shape
    rows, cols = entry_positions(layer, out_dim, in_dim, count).to(left.device)
    return (left[rows] * right[:, cols].T).sum(dim=1).cpu()
