"""Per-dimension input standardisation in front of any head, saved with its weights; one set of statistics per level.

Frozen-encoder features share a large common component (random-init or ImageNet CNN features after ReLU all
point the same way), which drowns the differences the heads must learn from, and MRAN's norm attention then
measures that common magnitude instead of how unusual a cell or patch is. Standardising with the training
fold's mean and sd fixes both. Patches and cells get their own statistics: a ViT's patch vector is the class or
pooled token, a different distribution from its spatial tokens, and even a CNN's pooled map has a smaller spread
than its cells, so cells scaled by patch statistics would read "large norm" as "far from the patch mean". Cell
statistics are kept per cell position (C, D): a CNN's zero padding and a ViT's position embeddings give the cells
at a patch's corners a systematic offset from its centre cells, which would otherwise look like content (and draw
norm attention to tissue borders). The statistics are buffers, so checkpoints carry them to predict and heatmaps
(a checkpoint written before cells had their own statistics loads with the patch statistics for cells).
"""

from __future__ import annotations

from typing import Any

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
        self.register_buffer("cell_mean", torch.zeros(dim))
        self.register_buffer("cell_sd", torch.ones(dim))

    @property
    def needs_cells(self) -> bool:
        return self.head.needs_cells

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    @property
    def in_dim(self) -> int:
        return self.head.in_dim

    def set_stats(self, mean: Tensor, sd: Tensor, cell_mean: Tensor | None = None,
                  cell_sd: Tensor | None = None) -> None:
        """Use these statistics: patches (D,); cells (D,) or per position (C, D), else the patches'. Dimensions
        with almost no spread (dead ReLU units: under 1% of the level's mean sd) keep sd 1."""
        self.mean.copy_(mean)
        self.sd.copy_(_spread(sd))
        self.cell_mean = (mean if cell_mean is None else cell_mean).detach().clone().float()
        self.cell_sd = _spread(sd if cell_sd is None else cell_sd).detach().clone().float()

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None,
                **kwargs: Any) -> MILOutput:
        scaled = None if cells is None else (cells.float() - self.cell_mean) / self.cell_sd
        return self.head((patches.float() - self.mean) / self.sd, scaled, mask, **kwargs)

    def compute_loss(self, out: MILOutput, label: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, float]]:
        return self.head.compute_loss(out, label, **kwargs)

    def check_inputs(self, patches: Tensor, cells: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.head.check_inputs(patches, cells, mask)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for level in ("mean", "sd"):
            key = f"{prefix}cell_{level}"
            if key not in state_dict and f"{prefix}{level}" in state_dict:
                state_dict[key] = state_dict[f"{prefix}{level}"]
            if key in state_dict:  # (D,) or per position (C, D): take the saved shape
                self._buffers[f"cell_{level}"] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _spread(sd: Tensor) -> Tensor:
    """sd, with 1 for dimensions whose spread is under 1% of the mean spread (per row of a (C, D) table)."""
    floor = 1e-2 * sd.mean(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(sd > floor, sd, torch.ones_like(sd))
