"""A MIL head on top of its own patch encoder, fed with bag pixels: what end-to-end training trains.

`PixelMIL` keeps the head contract of the trainer (forward(patches, cells, mask) -> MILOutput, compute_loss,
n_classes), with uint8 pixels (n_bags, P, h, w, 3) in place of features, so the cached fit's loop (early
stopping on a deep copy, bag mining) trains it unchanged. It takes a padded batch of slides (S, n_bags, P, h, w,
3) exactly when its head does (`batched`, read from `.head` by the trainer), so `batch_size` works as for cached
training; one fold trains at a time (`train_fold`), with the encoder in its own parameter group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrantool.encoders.registry import PatchEncoder
from mrantool.errors import ConfigError
from mrantool.models.base import MILHead, MILOutput
from mrantool.tiling.presets import Preset

EVAL_CHUNK = 512  # patches per encoder forward at evaluation
BATCHNORM = ("batch", "frozen")


def dihedral(x: Tensor, k: Tensor) -> Tensor:
    """Patch i of `x (N, C, H, W)` rotated by 90 deg x (k[i] % 4), then flipped left-right when k[i] >= 4."""
    out = torch.empty_like(x)
    for value in range(8):
        index = (k == value).nonzero().flatten()
        if len(index):
            part = torch.rot90(x[index], value % 4, dims=(2, 3))
            out[index] = part.flip(3) if value >= 4 else part
    return out


def colour_jitter(x: Tensor, strength: float) -> Tensor:
    """Per patch brightness, contrast and saturation scaled by factors in [1 - s, 1 + s]; `x` in [0, 1]."""
    n = x.shape[0]
    factors = 1 + strength * (2 * torch.rand(3, n, 1, 1, 1) - 1)
    brightness, contrast, saturation = factors.to(x)
    x = x * brightness
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return ((x - grey) * saturation + grey).clamp(0, 1)


class PixelMIL(nn.Module):
    """`head` over the patch and cell embeddings that `encoder` makes from the tissue patches of each bag.

    Training mode: the tissue patches of the step's slides are augmented (random flips and 90-degree rotations
    when `augment`, colour jitter of strength `color_jitter`) and encoded as one batch. `batchnorm="batch"`:
    BatchNorm normalises with the statistics of those patches (one slide's with batch_size 1) and updates its
    running ones; `"frozen"`: BatchNorm layers stay in
    eval mode (their running statistics fixed, their affine weights trained). Eval mode: no augmentation, running
    statistics, patches encoded in chunks. Non-tissue patches are not encoded (zero embeddings, masked).
    """

    needs_cells = False  # the trainer passes pixels only; the encoder makes the cells itself

    def __init__(self, encoder: PatchEncoder, head: MILHead, preset: Preset, *, augment: bool = True,
                 color_jitter: float = 0.0, batchnorm: str = "batch") -> None:
        super().__init__()
        if batchnorm not in BATCHNORM:
            raise ConfigError(f"batchnorm {batchnorm!r} is unknown; use {' or '.join(BATCHNORM)}.")
        self.encoder = encoder
        self.head = head
        self.augment = augment
        self.color_jitter = color_jitter
        self.batchnorm = batchnorm
        self.input_px = preset.input_px
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)
        if encoder.kind == "cnn":
            encoder.to(memory_format=torch.channels_last)

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    def train(self, mode: bool = True) -> PixelMIL:
        super().train(mode)
        if mode and self.batchnorm == "frozen":
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _inputs(self, pixels: Tensor) -> Tensor:
        """(N, h, w, 3) uint8 -> (N, 3, input_px, input_px) normalised float, augmented in training mode."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.training and self.augment:
            x = dihedral(x, torch.randint(0, 8, (len(x),)).to(x.device))
        if self.training and self.color_jitter > 0:
            x = colour_jitter(x, self.color_jitter)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.encoder.kind == "cnn" else x

    def _encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        x = self._inputs(pixels)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            patch, cells = self.encoder(x)
        return patch.float(), cells.float()

    def embed(self, pixels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch (..., n_bags, P, D) and, when the head needs them, cell (..., n_bags, P, C, D) embeddings of the
        tissue patches (zeros elsewhere) of `pixels` (..., n_bags, P, h, w, 3), `mask` (..., n_bags, P)."""
        tissue = pixels[mask]
        if self.training:
            patch, cells = self._encode(tissue)
        else:
            parts = [self._encode(tissue[i:i + EVAL_CHUNK]) for i in range(0, len(tissue), EVAL_CHUNK)]
            patch, cells = torch.cat([p for p, _ in parts]), torch.cat([c for _, c in parts])
        patches = patch.new_zeros(*mask.shape, patch.shape[-1]).index_put((mask,), patch)
        if not self.head.needs_cells:
            return patches, None
        return patches, cells.new_zeros(*mask.shape, *cells.shape[1:]).index_put((mask,), cells)

    def forward(self, patches: Tensor, cells: Tensor | None = None, mask: Tensor | None = None) -> MILOutput:
        """`patches`: the bags' uint8 pixels (n_bags, P, h, w, 3), or (S, n_bags, P, h, w, 3) for a batched head;
        `cells` is ignored; `mask` (n_bags, P) or (S, n_bags, P)."""
        mask = torch.ones(patches.shape[:-3], dtype=torch.bool, device=patches.device) if mask is None else mask.bool()
        features, cell_features = self.embed(patches, mask)
        return self.head(features, cell_features, mask)

    def compute_loss(self, out: MILOutput, label: Tensor, **kwargs) -> tuple[Tensor, dict[str, float]]:
        return self.head.compute_loss(out, label, **kwargs)

    def param_groups(self, lr: float, encoder_lr: float | None) -> list[dict]:
        """Optimiser parameter groups: the head at `lr`, the encoder at `encoder_lr` (`lr` when None)."""
        return [{"params": list(self.head.parameters()), "lr": lr},
                {"params": list(self.encoder.parameters()), "lr": lr if encoder_lr is None else encoder_lr}]
