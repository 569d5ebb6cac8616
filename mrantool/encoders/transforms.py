"""RGB uint8 patches -> the normalised float tensor batch an encoder expects (vectorised, no per-patch loop)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mrantool.tiling.presets import Preset


def to_tensor_batch(patches: np.ndarray, preset: Preset) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, 3, input_px, input_px) float32, resized (antialiased bilinear) and normalised."""
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(f"Expected (N, h, w, 3) uint8 patches, got shape {patches.shape} dtype {patches.dtype}.")
    x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)
    px = preset.input_px
    if x.shape[-2:] != (px, px):
        x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()
