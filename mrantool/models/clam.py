"""CLAM single-branch (Lu et al., Nat Biomed Eng 2021) over a slide's flat set of patches.

h = ReLU(Linear(D->512)(x)); gated attention (256) -> softmax a; logits = Linear(512->K)(sum a h).
Instance-level clustering: for the slide's class, the k highest-attention instances are pseudo-labelled
positive and the k lowest negative for that class's binary instance classifier; when subtyping, the other
classes' classifiers see the top k as negatives. Loss = bag_weight * bag CE + (1 - bag_weight) * instance
loss. The reference's default instance loss is a smooth top-1 SVM (an extra package); cross-entropy (its
other option) is used here. k is bounded by half the instances so positives and negatives never overlap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import AttentionScore
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

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = self.embed(x)
        a = self.attention(h).softmax(0)
        return self.classifier(a @ h), a, {"instances": h, "instance_attention": a}

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
        bag = weighted_ce(out.logits, label, class_weights)
        instance = self.instance_loss(out.aux["instances"], out.aux["instance_attention"], int(label))
        loss = self.bag_weight * bag + (1.0 - self.bag_weight) * instance
        return loss, {"loss": float(loss.detach()), "bag": float(bag.detach()), "instance": float(instance.detach())}

    def instance_loss(self, h: Tensor, a: Tensor, label: int) -> Tensor:
        """Clustering loss on top-k / bottom-k attention instances (zero for a single-instance slide)."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.sum() * 0.0
        top = torch.topk(a, k).indices
        bottom = torch.topk(-a, k).indices
        ones, zeros = torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
        losses = []
        for cls, classifier in enumerate(self.instance_classifiers):
            if cls == label:
                logits = classifier(torch.cat([h[top], h[bottom]]))
                losses.append(F.cross_entropy(logits, torch.cat([ones, zeros]).to(h.device)))
            elif self.subtyping:
                losses.append(F.cross_entropy(classifier(h[top]), zeros.to(h.device)))
        total = torch.stack(losses).sum()
        return total / len(self.instance_classifiers) if self.subtyping else total
