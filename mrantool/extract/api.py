"""The extract stage as one call: resolve slides, build the encoder, open the store, run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mrantool.config import ExtractConfig
from mrantool.encoders.rebuild import encoder_weights_from_run, finetuned_extract_settings
from mrantool.encoders.registry import aligned_preset, create_encoder
from mrantool.errors import ConfigError
from mrantool.extract.inputs import collect_slides, parse_shard, shard
from mrantool.extract.leakage import FIX as LEAK_FIX
from mrantool.extract.leakage import label_slides, overlapping
from mrantool.extract.pipeline import Extractor, ExtractReport, Progress, store_identity
from mrantool.slides.mpp_table import read_mpp_table
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


def with_finetuned_encoder(cfg: ExtractConfig) -> ExtractConfig:
    """`--encoder-from RUN`: the run's fine-tuned weights and the preset/geometry it was trained with."""
    weights = encoder_weights_from_run(cfg.encoder_from)
    settings = finetuned_extract_settings(cfg.encoder_from)
    return cfg.model_copy(update={
        "weights": str(weights), "preset": settings["preset"], "encoder": settings["encoder"],
        "target_mpp": settings["target_mpp"], "bag_px": settings["bag_px"], "grid": settings["grid"],
        "cells": settings["cells"]})


def extract(cfg: ExtractConfig, progress: Progress | None = None) -> ExtractReport:
    """Extract every slide of `cfg.slides` (this shard's part) into `cfg.store`; failures are recorded, not raised."""
    if cfg.encoder_from:
        cfg = with_finetuned_encoder(cfg)
    index, count = parse_shard(cfg.shard)
    slides = collect_slides(cfg.slides)
    table = read_mpp_table(cfg.mpp_csv) if cfg.mpp_csv else None
    if table is not None:
        table.check_covers((s.slide_id, s.path) for s in slides)
        slides = [replace(s, mpp=table.lookup(s.slide_id, s.path)) for s in slides]
    slides = shard(slides, index, count)
    preset = resolve_preset(cfg)
    extra: dict[str, dict[str, str]] = {}
    if cfg.encoder_from:
        leaked = overlapping(slides, label_slides(cfg.encoder_from))
        if leaked and not cfg.allow_label_overlap:
            shown = ", ".join(s.slide_id for s in leaked[:3]) + (f" and {len(leaked) - 3} more" if len(leaked) > 3
                                                                 else "")
            raise ConfigError(f"{len(leaked)} of the slides to extract ({shown}) trained or validated the encoder of "
                              f"{cfg.encoder_from}, so their features carry their labels and cross-validation on "
                              f"them would be optimistic; {LEAK_FIX}.")
        extra = {s.slide_id: {"labels_seen_by_encoder": str(Path(cfg.encoder_from).resolve())} for s in leaked}
    encoder = create_encoder(preset, weights=cfg.weights, pretrained=cfg.pretrained, arch=cfg.encoder)
    preset = aligned_preset(preset, encoder)  # a hub model's own input size and normalisation
    identity = store_identity(preset, encoder)
    if cfg.encoder_from:
        identity["finetuned_from"] = str(Path(cfg.encoder_from).resolve())
    store = FeatureStore.create(cfg.store, identity)
    extractor = Extractor(
        store, preset, encoder, device=resolve_device(cfg.device), batch_size=cfg.batch_size,
        workers=cfg.workers, slide_mpp=cfg.mpp, mpp_table=table, min_tissue=cfg.min_tissue, compile=cfg.compile,
        progress=progress, provenance_extra=extra,
    )
    return extractor.run(slides)
