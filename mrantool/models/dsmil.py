"""DSMIL (Li, Li & Eliceiri, CVPR 2021) over a slide's flat set of patches.

Instance classifier c = Linear(D->K)(x); the max-scoring (critical) instance of each class m_k; queries
q = Tanh(Linear(ReLU(Linear(x)))); attention A[:, k] = softmax_i(<q_i, q_{m_k}> / sqrt(d)) (distance to
the critical instance); B = A^T x; bag logits = Conv1d(K, K, kernel D)(B). Logits are the bag prediction
(the reference's default); the loss is 0.5 * bag CE + 0.5 * CE of the max-pooled instance logits. The
reference uses BCE for multi-label outputs; single-label CE is used here like the other heads. Patch
attention for heatmaps is A's column of the predicted class.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import masked_argmax, masked_max, masked_softmax
from mrantool.models.base import InstanceHead, MILOutput, weighted_ce


class DSMIL(InstanceHead):
    """DSMIL; `hidden` query width, `dropout` on values when `passing_v` (a learned value projection)."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.0, passing_v: bool = False
    ) -> None:
        super().__init__(in_dim, n_classes)
        if hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"dsmil options need hidden >= 1 and 0 <= dropout < 1, got hidden={hidden}, dropout={dropout}; "
                "fix them in the model options."
            )
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh())
        self.value = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU()) if passing_v else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        instance_logits = self.instance_classifier(x)  # (S, N, K)
        q = self.query(x)
        critical = masked_argmax(instance_logits, valid.unsqueeze(-1), -2)  # (S, K)
        q_critical = q.gather(-2, critical.unsqueeze(-1).expand(*critical.shape, q.shape[-1]))  # (S, K, H)
        scores = q_critical @ q.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (S, K, N)
        attention = masked_softmax(scores, valid.unsqueeze(-2))
        bag = attention @ self.value(x)  # (S, K, D)
        logits = self.bag_classifier(bag).squeeze(-1)
        weights = attention.gather(-2, logits.detach().argmax(-1)[:, None, None].expand(-1, 1, x.shape[-2]))
        return logits, weights.squeeze(-2), {"instance_logits": instance_logits, "valid": valid}

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
        top_logits = masked_max(out.aux["instance_logits"], out.aux["valid"].unsqueeze(-1), -2)
        top = weighted_ce(top_logits, label, class_weights, reduction="none")
        loss = 0.5 * bag + 0.5 * top
        return loss, {"loss": loss.detach(), "bag": bag.detach(), "max": top.detach()}
