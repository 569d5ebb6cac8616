"""The extract stage as one call: resolve slides, build the encoder, open the store, run."""

from __future__ import annotations

import torch

from mrantool.config import ExtractConfig
from mrantool.encoders.registry import create_encoder
from mrantool.extract.inputs import collect_slides, parse_shard, shard
from mrantool.extract.pipeline import Extractor, ExtractReport, Progress, store_identity
from mrantool.store.reader import FeatureStore
from mrantool.tiling.presets import Preset, get_preset


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_preset(cfg: ExtractConfig) -> Preset:
    """The preset with the config's geometry overrides applied (`--encoder` goes to create_encoder)."""
    return get_preset(cfg.preset).with_overrides(mpp=cfg.target_mpp, bag_px=cfg.bag_px, grid=cfg.grid, cells=cfg.cells)


def extract(cfg: ExtractConfig, progress: Progress | None = None) -> ExtractReport:
    """Extract every slide of `cfg.slides` (this shard's part) into `cfg.store`; failures are recorded, not raised."""
    index, count = parse_shard(cfg.shard)
    slides = shard(collect_slides(cfg.slides), index, count)
    preset = resolve_preset(cfg)
    encoder = create_encoder(preset, weights=cfg.weights, pretrained=cfg.pretrained, arch=cfg.encoder)
    store = FeatureStore.create(cfg.store, store_identity(preset, encoder))
    extractor = Extractor(
        store, preset, encoder, device=resolve_device(cfg.device), batch_size=cfg.batch_size,
        workers=cfg.workers, slide_mpp=cfg.mpp, min_tissue=cfg.min_tissue, compile=cfg.compile, progress=progress,
    )
    return extractor.run(slides)
