"""Per-dimension input standardisation in front of any head, saved with its weights; one set of statistics per level.

Frozen-encoder features share a large common component (random-init or ImageNet CNN features after ReLU all
point the same way), which drowns the differences the heads must learn from, and MRAN's norm attention then
measures that common magnitude instead of how unusual a cell or patch is. Standardising with the training
fold's mean and sd fixes both. Patches and cells get their own statistics: a ViT's patch vector is the class or
pooled token, a different distribution from its spatial tokens, and even a CNN's pooled map has a smaller spread
than its cells, so cells scaled by patch statistics would read "large norm" as "far from the patch mean". Cell
statistics are kept per cell position (C, D): a CNN's zero padding and a ViT's position embeddings give the cells
at a patch's corners a systematic offset from its centre cells, which would otherwise look like content (and draw
norm attention to tissue borders). With fit's `tissue_centring` (the cells then come with their tissue fractions),
the part of each cell feature that follows its tissue fraction is removed too (a least-squares slope per cell position
and dimension, from the same training cells): glass in a cell's receptive field moves its features away from the
mean, which standardising would otherwise turn into a large norm at tissue borders (docs/mran.md); with
`tissue_spread` each cell is also divided by the spread of training cells at its tissue fraction around that line
(border cells vary more than whole-tissue ones, which the line leaves as large norms). The statistics
are buffers, so checkpoints carry them to predict and heatmaps (a checkpoint written before cells had their own
statistics loads with the patch statistics for cells, one written before the slopes loads without them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.base import MILHead, MILOutput

CELL_LEVELS = ("mean", "sd", "tissue_mean", "slope", "spread")  # cell_<level> buffers, shaped by their statistics


class Standardized(nn.Module):
    """`head` applied to (x - mean) / sd of patches and cells; the rest of the head contract passes through."""

    def __init__(self, head: MILHead, dim: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.register_buffer("cell_mean", torch.zeros(dim))
        self.register_buffer("cell_sd", torch.ones(dim))
        self.register_buffer("cell_tissue_mean", torch.zeros(0))  # (C,) mean tissue fraction per cell position
        self.register_buffer("cell_slope", torch.zeros(0))  # (C, D) feature change per unit of tissue fraction
        self.register_buffer("cell_spread", torch.zeros(0))  # (C, K) residual variance / sd^2 at K tissue knots

    @property
    def needs_cells(self) -> bool:
        return self.head.needs_cells

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    @property
    def in_dim(self) -> int:
        return self.head.in_dim

    def set_stats(self, mean: Tensor, sd: Tensor, cell_mean: Tensor | None = None, cell_sd: Tensor | None = None,
                  cell_tissue_mean: Tensor | None = None, cell_slope: Tensor | None = None,
                  cell_spread: Tensor | None = None) -> None:
        """Use these statistics: patches (D,); cells (D,) or per position (C, D), else the patches'; with
        `cell_tissue_mean` (C,) and `cell_slope` (C, D), cells are centred at their own tissue fraction (`cell_sd`
        is then the spread left around that line); with `cell_spread` (C, K) too, centred cells are divided by the
        root of its value interpolated at their fraction (`spread_at`). Dimensions with almost no spread (dead ReLU
        units: under 1% of the level's mean sd) keep sd 1."""
        self.mean.copy_(mean)
        self.sd.copy_(floored_sd(sd))
        self.cell_mean = (mean if cell_mean is None else cell_mean).detach().clone().float()
        self.cell_sd = floored_sd(sd if cell_sd is None else cell_sd).detach().clone().float()
        if (cell_tissue_mean is None) != (cell_slope is None):
            raise ValueError("cell_tissue_mean and cell_slope come together")
        self.cell_tissue_mean, self.cell_slope = (
            torch.zeros(0) if x is None else x.detach().clone().float() for x in (cell_tissue_mean, cell_slope))
        if cell_spread is not None and cell_slope is None:
            raise ValueError("cell_spread needs cell_slope")
        self.cell_spread = torch.zeros(0) if cell_spread is None else cell_spread.detach().clone().float()

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None,
                **kwargs: Any) -> MILOutput:
        scaled = None
        if cells is not None:
            scaled = self._centred_cells(cells, kwargs.get("cell_mask")) / self.cell_sd
            if self.cell_spread.numel():
                scaled = scaled / spread_at(self.cell_spread, kwargs["cell_mask"].float()).sqrt().unsqueeze(-1)
        return self.head((patches.float() - self.mean) / self.sd, scaled, mask, **kwargs)

    def _centred_cells(self, cells: Tensor, tissue: Tensor | None) -> Tensor:
        """Cells minus their mean, taken at each cell's tissue fraction when the statistics have slopes."""
        centred = cells.float() - self.cell_mean
        if not self.cell_slope.numel():
            return centred
        if tissue is None or not tissue.is_floating_point():
            raise ConfigError("This model centres cells at their tissue fraction (it was fit with tissue_centring) "
                              "but got no tissue fractions; pass the cells' fractions as cell_mask, as fit, predict "
                              "and sweep do for runs with tissue_weights = true.")
        return centred - (tissue.float() - self.cell_tissue_mean).unsqueeze(-1) * self.cell_slope

    def compute_loss(self, out: MILOutput, label: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, float]]:
        return self.head.compute_loss(out, label, **kwargs)

    def check_inputs(self, patches: Tensor, cells: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.head.check_inputs(patches, cells, mask)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for level in CELL_LEVELS:
            key = f"{prefix}cell_{level}"
            if key not in state_dict and f"{prefix}{level}" in state_dict:
                state_dict[key] = state_dict[f"{prefix}{level}"]
            if key not in state_dict and level in ("tissue_mean", "slope", "spread"):  # written before them: none
                state_dict[key] = torch.zeros(0)
            if key in state_dict:  # (D,) or per position (C, D): take the saved shape
                self._buffers[f"cell_{level}"] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def spread_at(spread: Tensor, tissue: Tensor) -> Tensor:
    """`spread` (C, K), given at tissue fractions (k + 0.5) / K, linearly interpolated at `tissue` (..., C)
    (held constant beyond the first and last knots)."""
    k = spread.shape[-1]
    u = (tissue * k - 0.5).clamp(0, k - 1)
    lo = u.floor().clamp(max=max(k - 2, 0))
    w = u - lo
    table = spread.expand(*tissue.shape, k)
    below = table.gather(-1, lo.long().unsqueeze(-1)).squeeze(-1)
    above = table.gather(-1, (lo.long() + min(1, k - 1)).unsqueeze(-1)).squeeze(-1)
    return below * (1 - w) + above * w


def floored_sd(sd: Tensor) -> Tensor:
    """sd, with 1 for dimensions whose spread is under 1% of the mean spread (per row of a (C, D) table)."""
    floor = 1e-2 * sd.mean(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(sd > floor, sd, torch.ones_like(sd))
