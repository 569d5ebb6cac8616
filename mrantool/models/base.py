"""The head contract: a `MILOutput` per forward call, and a `compute_loss` the trainer calls.

A forward call takes one slide (n_bags, P, D) or, for heads with `batched = True`, a batch of slides padded with
masks (S, n_bags, P, D); docs/architecture.md states what a batched head must guarantee (padding invariance,
vmap safety). Attention levels in `MILOutput.attention` are shares of the slide decision: every level sums to 1
over the slide's valid items (a bag's weight is the sum of its patches' weights, a patch's the sum of its
cells'), so heatmaps read every head the same way. Heads over a flat set of instances return "patch" and "bag".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrantool.errors import ConfigError, MrantoolError


@dataclass
class MILOutput:
    """`logits (K,)`; `attention` level -> weights ("bag" (n_bags,), "patch" (n_bags, P), "cell" (n_bags, P, C));
    `aux`: head-specific tensors (per-level logits, instance logits, ...) that `compute_loss` reads."""

    logits: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)
    aux: dict[str, Tensor] = field(default_factory=dict)

    def slide(self, i: int) -> MILOutput:
        """Slide `i` of a batched output, with the shapes a one-slide call returns."""
        return MILOutput(self.logits[i], {k: v[i] for k, v in self.attention.items()},
                         {k: v[i] for k, v in self.aux.items()})


class MILHead(nn.Module):
    """Base class: `forward(patches (n_bags, P, D), cells (n_bags, P, C, D) | None, mask (n_bags, P) | None,
    cell_mask=(n_bags, P, C) | None)`; with `batched = True` also a leading slide dimension on all of them (see
    docs/architecture.md). Heads with a cell level also take `cell_mask` (cells with enough tissue; None: all),
    passed by `call_head` only when there is one."""

    needs_cells: bool = False
    batched: bool = False

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2:
            raise ConfigError(
                f"a MIL head needs in_dim >= 1 and n_classes >= 2, got in_dim={in_dim}, n_classes={n_classes}; "
                "check the store's embedding size and that labels.csv has at least two classes."
            )
        self.in_dim = in_dim
        self.n_classes = n_classes

    def compute_loss(
        self,
        out: MILOutput,
        label: Tensor,
        *,
        epoch: int,
        n_epochs: int,
        class_weights: Tensor | None = None,
        bag_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Class-weighted cross-entropy of the slide logits; heads with extra terms override this.

        `epoch` is 0-based; `bag_weights (n_bags,)` is read only by heads with a bag level (MRAN bag mining). On a
        batch (labels (S,)) the loss is each slide's own, (S,).
        """
        loss = weighted_ce(out.logits, label, class_weights, reduction="none")
        return loss, {"loss": loss.detach()}

    def check_inputs(self, patches: Tensor, cells: Tensor | None, mask: Tensor | None) -> Tensor:
        """Validate shapes against the contract (one slide, or a batch for batched heads); return the mask (all
        True when None)."""
        lead = patches.dim() - 3  # 1 for a batch of slides
        if lead not in (0, int(self.batched)) or patches.shape[-1] != self.in_dim:
            raise ConfigError(
                f"patch features must be (n_bags, P, {self.in_dim}), got {tuple(patches.shape)}; build the head "
                "with in_dim equal to the store's embedding size."
            )
        if self.needs_cells:
            if cells is None:
                raise ConfigError(
                    f"head {type(self).__name__} needs cell embeddings but the store has no cell embeddings "
                    "(an imported store?); use a patch-level head such as abmil or turn the cell level off "
                    "(cells=false)."
                )
            if cells.dim() != 4 + lead or cells.shape[:-2] != patches.shape[:-1] or cells.shape[-1] != self.in_dim:
                raise ConfigError(
                    f"cell features must be (n_bags, P, C, {self.in_dim}) matching patches "
                    f"{tuple(patches.shape)}, got {tuple(cells.shape)}; re-read the slide from one store."
                )
        if mask is None:
            return torch.ones(patches.shape[:-1], dtype=torch.bool, device=patches.device)
        if mask.shape != patches.shape[:-1]:
            raise ConfigError(
                f"mask must be (n_bags, P) = {tuple(patches.shape[-3:-1])}, got {tuple(mask.shape)}; "
                "pass the store's per-patch tissue mask for the same slide."
            )
        return mask.bool()


def call_head(head: nn.Module, patches: Tensor, cells: Tensor | None, mask: Tensor,
              cell_mask: Tensor | None = None) -> MILOutput:
    """`head(patches, cells, mask)`, passing `cell_mask` only when there is one (so heads without a cell level, or
    written before it, need not take it)."""
    return head(patches, cells, mask) if cell_mask is None else head(patches, cells, mask, cell_mask=cell_mask)


class InstanceHead(MILHead):
    """A head over the flat set of a slide's valid patches (padded to the batch); subclasses implement `pool`."""

    batched = True

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None) -> MILOutput:
        mask = self.check_inputs(patches, cells, mask)
        single = patches.dim() == 3
        if single:
            if not mask.any():
                raise MrantoolError(
                    "a slide reached the model with no tissue patches (mask all False); remove it from labels.csv "
                    "or re-extract it with a lower tissue threshold."
                )
            patches, mask = patches.unsqueeze(0), mask.unsqueeze(0)
        s, n_bags, p, d = patches.shape
        logits, weights, aux = self.pool(patches.reshape(s, n_bags * p, d).float(), mask.reshape(s, n_bags * p))
        patch = weights.reshape(s, n_bags, p)
        out = MILOutput(logits, {"bag": patch.sum(-1), "patch": patch}, aux)
        return out.slide(0) if single else out

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """`x (S, N, D)` instances, `valid (S, N)` (at least one per slide) -> (slide logits (S, K), instance
        weights (S, N) summing to 1 over the valid ones, 0 elsewhere, aux tensors (S, ...))."""
        raise NotImplementedError


def weighted_ce(logits: Tensor, label: Tensor, class_weights: Tensor | None, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (..., K) against slide labels, times each label's class weight.

    `label` is 0-d (one slide: every row of `logits` gets it) or (S,) with `logits (S, ..., K)` (each slide's
    rows get its label). reduction "none" keeps `logits`' shape without K; "mean" averages everything. The
    weight multiplies the loss rather than normalising it, so it still matters when every row shares the
    slide's label (torch's weighted mean would cancel it).
    """
    label = label.long()
    label = label.reshape(label.shape + (1,) * (logits.dim() - 1 - label.dim())).expand(logits.shape[:-1])
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, label.reshape(-1), reduction="none").reshape(logits.shape[:-1])
    if class_weights is not None:
        ce = ce * class_weights.to(ce)[label]
    return ce.mean() if reduction == "mean" else ce
