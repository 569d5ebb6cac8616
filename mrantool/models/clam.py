"""CLAM single-branch (Lu et al., Nat Biomed Eng 2021) over a slide's flat set of patches.

h = ReLU(Linear(D->512)(x)); gated attention (256) -> softmax a; logits = Linear(512->K)(sum a h).
Instance-level clustering: for the slide's class, the k highest-attention instances are pseudo-labelled
positive and the k lowest negative for that class's binary instance classifier; when subtyping, the other
classes' classifiers see the top k as negatives. Loss = bag_weight * bag CE + (1 - bag_weight) * instance
loss. The reference's default instance loss is a smooth top-1 SVM (an extra package); cross-entropy (its
other option) is used here. k is bounded by half the instances so positives and negatives never overlap; in a
padded batch every slide ranks a fixed number of instances and masks the ranks beyond its own k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import AttentionScore, masked_softmax, pool
from mrantool.models.base import InstanceHead, MILOutput, weighted_ce


class CLAMSB(InstanceHead):
    """CLAM-SB; `subtyping=None` means n_classes > 2 (out-of-class instance loss for subtype tasks)."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool | None = None,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if hidden < 1 or attn_dim < 1 or k_sample < 1 or not 0.0 <= dropout < 1.0 or not 0.0 <= bag_weight <= 1.0:
            raise ConfigError(
                f"clam-sb options need hidden, attn_dim, k_sample >= 1, 0 <= dropout < 1 and 0 <= bag_weight <= 1, "
                f"got hidden={hidden}, attn_dim={attn_dim}, k_sample={k_sample}, dropout={dropout}, "
                f"bag_weight={bag_weight}; fix them in the model options."
            )
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionScore(hidden, attn_dim, gated=True, dropout=dropout)
        self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))
        self.k_sample, self.bag_weight = k_sample, bag_weight
        self.subtyping = n_classes > 2 if subtyping is None else subtyping

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = self.embed(x)
        a = masked_softmax(self.attention(h), valid)
        return self.classifier(pool(a, h)), a, {"instances": h, "instance_attention": a, "valid": valid}

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
        bag = weighted_ce(out.logits, label, class_weights, reduction="none")
        aux = out.aux
        if label.dim() == 0:  # one slide
            instance = self.instance_loss(aux["instances"][None], aux["instance_attention"][None],
                                          aux["valid"][None], label[None])[0]
        else:
            instance = self.instance_loss(aux["instances"], aux["instance_attention"], aux["valid"], label)
        loss = self.bag_weight * bag + (1.0 - self.bag_weight) * instance
        return loss, {"loss": loss.detach(), "bag": bag.detach(), "instance": instance.detach()}

    def instance_loss(self, h: Tensor, a: Tensor, valid: Tensor, label: Tensor) -> Tensor:
        """Per-slide clustering loss (S,) on each slide's top-k / bottom-k attention instances, k = min(k_sample,
        n_valid // 2) (zero for a single-instance slide); h (S, N, H), a and valid (S, N), label (S,)."""
        k_max = min(self.k_sample, h.shape[-2] // 2)
        if k_max == 0:
            return h.sum((-1, -2)) * 0.0
        k = (valid.sum(-1) // 2).clamp(max=self.k_sample)  # (S,)
        ranked = (torch.arange(k_max, device=h.device) < k.unsqueeze(-1)).to(h.dtype)  # (S, k_max)
        low = torch.finfo(a.dtype).min
        top = torch.topk(a.masked_fill(~valid, low), k_max, dim=-1).indices
        bottom = torch.topk((-a).masked_fill(~valid, low), k_max, dim=-1).indices
        h_top = h.gather(-2, top.unsqueeze(-1).expand(*top.shape, h.shape[-1]))
        h_bottom = h.gather(-2, bottom.unsqueeze(-1).expand(*bottom.shape, h.shape[-1]))
        n_ranked = ranked.sum(-1).clamp_min(1.0)

        def ce(logits: Tensor, target: int) -> Tensor:  # summed over each slide's ranked instances
            return (F.cross_entropy(logits.transpose(-1, -2), torch.full_like(top, target), reduction="none")
                    * ranked).sum(-1)

        total = torch.zeros_like(n_ranked)
        for cls, classifier in enumerate(self.instance_classifiers):
            own = (label == cls).to(h.dtype)
            in_class = (ce(classifier(h_top), 1) + ce(classifier(h_bottom), 0)) / (2 * n_ranked)
            total = total + own * in_class
            if self.subtyping:
                total = total + (1 - own) * ce(classifier(h_top), 0) / n_ranked
        return total / len(self.instance_classifiers) if self.subtyping else total
