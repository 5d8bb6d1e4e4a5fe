"""Gradient alignment: sketches of each target layer's full-weight gradient G = ∂L/∂W.

LoRA's own ∂L/∂A and ∂L/∂B are not comparable across runs (B starts at zero, A is random),
but G is: early in training every run sits near the same base weights. G = Σ_n δ_n x_nᵀ, so
its sketch is P G Qᵀ = Σ_n (P δ_n)(Q x_n)ᵀ, assembled from each layer's inputs x and output
gradients δ without ever forming G or making the frozen weight trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .sketch import projection

logger = logging.getLogger(__name__)


class GradientSketcher:
    """Accumulates per-layer gradient sketches from hooks, one optimizer step at a time.

    Args:
        modules: normalized layer name -> module whose forward computes ``x Wᵀ (+ b)`` (the
            LoRA-wrapped layer: its output gradient is the gradient of the base layer's).
        shapes: layer name -> (out_features, in_features).
        size: sketch size k; each sketch is (k, k).
        on_error: called with the exception when a hook fails; the sketcher then goes quiet
            instead of raising into the user's backward pass.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        shapes: Mapping[str, tuple[int, int]],
        size: int,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.shapes = dict(shapes)
        self.size = int(size)
        self.on_error = on_error
        self.failed = False
        self._handles: list = []
        self._step: dict[str, torch.Tensor] = {}
        self._total: dict[str, torch.Tensor] = {}
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles or self.failed:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def _projections(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) for one layer on one device; cached so hooks never copy host to device."""
        key = (name, device)
        if key not in self._on_device:
            out_dim, in_dim = self.shapes[name]
            self._on_device[key] = (
                projection("out", name, out_dim, self.size, device),
                projection("in", name, in_dim, self.size, device),
            )
        return self._on_device[key]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        if self.on_error is not None:
            self.on_error(exc)

    def _forward_hook(self, name: str):
        out_dim, in_dim = self.shapes[name]

        def hook(module, args, output):
            if self.failed or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return
            try:
                x = args[0].detach()
                p, q = self._projections(name, x.device)
                # Project in the activations' own dtype: no fp32 copy of a bf16 activation.
                xq = (x.reshape(-1, in_dim) @ q.T.to(x.dtype)).float()
            except Exception as exc:  # a hook must never break the user's forward pass
                self._fail(exc)
                return

            def grad_hook(grad):
                if self.failed:
                    return
                try:
                    g = grad.detach().reshape(-1, out_dim)
                    dp = (g @ p.T.to(device=g.device, dtype=g.dtype)).float()
                    contribution = dp.T @ xq
                    if name in self._step:
                        self._step[name] += contribution
                    else:
                        self._step[name] = contribution
                except Exception as exc:
                    self._fail(exc)

            output.register_hook(grad_hook)

        return hook

    def end_step(self, scale: float = 1.0, reduce_across_ranks: bool = False) -> bool:
        """Close one optimizer step; returns False when the step was dropped (non-finite).

        ``scale`` divides out a loss scale (fp16 GradScaler). With ``reduce_across_ranks`` the
        step's sketches are averaged over data-parallel ranks (every rank must call this).
        """
        if reduce_across_ranks:
            names = sorted(self.shapes)
            device = next(self.modules[names[0]].parameters()).device
            # A layer no micro-batch reached stays missing (NaN) on every rank alike; a rank
            # whose hooks failed sends NaN, so every rank drops the step together.
            missing = torch.full((self.size, self.size), float("nan"), device=device)
            stacked = torch.stack(
                [missing if self.failed else self._step.get(n, missing).to(device) for n in names]
            )
            torch.distributed.all_reduce(stacked)
            stacked /= torch.distributed.get_world_size()
            self._step = {
                n: stacked[i] for i, n in enumerate(names) if not torch.isnan(stacked[i]).all()
            }
            if self.failed or any(torch.isnan(t).any() for t in self._step.values()):
                self._step = {}
        step, self._step = self._step, {}
        if not step:
            return False
        if not all(bool(torch.isfinite(t).all()) for t in step.values()):
            logger.debug("dropping a gradient step with non-finite values (fp16 overflow?)")
            return False
        for name, sketch in step.items():
            sketch = (sketch / scale).detach()
            if name in self._total:
                # Totals restored from a checkpoint live on the CPU; sketches on the device.
                self._total[name] = self._total[name].to(sketch.device) + sketch
            else:
                self._total[name] = sketch.clone()
        self.steps += 1
        return True

    def mean(self) -> dict[str, torch.Tensor]:
        """Mean sketch over the closed steps so far, on the CPU."""
        if not self.steps:
            return {}
        return {name: (t / self.steps).cpu() for name, t in self._total.items()}

    def totals(self) -> dict[str, torch.Tensor]:
        """Running sums of the closed steps' sketches, on the CPU (for checkpoints)."""
        return {name: t.detach().cpu() for name, t in self._total.items()}

    def load_state_tensors(self, totals: Mapping[str, torch.Tensor], steps: int) -> None:
        self._total = {name: t.clone() for name, t in totals.items()}
        self.steps = int(steps)
