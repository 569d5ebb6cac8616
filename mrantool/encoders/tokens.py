"""Spatial tokens -> the c x c grid of cell embeddings (pure tensor functions, row-major cell order)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mrantool.errors import ConfigError


def cells_from_feature_map(fmap: torch.Tensor, c: int) -> torch.Tensor:
    """Adaptive-average-pool a (B, D, h, w) feature map to c x c and return cells as (B, c*c, D), row-major."""
    return F.adaptive_avg_pool2d(fmap, c).flatten(2).transpose(1, 2)


def token_grid(tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Drop the `n_prefix` class/register tokens of (B, N, D) tokens and reshape the rest to a (B, D, s, s) map."""
    patch = tokens[:, n_prefix:]
    n = patch.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(
            f"The encoder gave {n} patch tokens after dropping {n_prefix} prefix tokens, which is not a square "
            "grid; use a square input size and a ViT whose prefix token count timm reports correctly."
        )
    return patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], side, side)


def cells_from_vit_tokens(tokens: torch.Tensor, n_prefix: int, c: int) -> torch.Tensor:
    """Pool the patch tokens of (B, N, D) ViT tokens (prefix tokens excluded) to c x c cells: (B, c*c, D)."""
    return cells_from_feature_map(token_grid(tokens, n_prefix), c)
