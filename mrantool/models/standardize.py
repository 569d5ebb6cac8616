"""Per-dimension input standardisation in front of any head, saved with its weights.

Frozen-encoder features share a large common component (random-init or ImageNet CNN features after ReLU all
point the same way), which drowns the differences the heads must learn from, and MRAN's norm attention then
measures that common magnitude instead of how unusual a cell or patch is. Standardising with the training
fold's mean and sd fixes both; the statistics are buffers, so checkpoints carry them to predict and heatmaps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrantool.models.base import MILHead, MILOutput


class Standardized(nn.Module):
    """`head` applied to (x - mean) / sd of patches and cells; the rest of the head contract passes through."""

    def __init__(self, head: MILHead, dim: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))

    @property
    def needs_cells(self) -> bool:
        return self.head.needs_cells

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    @property
    def in_dim(self) -> int:
        return self.head.in_dim

    def set_stats(self, mean: Tensor, sd: Tensor) -> None:
        """Use these statistics; dimensions without spread (dead ReLU units) keep sd 1."""
        self.mean.copy_(mean)
        self.sd.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))

    def _scale(self, x: Tensor | None) -> Tensor | None:
        return None if x is None else (x.float() - self.mean) / self.sd

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None) -> MILOutput:
        return self.head(self._scale(patches), self._scale(cells), mask)

    def compute_loss(self, out: MILOutput, label: Tensor, **kwargs) -> tuple[Tensor, dict[str, float]]:
        return self.head.compute_loss(out, label, **kwargs)

    def check_inputs(self, patches: Tensor, cells: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.head.check_inputs(patches, cells, mask)
