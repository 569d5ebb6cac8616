"""Extraction throughput: our pipeline against a naive CLAM-style loop, the bare encoder and LazySlide.

    nice python benchmarks/extract.py                     # as reported in benchmarks/results/extract.md
    python benchmarks/extract.py --encoders mran --rounds 1 --no-compile --size 2048   # a quick run
    python benchmarks/extract.py --device cuda --workers 4 8 --batch-sizes 256 128     # a GPU run

Slides: `--slides` generated H&E-like pyramidal TIFFs (make_cohort, `--size` px square at `--slide-mpp`).
For each encoder preset (`mran`: ResNet-18 at 128 px; `resnet50-trunc`: CLAM's ResNet-50 cut after stage 3
at 256 px) the first slides whose patches add up to at most `--max-patches` (at least one) are processed by:

  (a) our pipeline: `LocalExecutor` into a new feature store (patch + cell embeddings, float16), for each batch
      size and DataLoader worker count, and with compile=True (the first run compiles, later rounds reuse it);
  (b) a naive CLAM-style loop: OpenSlide read_region per patch, PIL -> ToTensor/Normalize, plain fp32 model
      (NCHW, torch.no_grad), features + coords appended to a float32 HDF5 file per slide (opened per batch);
  (c) the plain fp32 encoder (NCHW, torch.no_grad) on pre-read, pre-normalised tensors: the ceiling of any
      encoder-bound pipeline without model optimisations; c_cl is the same in channels_last (as (a) runs it);
  (d) LazySlide, when installed: open_wsi, find_tissues, tile_tissues, feature_extraction with the same plain
      encoder module, wsi.write(); it tiles tissue itself, so its patch count differs.

(a), (b) and (d) are timed end to end (tissue detection and writing included). Measurements are interleaved,
their order rotated every round; medians over `--rounds`. Also: agreement of (a) with the plain model on the
same pixels, and bytes per patch on disk. Writes extract.json and extract.md into `--out`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openslide
import torch
from PIL import Image
from torchvision import transforms

from mrantool.cohorts.synthetic import make_cohort
from mrantool.encoders.registry import PatchEncoder, create_encoder
from mrantool.extract.dataset import cut_patches
from mrantool.extract.executors.base import store_identity
from mrantool.extract.executors.local import LocalExecutor
from mrantool.extract.inputs import SlideInput, collect_slides
from mrantool.slides.reader import open_slide
from mrantool.store.reader import FeatureStore
from mrantool.store.schema import CELL_EMB
from mrantool.tiling.geometry import patch_coords
from mrantool.tiling.presets import PRESETS, Preset, get_preset
from mrantool.tiling.slide_plan import plan_slide

try:
    from benchmarks.common import GpuSampler, hardware, load_average, markdown_table, median, write_results
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    from common import GpuSampler, hardware, load_average, markdown_table, median, write_results

TARGETS = {"a_over_c": 1.3, "a_over_b": 1.5, "a_over_d": 1.5}
MIN_TISSUE = 0.1
TABLES = {"runs": ["method:setting", "patches", "runs", "seconds", "patches/s", "steady/s", "first batch s",
                   "GPU util", "load", "note"], "ratios": ["ratio", "value", "target", "met"]}  # columns of extract.md


@dataclass(frozen=True)
class Setting:
    """One configuration of our pipeline."""

    batch_size: int
    workers: int
    compile: bool = False

    @property
    def name(self) -> str:
        return f"bs{self.batch_size}-w{self.workers}" + ("-compile" if self.compile else "")


@dataclass
class Workload:
    """The slides one encoder processes and the level-0 top-left of every patch, in store order."""

    preset: Preset
    slides: list[SlideInput]
    coords: list[np.ndarray]  # per slide, (n_patches, 2)
    bag_coords: list[np.ndarray]  # per slide, (n_bags, 2)

    @property
    def n_patches(self) -> int:
        return sum(len(c) for c in self.coords)


# -- workload


def plan_workload(preset: Preset, slides: list[SlideInput], max_patches: int) -> Workload:
    """The first slides with at most `max_patches` patches in all (at least one slide), with patch coords."""
    chosen, coords, bags = [], [], []
    total = 0
    for item in slides:
        with open_slide(item.path) as slide:
            plan = plan_slide(slide, preset.geometry, MIN_TISSUE).plan
        n = plan.n_bags * preset.geometry.n_patches
        if chosen and total + n > max_patches:
            break
        chosen.append(item)
        coords.append(patch_coords(plan, preset.geometry).reshape(-1, 2))
        bags.append(plan.coords)
        total += n
    return Workload(preset, chosen, coords, bags)


def read_patches(work: Workload) -> np.ndarray:
    """Every patch of the workload as (N, h, w, 3) uint8, read bag by bag through our reader."""
    g = work.preset.geometry
    out = []
    for item, bags in zip(work.slides, work.bag_coords, strict=True):
        with open_slide(item.path) as slide:
            for x, y in bags:
                out.append(cut_patches(slide.read_region_mpp(int(x), int(y), g.bag_px, g.mpp), g.grid))
    return np.concatenate(out)


def normalised_batches(patches: np.ndarray, preset: Preset, batch: int,
                       device: torch.device) -> list[torch.Tensor]:
    """Float NCHW ImageNet-normalised batches on `device` (resized to the encoder's input size if needed)."""
    mean = torch.tensor(preset.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(preset.std).view(1, 3, 1, 1) * 255
    out = []
    for start in range(0, len(patches), batch):
        x = torch.from_numpy(patches[start:start + batch]).permute(0, 3, 1, 2).float()
        if x.shape[-1] != preset.input_px:
            px = preset.input_px
            x = torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True)
        out.append(((x - mean) / std).contiguous().to(device))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def du(path: Path, skip: str | None = None) -> int:
    """Bytes of the files under `path`, leaving out any folder named `skip`."""
    total = 0
    for root, dirs, files in os.walk(path):
        if skip is not None and skip in dirs:
            dirs.remove(skip)
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# -- (a) our pipeline


def run_pipeline(work: Workload, encoder: PatchEncoder, setting: Setting, store_dir: Path,
                 device: torch.device) -> dict[str, Any]:
    """One extraction of the workload into a new store; end-to-end and steady-state throughput."""
    preset = work.preset
    ticks: list[tuple[float, int]] = []

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "bags":
            ticks.append((time.perf_counter(), info["patches"]))

    load = load_average()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        store = FeatureStore.create(store_dir, store_identity(preset, encoder))
        extractor = LocalExecutor(store, preset, encoder, device=str(device), batch_size=setting.batch_size,
                              workers=setting.workers, min_tissue=MIN_TISSUE, compile=setting.compile,
                              progress=progress)
        report = extractor.run(work.slides)
        seconds = time.perf_counter() - start
    if report.failed or report.n_patches != work.n_patches:
        raise RuntimeError(f"Extraction into {store_dir} gave {report.n_patches} patches (expected "
                           f"{work.n_patches}); failures: {[r.message for r in report.failed]}")
    first = ticks[0][0] - start
    steady = (sum(n for _, n in ticks[1:]) / (ticks[-1][0] - ticks[0][0])) if len(ticks) > 2 else float("nan")
    return {"patches": report.n_patches, "seconds": seconds, "patches_per_s": report.n_patches / seconds,
            "first_batch_s": first, "steady_patches_per_s": steady, "load": load, **gpu.summary()}


def store_features(store_dir: Path, work: Workload) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) patch and (N, C, D) cell embeddings of a store, in workload order, as float32."""
    store = FeatureStore.open(store_dir)
    patches, cells = [], []
    for item in work.slides:
        s = store.slide(item.slide_id)
        patches.append(s.read_patches().reshape(-1, s.dim))
        cells.append(s.cell_emb[:].reshape(-1, s.n_cells, s.dim))
    return np.concatenate(patches).astype(np.float32), np.concatenate(cells).astype(np.float32)


def store_bytes(store_dir: Path, n_patches: int) -> dict[str, float]:
    slides = store_dir / "slides"
    return {"store_bytes_per_patch": du(slides) / n_patches,
            "store_patch_only_bytes_per_patch": du(slides, skip=CELL_EMB) / n_patches}


# -- (b) naive CLAM-style loop


def _append_h5(path: Path, arrays: dict[str, np.ndarray], mode: str) -> None:
    """CLAM's save_hdf5: open the file, create resizable datasets on first use, append rows."""
    with h5py.File(path, mode) as f:
        for key, value in arrays.items():
            if key not in f:
                f.create_dataset(key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                                 chunks=(1, *value.shape[1:]), dtype=value.dtype, data=value)
            else:
                dset = f[key]
                dset.resize(len(dset) + len(value), axis=0)
                dset[-len(value):] = value


def run_naive(work: Workload, plain: PatchEncoder, batch: int, out_dir: Path,
              device: torch.device) -> dict[str, Any]:
    """Per-patch read_region, PIL -> tensor, fp32 NCHW forward, features + coords appended to HDF5."""
    g, preset = work.preset.geometry, work.preset
    tf = [transforms.ToTensor(), transforms.Normalize(preset.mean, preset.std)]
    if g.patch_px != preset.input_px:
        tf.insert(0, transforms.Resize(preset.input_px))
    transform = transforms.Compose(tf)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = load_average()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for item, coords in zip(work.slides, work.coords, strict=True):
            osr = openslide.OpenSlide(str(item.path))
            mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
            level = osr.get_best_level_for_downsample(g.mpp / mpp + 1e-6)
            side = round(g.patch_px * g.mpp / mpp / osr.level_downsamples[level])
            h5 = out_dir / f"{item.slide_id}.h5"
            for i, lo in enumerate(range(0, len(coords), batch)):
                chunk = coords[lo:lo + batch]
                images = []
                for x, y in chunk:
                    img = osr.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
                    if side != g.patch_px:
                        img = img.resize((g.patch_px, g.patch_px), Image.Resampling.BILINEAR)
                    images.append(transform(img))
                with torch.no_grad():
                    feats = plain(torch.stack(images).to(device))[0].cpu().numpy().astype(np.float32)
                _append_h5(h5, {"features": feats, "coords": chunk.astype(np.int64)}, "w" if i == 0 else "a")
            osr.close()
        sync(device)
        seconds = time.perf_counter() - start
    n = work.n_patches
    return {"patches": n, "seconds": seconds, "patches_per_s": n / seconds, "load": load, **gpu.summary()}


def h5_features(out_dir: Path, work: Workload) -> np.ndarray:
    feats = []
    for item in work.slides:
        with h5py.File(out_dir / f"{item.slide_id}.h5", "r") as f:
            feats.append(f["features"][:])
    return np.concatenate(feats)


# -- (c) the plain encoder alone


def run_plain(batches: list[torch.Tensor], plain: PatchEncoder, device: torch.device,
              keep: bool = False) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """fp32 NCHW forward of pre-read, pre-normalised batches; optionally return (patch, cell) outputs."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    load = load_average()
    with GpuSampler() as gpu, torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for x in batches:
            out = plain(x)
            if keep:
                outputs.append(out)
        sync(device)
        seconds = time.perf_counter() - start
    n = sum(len(x) for x in batches)
    result = {"patches": n, "seconds": seconds, "patches_per_s": n / seconds, "load": load, **gpu.summary()}
    if not keep:
        return result, None
    return result, (torch.cat([p for p, _ in outputs]).float().cpu().numpy(),
                    torch.cat([c for _, c in outputs]).float().cpu().numpy())


# -- (d) LazySlide


class _PatchOnly(torch.nn.Module):
    """The plain encoder returning only the patch embedding (what LazySlide expects of a callable model)."""

    def __init__(self, encoder: PatchEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


def lazyslide_available() -> bool:
    try:
        import lazyslide  # noqa: F401
        import lazyslide_models  # noqa: F401
        import wsidata  # noqa: F401
    except ImportError:
        return False
    return True


def run_lazyslide(work: Workload, plain: PatchEncoder, batch: int, workers: int, out_dir: Path,
                  device: torch.device) -> dict[str, Any]:
    """LazySlide's documented flow per slide, with the same plain encoder and ImageNet normalisation."""
    import lazyslide as zs
    from lazyslide_models._utils import get_default_transform
    from wsidata import open_wsi

    preset, g = work.preset, work.preset.geometry
    px = preset.input_px
    transform = get_default_transform((px, px), interpolation="bilinear", crop_pct=1.0, mean=preset.mean,
                                      std=preset.std)
    model = _PatchOnly(plain)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    extract_s = 0.0
    load = load_average()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for item in work.slides:
            wsi = open_wsi(item.path, store=str(out_dir / f"{item.slide_id}.zarr"))
            zs.pp.find_tissues(wsi)
            zs.pp.tile_tissues(wsi, g.patch_px, mpp=g.mpp)
            t0 = time.perf_counter()
            feats = zs.tl.feature_extraction(wsi, model, model_name="encoder", transform=transform,
                                             device=str(device), batch_size=batch, num_workers=workers,
                                             pbar=False, return_features=True)
            extract_s += time.perf_counter() - t0
            n += len(feats)
            wsi.write()
        seconds = time.perf_counter() - start
    return {"patches": n, "seconds": seconds, "patches_per_s": n / seconds, "extract_only_patches_per_s":
            n / extract_s, "bytes_per_patch": du(out_dir) / n, "load": load, **gpu.summary()}


# -- consistency


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max abs difference, that relative to the reference's max magnitude, and the lowest row cosine."""
    a, r = ours.reshape(len(ours), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    diff = np.abs(a - r)
    cos = (a * r).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return {"max_abs_diff": float(diff.max()), "ref_max_abs": float(np.abs(r).max()),
            "max_rel_diff": float(diff.max() / max(np.abs(r).max(), 1e-12)),
            "rel_l2": float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-12)),
            "min_cosine": float(cos.min())}


# -- the benchmark


def interleave(a_keys: list[str], others: list[str], shift: int) -> list[str]:
    """Alternate our settings with the other methods, rotated by `shift` so no method always runs first."""
    order: list[str] = []
    for i in range(max(len(a_keys), len(others))):
        order += a_keys[i:i + 1] + others[i:i + 1]
    shift %= len(order)
    return order[shift:] + order[:shift]


def settings_for(preset: Preset, args: argparse.Namespace) -> list[Setting]:
    """One factor at a time from the first batch size and worker count; batch sizes giving the same whole
    bags per batch are measured once."""
    b0, w0 = args.batch_sizes[0], args.workers[0]
    seen: set[tuple[int, int]] = set()
    out = []
    for b, w in [(b0, w) for w in args.workers] + [(b, w0) for b in args.batch_sizes[1:]]:
        effective = max(1, b // preset.geometry.n_patches) * preset.geometry.n_patches
        if (effective, w) not in seen:
            seen.add((effective, w))
            out.append(Setting(b, w))
    if args.compile:
        out.append(Setting(b0, w0, compile=True))
    return out


def bench_encoder(preset: Preset, slides: list[SlideInput], args: argparse.Namespace, tmp: Path,
                  device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    work = plan_workload(preset, slides, args.max_patches[preset.name])
    batch = args.batch_sizes[0]
    log(f"[{preset.name}] {len(work.slides)} slides, {work.n_patches} patches; reading them for (c)")
    patches = read_patches(work)
    batches = normalised_batches(patches, preset, batch, device)
    plain = create_encoder(preset).eval().to(device)
    plain_cl = create_encoder(preset).eval().to(device, memory_format=torch.channels_last)
    batches_cl = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    settings = settings_for(preset, args)
    encoders = {s.name: create_encoder(preset) for s in settings}  # the Extractor makes these channels_last
    a_keys = [f"a:{s.name}" for s in settings]
    others = ["b", "c", "c_cl"] + ([f"d:w{w}" for w in args.lazyslide_workers] if args.lazyslide else [])
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in a_keys + others}
    kept: dict[str, Path] = {}
    outputs = None
    for rnd in range(args.rounds):
        for key in interleave(a_keys, others, rnd):
            where = tmp / f"{preset.name}-{key.replace(':', '-')}-{rnd}"
            if key.startswith("a:"):
                setting = next(s for s in settings if f"a:{s.name}" == key)
                result = run_pipeline(work, encoders[setting.name], setting, where, device)
                result["cold"] = setting.compile and rnd == 0
            elif key == "b":
                result = run_naive(work, plain, batch, where, device)
            elif key == "c_cl":
                result, _ = run_plain(batches_cl, plain_cl, device)
            elif key == "c":
                result, out = run_plain(batches, plain, device, keep=outputs is None)
                outputs = outputs or out
            else:
                result = run_lazyslide(work, plain, batch, int(key[3:]), where, device)
            runs[key].append(result)
            log(f"[{preset.name}] round {rnd} {key}: {result['patches']} patches, {result['seconds']:.1f} s, "
                f"{result['patches_per_s']:.2f} patches/s (load {result['load']})")
            if key not in kept:
                kept[key] = where
            elif where.exists():
                shutil.rmtree(where)
    return summarise(work, settings, runs, kept, outputs, args)


def round_rates(runs: dict[str, list[dict[str, Any]]], best_key: str, compiled_keys: list[str],
                d_keys: list[str]) -> list[dict[str, float]]:
    """Per round: patches/s of the best eager (a), warm compiled (a), (b), (c), c_cl and the best (d).

    Ratios are taken within a round, then the median over rounds: the load drifts less within a round.
    """
    out = []
    for rnd in range(len(runs["c"])):
        rates = {"a": runs[best_key][rnd]["patches_per_s"], "b": runs["b"][rnd]["patches_per_s"],
                 "c": runs["c"][rnd]["patches_per_s"], "c_cl": runs["c_cl"][rnd]["patches_per_s"]}
        warm = [runs[k][rnd] for k in compiled_keys if not runs[k][rnd].get("cold")]
        if warm:
            rates["a_compiled"] = warm[0]["patches_per_s"]
        elif compiled_keys and len(runs[compiled_keys[0]]) == 1:  # one round: the cold run's steady rate
            steady = runs[compiled_keys[0]][0]["steady_patches_per_s"]
            if not np.isnan(steady):
                rates["a_compiled"] = steady
        if d_keys:
            rates["d"] = max(runs[k][rnd]["patches_per_s"] for k in d_keys)
        out.append(rates)
    return out


def summarise(work: Workload, settings: list[Setting], runs: dict[str, list[dict[str, Any]]],
              kept: dict[str, Path], outputs: tuple[np.ndarray, np.ndarray] | None,
              args: argparse.Namespace) -> dict[str, Any]:
    """Medians per method, compile cost, ratios vs targets, numerical agreement and bytes per patch."""
    warm = {k: [r for r in v if not r.get("cold")] or v for k, v in runs.items() if v}  # compile: warm runs
    med = {k: {m: median([r[m] for r in v if m in r]) for m, x in v[0].items()
               if isinstance(x, (int, float)) and not isinstance(x, bool)} for k, v in warm.items()}
    eager = [f"a:{s.name}" for s in settings if not s.compile]
    best_key = max(eager, key=lambda k: med[k]["patches_per_s"])
    result: dict[str, Any] = {
        "slides": [s.slide_id for s in work.slides], "patches": work.n_patches,
        "runs": runs, "medians": med, "best_eager_setting": best_key[2:],
    }
    compiled = [s for s in settings if s.compile]
    headline = {"a": med[best_key]["patches_per_s"]}
    if compiled:
        key = f"a:{compiled[0].name}"
        cold, warm = runs[key][0], runs[key][1:]
        eager_same = med[f"a:{Setting(compiled[0].batch_size, compiled[0].workers).name}"]
        result["compile"] = {
            "cold_seconds": cold["seconds"],
            "compile_seconds": cold["first_batch_s"] - eager_same["first_batch_s"],
            "warm_patches_per_s": median([r["patches_per_s"] for r in warm]) if warm else float("nan"),
            "steady_patches_per_s": median([r["steady_patches_per_s"] for r in runs[key]]),
        }
        headline["a_compiled"] = (result["compile"]["warm_patches_per_s"] if warm
                                  else result["compile"]["steady_patches_per_s"])
    headline["b"] = med["b"]["patches_per_s"]
    headline["c"] = med["c"]["patches_per_s"]
    d_keys = [k for k in med if k.startswith("d:")]
    if d_keys:
        best_d = max(d_keys, key=lambda k: med[k]["patches_per_s"])
        headline["d"] = med[best_d]["patches_per_s"]
        result["best_lazyslide_setting"] = best_d[2:]
    per_round = round_rates(runs, best_key, [f"a:{s.name}" for s in compiled], d_keys)
    ratios = {}
    for variant in ("a", "a_compiled"):
        for ref in ("c", "b", "d"):
            pairs = [r[variant] / r[ref] for r in per_round if variant in r and ref in r]
            if pairs:
                ratios[f"{variant}_over_{ref}"] = median(pairs)
    result["encoder_share"] = {  # how (a) relates to the bare encoder in the same memory format
        "channels_last_over_nchw": median([r["c_cl"] / r["c"] for r in per_round]),
        "a_over_channels_last_encoder": median([r["a"] / r["c_cl"] for r in per_round]),
    }
    result["headline_patches_per_s"] = headline
    result["rates_per_round"] = per_round
    result["ratios"] = ratios
    result["targets_met"] = {k: ratios[k] >= t for k, t in TARGETS.items() if k in ratios}

    patch_ref, cell_ref = outputs if outputs is not None else (None, None)
    consistency = {}
    for key in (best_key, *(f"a:{s.name}" for s in compiled)):
        if patch_ref is not None:
            ours_patch, ours_cells = store_features(kept[key], work)
            consistency[key[2:]] = {"patch": agreement(ours_patch, patch_ref),
                                    "cells": agreement(ours_cells, cell_ref)}
    if patch_ref is not None:
        consistency["naive_vs_plain"] = {"patch": agreement(h5_features(kept["b"], work), patch_ref)}
    result["consistency"] = consistency
    store = FeatureStore.open(kept[best_key])
    result["slide_timings"] = {i: store.provenance(i)["timings"] for i in store.slide_ids()}
    dim = work.preset.embed_dim
    result["bytes_per_patch"] = {
        **store_bytes(kept[best_key], work.n_patches),
        "naive_h5_bytes_per_patch": du(kept["b"]) / work.n_patches,
        "raw_fp16_patch": 2 * dim, "raw_fp16_cells": 2 * dim * work.preset.geometry.n_cells,
        "raw_fp32_patch_plus_coords": 4 * dim + 16,
    }
    if d_keys:
        result["bytes_per_patch"]["lazyslide_bytes_per_patch"] = median([r["bytes_per_patch"] for r in runs[
            d_keys[0]]])
    return result


# -- report


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    hw, st = report["hardware"], report["settings"]
    lines = [
        "# Extraction benchmark",
        "",
        f"{report['date']}. {hw['cpu']}, {hw['cores']} usable cores, {hw['memory_gib']} GiB; "
        f"Python {hw['python']}, "
        f"torch {hw['torch']} ({hw['torch_threads']} threads), device {st['device']}"
        + (f" ({hw.get('gpu')})" if st["device"] == "cuda" else "") + f"; niceness {hw['niceness']}.",
        f"Whole run: {report['wall_seconds'] / 60:.1f} min wall, {report['cpu_seconds'] / 60:.1f} min CPU. "
        f"1-minute load average {report['load_start']} at the start and {report['load_end']} at the end (on 2 "
        "cores, 2 is this run alone); measurements were interleaved (order rotated every round), so the ratios "
        "are fairer than the absolute rates.",
        f"Slides: generated H&E-like pyramidal JPEG TIFFs at {st['slide_mpp']} mpp (make_cohort seed "
        f"{st['seed']}); {st['rounds']} rounds, medians. Command: `{report['command']}`.",
        "",
        "Methods: (a) our pipeline (LocalExecutor into a new feature store, patch + cell embeddings, float16; "
        "channels_last; end-to-end including tissue detection, planning and the store commit); (b) naive "
        "CLAM-style loop (per-patch read_region, PIL->tensor, fp32 NCHW, HDF5 append); (c) the plain fp32 "
        "NCHW encoder on pre-read, pre-normalised tensors; (d) LazySlide (find_tissues, tile_tissues, "
        "feature_extraction with the same plain encoder, wsi.write()); c_cl: (c) in channels_last. Steady = "
        "patches/s between the first and last batch (excludes start-up and, for compile, the compile).",
    ]
    for name, res in report["encoders"].items():
        lines += ["", f"## {name}", "", f"{len(res['slides'])} slides of {res['slide_size']} px, "
                  f"{res['patches']} patches per run (LazySlide tiles tissue itself: its own count).", ""]
        rows = []
        for key, med in res["medians"].items():
            warm_only = key.endswith("-compile") and len(res["runs"][key]) > 1
            extra = "warm runs (compiled before)" if warm_only else ""
            if key.startswith("d:"):
                extra = f"extract-only {_fmt(med['extract_only_patches_per_s'])}"
            gpu = f"{_fmt(med['gpu_util_mean'], 0)}%" if "gpu_util_mean" in med else "-"
            n_runs = sum(not r.get("cold") for r in res["runs"][key]) or len(res["runs"][key])
            rows.append([key, int(med["patches"]), n_runs, _fmt(med["seconds"], 1),
                         _fmt(med["patches_per_s"]), _fmt(med.get("steady_patches_per_s", float("nan"))),
                         _fmt(med.get("first_batch_s", float("nan")), 1), gpu, _fmt(med["load"], 1), extra])
        lines.append(markdown_table(TABLES["runs"], rows, [False] + [True] * 8 + [False]))
        head, ratios = res["headline_patches_per_s"], res["ratios"]
        lines += ["", f"Best eager setting of (a): {res['best_eager_setting']}."]
        if "compile" in res:
            c = res["compile"]
            lines.append(f"compile=True: first run {_fmt(c['cold_seconds'], 1)} s end-to-end, of which about "
                         f"{_fmt(c['compile_seconds'], 1)} s compiling; afterwards "
                         f"{_fmt(c['warm_patches_per_s'])} patches/s end-to-end "
                         f"(steady {_fmt(c['steady_patches_per_s'])}).")
        lines += ["", "Ratios: within each round, then the median over rounds (a = the best eager setting, "
                  "a_compiled = the warm compiled run, d = the best LazySlide setting):", "", markdown_table(
            TABLES["ratios"],
            [[k.replace("_over_", " / "), _fmt(v, 3), TARGETS[k.replace("a_compiled", "a")],
              "yes" if v >= TARGETS[k.replace("a_compiled", "a")] else "no"] for k, v in ratios.items()],
            [False, True, True, False]),
            "", "Medians of patches/s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in head.items())
            + "; per round: " + "; ".join(", ".join(f"{k} {_fmt(v)}" for k, v in r.items())
                                         for r in res["rates_per_round"]) + ".",
            f"Within rounds, bare encoder channels_last / NCHW: "
            f"{_fmt(res['encoder_share']['channels_last_over_nchw'])}; "
            f"(a) / bare channels_last encoder: {_fmt(res['encoder_share']['a_over_channels_last_encoder'])} "
            "(1.0 = the pipeline costs nothing beyond the encoder)."]
        if res["consistency"]:
            lines += ["", "Agreement with the plain fp32 model on the same pixels (the store holds float16):",
                      ""]
            crow = []
            for key, parts in res["consistency"].items():
                for part, a in parts.items():
                    crow.append([key, part, f"{a['max_abs_diff']:.2e}", f"{a['ref_max_abs']:.2f}",
                                 f"{a['max_rel_diff']:.1e}", f"{a['rel_l2']:.1e}", f"{a['min_cosine']:.6f}"])
            lines.append(markdown_table(["run", "output", "max abs diff", "max abs ref", "max diff / max ref",
                                         "rel L2", "min cosine"], crow, [False, False] + [True] * 5))
        b = res["bytes_per_patch"]
        lines += ["", "Bytes per patch on disk: " + ", ".join(f"{k} {v:,.0f}" for k, v in b.items()) + "."]
    return "\n".join(lines) + "\n"


def per_encoder(values: list[str], names: list[str]) -> dict[str, int]:
    """'N' applies to every encoder, 'NAME=N' to one; later values win."""
    out: dict[str, int] = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        for target in ([name] if sep else names):
            out[target] = int(number)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["mran", "resnet50-trunc"], help="preset names")
    parser.add_argument("--slides", type=int, default=2, help="generated slides")
    parser.add_argument("--size", nargs="+", default=["4096", "resnet50-trunc=2048"],
                        help="slide side in px at --slide-mpp: N for all encoders or NAME=N")
    parser.add_argument("--slide-mpp", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohort", type=Path, help="reuse generated slides in this folder (made if missing)")
    parser.add_argument("--max-patches", nargs="+", default=["512"],
                        help="patches per measurement, whole slides, at least one: N for all or NAME=N")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians when > 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 32],
                        help="batch sizes of (a); the first is also that of (b), (c) and (d)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="DataLoader workers of (a)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure compile=True (first batch size and worker count)")
    parser.add_argument("--lazyslide", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lazyslide-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.size = per_encoder(args.size, args.encoders)
    args.max_patches = per_encoder(args.max_patches, args.encoders)
    for name in args.encoders:
        if name not in PRESETS:
            parser.error(f"unknown preset {name}; choose from {', '.join(PRESETS)}")
        if name not in args.size or name not in args.max_patches:
            parser.error(f"give --size and --max-patches for {name} (N for all encoders or {name}=N)")
    return args


def cohort(folder: Path, size: int, args: argparse.Namespace) -> list[SlideInput]:
    """The first `args.slides` slides of `folder`, generated there first when it holds no cohort."""
    if not (folder / "labels.csv").is_file():
        start = time.perf_counter()
        make_cohort(folder, n_slides=args.slides, seed=args.seed, size=(size, size), mpp=args.slide_mpp)
        print(f"generated {args.slides} slides of {size} px in {time.perf_counter() - start:.1f} s")
    return collect_slides([folder])[: args.slides]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (DataLoader workers included)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/extract.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.lazyslide and not lazyslide_available():
        print("LazySlide is not installed (pip install lazyslide): skipping (d).")
        args.lazyslide = False
    started = time.perf_counter()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mrantool-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # a cold compile, as a first real run
        encoders = {}
        for name in args.encoders:
            slides = cohort(args.cohort or tmp / f"cohort-{args.size[name]}", args.size[name], args)
            encoders[name] = bench_encoder(get_preset(name), slides, args, tmp, device,
                                           lambda msg: print(msg, flush=True))
            encoders[name]["slide_size"] = args.size[name]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": command,
        "hardware": hardware(),
        "load_start": load_start,
        "load_end": load_average(),
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "encoders": encoders,
    }
    text = markdown(report)
    write_results(args.out, "extract", report, text)
    print(text)


if __name__ == "__main__":
    main()
