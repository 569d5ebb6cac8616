"""The extract stage as one call: resolve slides, build the encoder, open the store, run an executor."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mrantool.config import ExtractConfig
from mrantool.encoders.rebuild import encoder_weights_from_run, finetuned_extract_settings
from mrantool.encoders.registry import aligned_preset, create_encoder
from mrantool.errors import ConfigError
from mrantool.extract.executors.base import Executor, ExtractReport, Progress, store_identity
from mrantool.extract.inputs import SlideInput, collect_slides, parse_shard, shard
from mrantool.extract.leakage import FIX as LEAK_FIX
from mrantool.extract.leakage import label_slides, overlapping
from mrantool.slides.cache import SlideCache
from mrantool.slides.mpp_table import MppTable, read_mpp_table
from mrantool.store.reader import FeatureStore
from mrantool.tiling.presets import Preset, get_preset

EXECUTORS = ("local", "ray")
WAIT_POLL_S = 5.0  # how often `--wait` looks again at slides other extractors hold


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


def _check(cfg: ExtractConfig) -> None:
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"--executor {cfg.executor!r} is not one of {', '.join(EXECUTORS)}; use local or ray.")
    if cfg.address and cfg.executor != "ray":
        raise ConfigError("--address names a Ray cluster; pass it with --executor ray.")
    if not cfg.lock_ttl > 0:
        raise ConfigError(f"--lock-ttl must be a positive number of seconds, got {cfg.lock_ttl}; e.g. 600.")
    if not cfg.cache_gb > 0:
        raise ConfigError(f"--cache-gb must be a positive size in GB, got {cfg.cache_gb}.")
    if cfg.encoders is not None and cfg.encoders < 1:
        raise ConfigError(f"--encoders must be 1 or more, got {cfg.encoders}.")


def extract(cfg: ExtractConfig, progress: Progress | None = None) -> ExtractReport:
    """Extract every slide of `cfg.slides` (this shard's part) into `cfg.store`; failures are recorded, not raised.

    With `cfg.wait`, slides other extractors hold are looked at again until they are complete or done here.
    """
    _check(cfg)
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
    store = FeatureStore.create(cfg.store, identity, lock_ttl_s=cfg.lock_ttl)
    cache = SlideCache(cfg.cache_dir, cfg.cache_gb)
    cache.clean()
    executor = make_executor(cfg, store, preset, encoder, cache, table, progress, extra)
    report = executor.run(slides)
    while cfg.wait and report.busy and not report.interrupted:
        time.sleep(min(WAIT_POLL_S, cfg.lock_ttl / 4))
        report = _merge(report, executor.run(_busy(slides, report)))
    return report


def make_executor(cfg: ExtractConfig, store: FeatureStore, preset: Preset, encoder: torch.nn.Module,
                  cache: SlideCache, mpp_table: MppTable | None, progress: Progress | None,
                  provenance_extra: dict[str, dict[str, Any]] | None = None) -> Executor:
    """The executor `cfg.executor` names, set up from the config; `provenance_extra`: slide_id -> extra
    provenance keys (e.g. labels_seen_by_encoder)."""
    if cfg.executor == "ray":
        from mrantool.extract.executors.ray import EncoderSpec, RayExecutor

        spec = EncoderSpec(preset, cfg.weights, cfg.pretrained, cfg.encoder, cfg.device)
        return RayExecutor(store, spec, address=cfg.address, encoders=cfg.encoders, batch_size=cfg.batch_size,
                           slide_mpp=cfg.mpp, mpp_table=mpp_table, min_tissue=cfg.min_tissue, cache=cache,
                           progress=progress, provenance_extra=provenance_extra)
    from mrantool.extract.executors.local import LocalExecutor

    return LocalExecutor(store, preset, encoder, device=resolve_device(cfg.device), batch_size=cfg.batch_size,
                         workers=cfg.workers, slide_mpp=cfg.mpp, mpp_table=mpp_table, min_tissue=cfg.min_tissue,
                         compile=cfg.compile, cache=cache, progress=progress, provenance_extra=provenance_extra)


def _busy(slides: list[SlideInput], report: ExtractReport) -> list[SlideInput]:
    busy = {r.slide_id for r in report.busy}
    return [s for s in slides if s.slide_id in busy]


def _merge(first: ExtractReport, again: ExtractReport) -> ExtractReport:
    """`first` with its busy slides replaced by what happened to them in `again`."""
    return ExtractReport([r for r in first.results if r.status != "busy"] + again.results,
                         first.seconds + again.seconds, first.n_patches + again.n_patches, again.interrupted)
