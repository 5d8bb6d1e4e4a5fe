"""Seeded random projections shared by every run.

A projection is a function of (family, layer name, dimension, size) only, so two runs made
anywhere, at any time, sketch the same layer with the same matrix and their sketches can be
compared without the factors.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in ("mergeprobe", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@lru_cache(maxsize=4096)
def _gaussian_cpu(family: str, layer: str, dim: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed(family, layer, dim, size))
    # Entries N(0, 1/size) make E[PᵀP] = I, so sketched inner products are unbiased.
    return torch.randn(size, dim, generator=generator, dtype=torch.float32) / math.sqrt(size)


def projection(
    family: str, layer: str, dim: int, size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The (size, dim) Gaussian projection for one layer and one side of a sketch."""
    matrix = _gaussian_cpu(family, layer, int(dim), int(size))
    if device is not None and torch.device(device).type != "cpu":
        matrix = matrix.to(device)
    return matrix


@lru_cache(maxsize=4096)
def _entry_positions_cpu(layer: str, rows: int, cols: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed("entries", layer, rows, cols, count))
    r = torch.randint(0, rows, (count,), generator=generator)
    c = torch.randint(0, cols, (count,), generator=generator)
    return torch.stack([r, c])


def entry_positions(layer: str, rows: int, cols: int, count: int) -> torch.Tensor:
    """A (2, count) tensor of fixed (row, column) positions of a layer's weight matrix."""
    return _entry_positions_cpu(layer, int(rows), int(cols), int(count))
