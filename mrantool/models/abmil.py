"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018) over a slide's flat set of patches.

h = f(x); a = softmax(w^T tanh(V h)) (or the gated w^T (tanh(V h) * sigmoid(U h))); logits = Linear(M->K)(sum a h).
f is `depth` fully connected layers, each ReLU then dropout, of widths M 2^(depth-1), ..., 2M, M (M = `hidden`);
`dropout_at = "last"` keeps only the last dropout, as MI-Net's reference code (yanyongluan/MINNs MI_Net.py) does.
Defaults follow the paper's reference code (MNIST-bags): depth 1, M = 500, L = 128, no dropout. The paper's
network for the classical MIL sets (Musk, Fox, Tiger, Elephant) is depth 3 with M = 64 (fc-256, fc-128, fc-64,
each followed by dropout), as in MI-Net (Wang et al. 2018), whose architecture it adopts. The paper's binary
sigmoid output becomes K-way softmax here, like the other heads.
"""

from __future__ import annotations

from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import AttentionScore, masked_softmax, pool
from mrantool.models.base import InstanceHead

DROPOUT_AT = ("each", "last")


def mlp_embedding(in_dim: int, hidden: int, depth: int, dropout: float, dropout_at: str = "each") -> nn.Sequential:
    """`depth` x (Linear, ReLU), widths hidden * 2^(depth-1) ... hidden, with Dropout after each layer or only
    after the last (`dropout_at`)."""
    layers: list[nn.Module] = []
    width = in_dim
    for level in reversed(range(depth)):
        layers += [nn.Linear(width, hidden * 2**level), nn.ReLU()]
        if dropout_at == "each" or level == 0:
            layers.append(nn.Dropout(dropout))
        width = hidden * 2**level
    return nn.Sequential(*layers)


class ABMIL(InstanceHead):
    """Attention MIL; `hidden` = M (embedding), `depth` embedding layers, `attn_dim` = L (attention),
    `dropout` after every embedding layer ("each") or after the last only ("last", `dropout_at`)."""

    gated: bool = False

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 500, attn_dim: int = 128, dropout: float = 0.0,
        depth: int = 1, dropout_at: str = "each",
    ) -> None:
        super().__init__(in_dim, n_classes)
        if (hidden < 1 or attn_dim < 1 or not 1 <= depth <= 6 or not 0.0 <= dropout < 1.0
                or dropout_at not in DROPOUT_AT):
            raise ConfigError(
                f"abmil options need hidden, attn_dim >= 1, 1 <= depth <= 6, 0 <= dropout < 1 and dropout_at "
                f"one of {', '.join(DROPOUT_AT)}, got hidden={hidden}, attn_dim={attn_dim}, depth={depth}, "
                f"dropout={dropout}, dropout_at={dropout_at!r}; fix them in the model options."
            )
        self.embed = mlp_embedding(in_dim, hidden, depth, dropout, dropout_at)
        self.attention = AttentionScore(hidden, attn_dim, gated=self.gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = self.embed(x)
        a = masked_softmax(self.attention(h), valid)
        return self.classifier(pool(a, h)), a, {}


class GatedABMIL(ABMIL):
    """Gated attention MIL (Ilse et al. 2018, gated variant)."""

    gated = True
