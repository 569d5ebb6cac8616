"""TransMIL (Shao et al., NeurIPS 2021) over a slide's flat set of patches.

h = ReLU(Linear(D->512)(x)); tokens are padded to a square grid by repeating the first ones (as the
reference does), a class token is prepended, then TransLayer -> PPEG (depthwise 7/5/3 convolutions on the
grid) -> TransLayer -> LayerNorm; logits = Linear(512->K)(class token).

Difference from the reference: it uses Nystrom attention (landmark approximation plus a depthwise residual
convolution over values) from an extra package; here each TransLayer is exact multi-head self-attention
(written out, so it batches under torch.func.vmap), which equals what Nystrom approximates and is affordable for
the thousands of patches of a slide. Patch attention for heatmaps is the class token's attention in the last
layer (mean over heads), padding copies folded back onto their originals. Instances are laid out in
(bag, patch) order, so the grid is only roughly spatial, as in the reference.

In a padded batch each slide keeps its own grid: its valid instances are moved to the front (in order), its
side**2 tokens are masked out of the attention keys beyond them, and PPEG convolves each grid in the top-left
corner of a zero canvas as large as the batch's largest grid, which equals zero padding around that grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mrantool.errors import ConfigError
from mrantool.models.attention import masked_softmax
from mrantool.models.base import InstanceHead


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual over valid keys; optionally returns the first token's
    attention (mean over heads)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.heads = heads

    def forward(self, x: Tensor, keys: Tensor, return_cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (S, L, dim), keys (S, L) bool: which tokens may be attended to."""
        s, n, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(s, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)  # (S, heads, L, L)
        attention = masked_softmax(scores, keys[:, None, None, :])
        y = (attention @ v).transpose(1, 2).reshape(s, n, dim)
        cls_attention = attention[:, :, 0].mean(1) if return_cls_attention else None
        return x + self.out(y), cls_attention


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + dwconv7(x) + dwconv5(x) + dwconv3(x) on each slide's token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: Tensor) -> Tensor:
        """tokens (S, L, dim) laid out row-major on a side x side grid per slide (side (S,)), L a square."""
        s, n, dim = tokens.shape
        canvas_side = math.isqrt(n)
        r = torch.arange(canvas_side, device=tokens.device)
        rows, cols = r[:, None].expand(-1, canvas_side).reshape(-1), r.repeat(canvas_side)
        inside = (rows < side[:, None]) & (cols < side[:, None])  # (S, L): canvas cells of each slide's grid
        token_at = (rows * side[:, None] + cols).clamp(max=n - 1)
        canvas = tokens.gather(1, token_at.unsqueeze(-1).expand(-1, -1, dim)) * inside.unsqueeze(-1)
        grid = canvas.transpose(1, 2).reshape(s, dim, canvas_side, canvas_side)
        grid = (grid + sum(conv(grid) for conv in self.convs)).flatten(2).transpose(1, 2)
        j = torch.arange(n, device=tokens.device)
        cell_of = ((j // side[:, None]) * canvas_side + j % side[:, None]).clamp(max=n - 1)  # token -> canvas
        return grid.gather(1, cell_of.unsqueeze(-1).expand(-1, -1, dim))


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

    def pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        s, n_max = valid.shape
        order = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)  # valid instances first, in order
        h = self.embed(x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
        n = valid.sum(-1, keepdim=True)  # (S, 1), at least 1
        side = torch.ceil(torch.sqrt(n.double())).long()  # (S, 1)
        j = torch.arange(math.ceil(math.sqrt(n_max)) ** 2, device=x.device)
        source = torch.where(j < n, j, (j - n) % n)  # the reference pads the grid by repeating the first tokens
        in_grid = j < side * side
        tokens = h.gather(1, source.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        keys = torch.cat([torch.ones_like(in_grid[:, :1]), in_grid], 1)
        tokens = torch.cat([self.cls_token.expand(s, 1, -1), tokens], 1)
        tokens, _ = self.layer1(tokens, keys)
        tokens = torch.cat([tokens[:, :1], self.ppeg(tokens[:, 1:], side.squeeze(-1))], 1)
        tokens, cls_attention = self.layer2(tokens, keys, return_cls_attention=True)
        logits = self.classifier(self.norm(tokens[:, 0]))
        folded = torch.zeros_like(valid, dtype=cls_attention.dtype).scatter_add(1, source, cls_attention[:, 1:])
        folded = folded / folded.sum(-1, keepdim=True).clamp_min(1e-12)
        return logits, torch.zeros_like(folded).scatter(1, order, folded), {}
