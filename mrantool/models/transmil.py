"""TransMIL (Shao et al., NeurIPS 2021) over a slide's flat set of patches.

h = ReLU(Linear(D->512)(x)); tokens are padded to a square grid by repeating the first ones (as the
reference does), a class token is prepended, then TransLayer -> PPEG (depthwise 7/5/3 convolutions on the
grid) -> TransLayer -> LayerNorm; logits = Linear(512->K)(class token).

Difference from the reference: it uses Nystrom attention (landmark approximation plus a depthwise residual
convolution over values) from an extra package; here each TransLayer is exact multi-head self-attention via
torch's scaled_dot_product_attention, which equals what Nystrom approximates and is affordable for the
thousands of patches of a slide. Patch attention for heatmaps is the class token's attention in the last
layer (mean over heads), padding copies folded back onto their originals. Instances are laid out in
(bag, patch) order, so the grid is only roughly spatial, as in the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.base import InstanceHead


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual; optionally returns the first token's attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.heads = heads

    def forward(self, x: Tensor, return_cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        n, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        y = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, dim)
        cls_attention = None
        if return_cls_attention:
            scores = q[:, :1] @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
            cls_attention = scores.softmax(-1).mean(0).squeeze(0)
        return x + self.out(y), cls_attention


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + dwconv7(x) + dwconv5(x) + dwconv3(x) on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: int) -> Tensor:
        grid = tokens.T.reshape(1, tokens.shape[1], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2)[0].T


class TransMIL(InstanceHead):
    """TransMIL with exact attention; `hidden` token width, `heads`, `dropout` in the attention output."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__(in_dim, n_classes)
        if heads < 1 or hidden % heads or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"transmil needs hidden divisible by heads and 0 <= dropout < 1, got hidden={hidden}, "
                f"heads={heads}, dropout={dropout}; fix them in the model options."
            )
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, hidden))
        self.layer1 = SelfAttention(hidden, heads, dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = SelfAttention(hidden, heads, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        n = x.shape[0]
        side = math.ceil(math.sqrt(n))
        pad = torch.arange(side * side - n, device=x.device) % n
        h = self.embed(x)
        tokens = torch.cat([self.cls_token, h, h[pad]])
        tokens, _ = self.layer1(tokens)
        tokens = torch.cat([tokens[:1], self.ppeg(tokens[1:], side)])
        tokens, cls_attention = self.layer2(tokens, return_cls_attention=True)
        logits = self.classifier(self.norm(tokens[0]))
        grid_attention = cls_attention[1:]
        weights = grid_attention[:n].index_add(0, pad, grid_attention[n:])
        return logits, weights / weights.sum().clamp_min(1e-12), {}
