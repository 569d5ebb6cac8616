"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018) over a slide's flat set of patches.

h = ReLU(Linear(D->M)(x)); a = softmax(w^T tanh(V h)) (or the gated w^T (tanh(V h) * sigmoid(U h)));
logits = Linear(M->K)(sum a h). Defaults follow the paper's reference code: M = 500, L = 128, no dropout.
The paper's binary sigmoid output becomes K-way softmax here, like the other heads.
"""

from __future__ import annotations

from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import AttentionScore
from mrantool.models.base import InstanceHead


class ABMIL(InstanceHead):
    """Attention MIL; `hidden` = M (embedding), `attn_dim` = L (attention), `dropout` after the embedding."""

    gated: bool = False

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 500, attn_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dim, n_classes)
        if hidden < 1 or attn_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"abmil options need hidden, attn_dim >= 1 and 0 <= dropout < 1, got hidden={hidden}, "
                f"attn_dim={attn_dim}, dropout={dropout}; fix them in the model options."
            )
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionScore(hidden, attn_dim, gated=self.gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = self.embed(x)
        a = self.attention(h).softmax(0)
        return self.classifier(a @ h), a, {}


class GatedABMIL(ABMIL):
    """Gated attention MIL (Ilse et al. 2018, gated variant)."""

    gated = True
