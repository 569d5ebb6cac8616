"""Attention primitives: MRAN's thresholded norm attention, masked softmax/max, and (gated) attention scores.

All of them are mask-based and keep shapes static, so they run on padded batches and under torch.func.vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_TINY = 1e-12


def uniform_weights(valid: Tensor) -> Tensor:
    """1/N over the valid items of the last dimension; all zeros where nothing is valid."""
    v = valid.float()
    return v / v.sum(-1, keepdim=True).clamp_min(1.0)


def norm_threshold(scores: Tensor, valid: Tensor, t: float) -> Tensor:
    """MRAN's `renorm(relu(s / sum s - t / N))` over the last dimension, N = number of valid items.

    `scores` must be non-negative (feature or logit norms). Invalid items get 0 and do not count in N. When
    thresholding leaves nothing (all scores zero, or t >= 1 with equal scores) the weights fall back to
    uniform over the valid items; with no valid item at all they are all zero.
    """
    v = valid.to(scores.dtype)
    s = scores * v
    n = v.sum(-1, keepdim=True)
    share = s / s.sum(-1, keepdim=True).clamp_min(_TINY)
    w = torch.relu(share - t / n.clamp_min(1.0)) * v
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(_TINY), uniform_weights(valid).to(w))


def area_weighted(weights: Tensor, area: Tensor) -> Tensor:
    """`weights * area` renormalised over the last dimension: attention per unit of tissue instead of per item.
    Rows whose products are all zero stay zero."""
    w = weights * area
    return w / w.sum(-1, keepdim=True).clamp_min(_TINY)


def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the valid items of the last dimension; all zeros (never NaN) where nothing is valid."""
    filled = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)  # exp underflows to exactly 0 there
    return torch.softmax(filled, dim=-1) * valid.any(-1, keepdim=True)


def masked_max(values: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Max of `values` over `dim` among the valid items (`valid` broadcast to `values`)."""
    return values.masked_fill(~valid, torch.finfo(values.dtype).min).amax(dim)


def masked_argmax(values: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Index of the first maximum of `values` over `dim` among the valid items."""
    return values.masked_fill(~valid, torch.finfo(values.dtype).min).argmax(dim)


def pool(weights: Tensor, x: Tensor) -> Tensor:
    """Weighted sum over the second-to-last dimension: weights (..., N), x (..., N, D) -> (..., D)."""
    return (weights.unsqueeze(-2) @ x).squeeze(-2)


class AttentionScore(nn.Module):
    """Learnable attention score of Ilse et al. 2018: `w^T (tanh(V h) * sigmoid(U h))` (gated) or
    `w^T tanh(V h)`; returns one unnormalised score per item (shape of `h` without its last dimension)."""

    def __init__(self, in_dim: int, attn_dim: int, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        a = self.tanh_branch(h)
        if self.gate_branch is not None:
            a = a * self.gate_branch(h)
        return self.score(a).squeeze(-1)
