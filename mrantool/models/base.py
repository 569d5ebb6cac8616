"""The head contract: one slide per forward call, a `MILOutput`, and a `compute_loss` the trainer calls.

Attention levels in `MILOutput.attention` are shares of the slide decision: every level sums to 1 over the
slide's valid items (a bag's weight is the sum of its patches' weights, a patch's the sum of its cells'),
so heatmaps read every head the same way. Heads over a flat set of instances return "patch" and "bag".
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


class MILHead(nn.Module):
    """Base class: `forward(patches (n_bags, P, D), cells (n_bags, P, C, D) | None, mask (n_bags, P) | None)`."""

    needs_cells: bool = False

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
    ) -> tuple[Tensor, dict[str, float]]:
        """Class-weighted cross-entropy of the slide logits; heads with extra terms override this.

        `epoch` is 0-based; `bag_weights (n_bags,)` is read only by heads with a bag level (MRAN bag mining).
        """
        loss = weighted_ce(out.logits, label, class_weights)
        return loss, {"loss": float(loss.detach())}

    def check_inputs(self, patches: Tensor, cells: Tensor | None, mask: Tensor | None) -> Tensor:
        """Validate shapes against the contract; return the mask (all True when None)."""
        if patches.dim() != 3 or patches.shape[-1] != self.in_dim:
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
            if cells.dim() != 4 or cells.shape[:2] != patches.shape[:2] or cells.shape[-1] != self.in_dim:
                raise ConfigError(
                    f"cell features must be (n_bags, P, C, {self.in_dim}) matching patches "
                    f"{tuple(patches.shape)}, got {tuple(cells.shape)}; re-read the slide from one store."
                )
        if mask is None:
            return torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        if mask.shape != patches.shape[:2]:
            raise ConfigError(
                f"mask must be (n_bags, P) = {tuple(patches.shape[:2])}, got {tuple(mask.shape)}; "
                "pass the store's per-patch tissue mask for the same slide."
            )
        return mask.bool()


class InstanceHead(MILHead):
    """A head over the flat set of a slide's valid patches; subclasses implement `pool`."""

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None) -> MILOutput:
        mask = self.check_inputs(patches, cells, mask)
        x = patches[mask].float()
        if x.shape[0] == 0:
            raise MrantoolError(
                "a slide reached the model with no tissue patches (mask all False); remove it from labels.csv "
                "or re-extract it with a lower tissue threshold."
            )
        logits, weights, aux = self.pool(x)
        return MILOutput(logits, flat_attention(weights, mask), aux)

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """`x (N, D)` valid instances -> (slide logits (K,), instance weights (N,) summing to 1, aux)."""
        raise NotImplementedError


def flat_attention(weights: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Scatter per-instance weights (N,) back to "patch" (n_bags, P); "bag" is each bag's sum."""
    patch = torch.zeros(mask.shape, dtype=weights.dtype, device=weights.device).masked_scatter(mask, weights)
    return {"bag": patch.sum(-1), "patch": patch}


def weighted_ce(logits: Tensor, label: Tensor, class_weights: Tensor | None, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (..., K) against one slide label, times the label's class weight.

    The weight multiplies the loss rather than normalising it, so it still matters when every row shares
    the slide's label (torch's weighted mean would cancel it).
    """
    label = label.reshape(()).long()
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, label.expand(flat.shape[0]), reduction="none").reshape(logits.shape[:-1])
    if class_weights is not None:
        ce = ce * class_weights.to(ce)[label]
    return ce.mean() if reduction == "mean" else ce
