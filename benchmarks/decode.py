"""Extraction's decode ceiling: `mrantool extract` with a no-op encoder against a bare OpenSlide read loop.

    nice python benchmarks/decode.py                 # as reported in benchmarks/results/decode.md
    python benchmarks/decode.py --smoke             # a check with tiny settings (results under --root)

On generated JPEG-tiled pyramidal TIFFs (`--slides` of `--size` px at 0.5 mpp), for the `--preset` geometry:
  (bare)  one process per core, each reading its share of the bags with OpenSlide `read_region` at the level
          and size the pipeline reads (the regions are planned once, untimed): the most the machine can decode;
  (noop)  the real pipeline (`LocalExecutor`: planning, tissue, DataLoader workers = cores, region -> patches,
          store writes and commits) with an encoder that returns zeros: what the pipeline leaves of it.
Target: noop / bare >= 0.85 (medians over `--rounds`, arms alternating). Also the RGB bytes decoded per
patch from the tile geometry (whole tiles, no tile cache assumed): one region read per bag, as the pipeline
does, against one read per patch (a CLAM-style loop). Writes decode.json and decode.md.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, load_average, markdown_table, median, usable_cores, write_results
from mrantool.cohorts.synthetic import make_cohort
from mrantool.extract.executors.base import store_identity
from mrantool.extract.executors.local import LocalExecutor
from mrantool.extract.inputs import collect_slides
from mrantool.slides.reader import open_slide
from mrantool.store.reader import FeatureStore
from mrantool.tiling.presets import Preset, get_preset
from mrantool.tiling.slide_plan import plan_slide

TARGET = 0.85
TABLES = {"rates": ["arm", "patches/s", "runs (patches/s)"]}  # columns of decode.md
Region = tuple[str, int, int, int, int]  # path, x0, y0, level, side at that level


class NoopEncoder(torch.nn.Module):
    """Returns zero patch and cell embeddings of the preset's sizes: extraction without the model."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.preset, self.embed_dim = preset, preset.embed_dim
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so .to(device) has something to move

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = self.preset.geometry.cells ** 2
        return x.new_zeros(x.shape[0], self.embed_dim), x.new_zeros(x.shape[0], cells, self.embed_dim)

    def identity(self) -> dict[str, Any]:
        return {"arch": "noop", "hub": None, "weights": "none", "model_kwargs": {}, "mean": list(self.preset.mean),
                "std": list(self.preset.std), "input_px": self.preset.input_px, "feature_index": None,
                "cells": self.preset.geometry.cells, "tokens": self.preset.tokens, "embed_dim": self.embed_dim}


def plan_regions(paths: list[Path], preset: Preset, min_tissue: float) -> list[Region]:
    """The regions the pipeline reads: one per bag, at the slide level `read_region_mpp` picks."""
    g = preset.geometry
    regions = []
    for path in paths:
        with open_slide(path) as slide:
            plan = plan_slide(slide, g, min_tissue).plan
            level = slide.best_level(g.mpp)
            side = max(1, math.ceil(g.bag_px * g.mpp / slide.mpp / slide.level_downsamples[level] - 1e-6))
            regions += [(str(path), int(x), int(y), level, side) for x, y in plan.coords]
    return regions


def _read_share(regions: list[Region]) -> int:
    """Read every region with OpenSlide (one handle per slide); return how many were read."""
    handles: dict[str, openslide.OpenSlide] = {}
    for path, x, y, level, side in regions:
        if path not in handles:
            handles[path] = openslide.OpenSlide(path)
        np.asarray(handles[path].read_region((x, y), level, (side, side)))
    for handle in handles.values():
        handle.close()
    return len(regions)


def run_bare(regions: list[Region], processes: int) -> float:
    """Seconds for `processes` forked readers to read all regions (contiguous shares, as a sharded run)."""
    shares = [list(part) for part in np.array_split(np.arange(len(regions)), processes)]
    context = mp.get_context("fork")
    with context.Pool(processes) as pool:
        tic = time.perf_counter()
        done = sum(pool.map(_read_share, [[regions[i] for i in share] for share in shares]))
        seconds = time.perf_counter() - tic
    if done != len(regions):
        raise RuntimeError(f"the readers read {done} of {len(regions)} regions")
    return seconds


def run_noop(slides_dir: Path, preset: Preset, workers: int, batch_size: int, store_dir: Path) -> tuple[float, int]:
    """Seconds and patches of a full extraction with the no-op encoder into a fresh store."""
    shutil.rmtree(store_dir, ignore_errors=True)
    encoder = NoopEncoder(preset)
    slides = collect_slides([str(slides_dir)])
    tic = time.perf_counter()
    store = FeatureStore.create(store_dir, store_identity(preset, encoder))
    report = LocalExecutor(store, preset, encoder, device="cpu", batch_size=batch_size, workers=workers).run(slides)
    seconds = time.perf_counter() - tic
    failed = [r for r in report.results if r.status != "done"]
    if failed:
        raise RuntimeError(f"extraction failed: {failed[0].message}")
    return seconds, report.n_patches


def decoded_bytes(regions: list[Region], preset: Preset) -> dict[str, float]:
    """RGB bytes of the tiles decoded per patch (no tile cache): reading each bag once vs each patch alone."""
    g = preset.geometry
    layout: dict[tuple[str, int], tuple[int, float]] = {}  # (path, level) -> tile side, downsample
    bag_px = patch_px = 0
    for path, x, y, level, side in regions:
        if (path, level) not in layout:
            with openslide.OpenSlide(path) as handle:
                tile = int(handle.properties.get(f"openslide.level[{level}].tile-width", 256))
                layout[path, level] = tile, handle.level_downsamples[level]
        t, ds = layout[path, level]
        lx, ly = x / ds, y / ds
        bag_px += _tiles(lx, ly, side, side, t) * t * t
        step = side / g.grid
        for row in range(g.grid):
            for col in range(g.grid):
                patch_px += _tiles(lx + col * step, ly + row * step, step, step, t) * t * t
    patches = len(regions) * g.n_patches
    return {"per_bag_read": 3 * bag_px / patches, "per_patch_read": 3 * patch_px / patches,
            "patch_bytes": 3 * (g.bag_px / g.grid) ** 2}


def _tiles(x: float, y: float, w: float, h: float, tile: int) -> int:
    """Tiles of side `tile` that a w x h rectangle at (x, y) overlaps."""
    cols = math.floor((x + w - 1e-9) / tile) - math.floor(x / tile) + 1
    rows = math.floor((y + h - 1e-9) / tile) - math.floor(y / tile) + 1
    return cols * rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mran")
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--size", type=int, default=8192, help="level-0 px per side")
    parser.add_argument("--processes", type=int, default=usable_cores(), help="bare readers and loader workers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-tissue", type=float, default=0.1)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mrantool_decode_bench"))
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, results under --root")
    args = parser.parse_args()
    if args.smoke:
        args.slides, args.size, args.rounds = 2, 2048, 1
    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    root = Path(args.root)
    slides_dir = root / f"slides-{args.slides}-{args.size}"
    if not (slides_dir / "labels.csv").is_file():
        shutil.rmtree(slides_dir, ignore_errors=True)
        make_cohort(slides_dir, n_slides=args.slides, seed=0, size=(args.size, args.size))
    load_before = load_average()
    paths = sorted(slides_dir.glob("*.tif*"))
    regions = plan_regions(paths, preset, args.min_tissue)
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "noop": []}
    for r in range(args.rounds):
        for arm in (("bare", "noop") if r % 2 == 0 else ("noop", "bare")):
            if arm == "bare":
                seconds, patches = run_bare(regions, args.processes), len(regions) * preset.geometry.n_patches
            else:
                seconds, patches = run_noop(slides_dir, preset, args.processes, args.batch_size, root / "store.zarr")
            runs[arm].append({"seconds": seconds, "patches": patches, "patches_per_s": patches / seconds,
                              "load": load_average()})
            print(f"round {r + 1} {arm}: {patches / seconds:.0f} patches/s (load {load_average()})", flush=True)
    rates = {arm: median([x["patches_per_s"] for x in rs]) for arm, rs in runs.items()}
    ratio = rates["noop"] / rates["bare"]
    pixels = decoded_bytes(regions, preset)
    report = {"preset": args.preset, "slides": args.slides, "size": args.size, "processes": args.processes,
              "batch_size": args.batch_size, "bags": len(regions), "runs": runs, "patches_per_s": rates,
              "noop_vs_bare": round(ratio, 3), "target": TARGET, "met": ratio >= TARGET,
              "decoded_bytes_per_patch": pixels, "hardware": hardware(), "load_before": load_before,
              "load_after": load_average()}
    hw = report["hardware"]
    text = "\n".join([
        "# decode ceiling: extract with a no-op encoder vs bare OpenSlide reads", "",
        f"{args.slides} generated slides of {args.size}^2 px (JPEG tiles), preset `{args.preset}` ({len(regions)} "
        f"bags of {preset.geometry.n_patches} patches); {args.processes} reader processes / loader workers; "
        f"medians of {args.rounds} rounds, arms alternating.", "",
        markdown_table(TABLES["rates"], [
            [arm, f"{rates[arm]:.0f}", " ".join(f"{x['patches_per_s']:.0f}" for x in runs[arm])] for arm in runs],
            [False, True, False]), "",
        f"noop / bare = {ratio:.3f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}).", "",
        f"RGB bytes decoded per patch of {pixels['patch_bytes']:,.0f} bytes (whole tiles, no tile cache): "
        f"{pixels['per_bag_read']:,.0f} reading each bag once (the pipeline) vs {pixels['per_patch_read']:,.0f} "
        "reading each patch on its own.", "",
        f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}; load average {load_before} before, "
        f"{report['load_after']} after; {hw['date']}.", ""])
    out = Path(args.out) if args.out else root / "results" if args.smoke else Path(__file__).parent / "results"
    write_results(out, "decode", report, text)
    print(text)


if __name__ == "__main__":
    main()
