"""Attention heatmaps of a fit run over a slide's thumbnail at bag, patch or cell level, and the top-K gallery.

Inputs: the run folder (config.json: head name and store identity; attention/<slide_id>.npz; predictions.csv),
the feature store (bag coordinates, patch tissue, per-slide provenance: source, slide_mpp, bag_size_l0) and the
slide file. Only the thumbnail and the K gallery regions are read from the slide, never level 0 whole.
See docs/heatmaps.md for what each level shows.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage

from mrantool.errors import MrantoolError, SlideError, StoreError
from mrantool.files import output_file
from mrantool.slide_ids import validate_slide_id
from mrantool.slides.reader import open_slide
from mrantool.slides.tissue import tissue_mask
from mrantool.store import FeatureStore
from mrantool.store.schema import identity_differences
from mrantool.viz.gallery import patch_gallery, read_patches

LEVELS = ("bag", "patch", "cell")
PLURAL = {"bag": "bags", "patch": "patches", "cell": "cells"}
TISSUE_OUTLINE = (0, 200, 80)
CELL_OUTLINE = (0, 230, 255)
MAX_BAG_TILE_PX = 512  # bags in a gallery are read at most this large (at a coarser mpp when bags are bigger)
DEFAULT_PATCH_MIN_TISSUE = 0.25
PNG_COMPRESS_LEVEL = 3  # measured: ~2x faster than the default 6 on heatmaps, files ~10% larger
OUTLINE_MASK_PX = 1024  # the tissue outline is detected on a thumbnail at most this large
LOOKUP = "pass a slide id that `mrantool info` lists for the store"


class TopItem(NamedTuple):
    """A ranked item: its bag, patch (-1 at bag level), level-0 top-left of the item itself, and its weight."""

    bag: int
    patch: int
    x: int
    y: int
    score: float


@dataclass(frozen=True)
class HeatmapResult:
    """What `draw_heatmap` wrote and drew.

    `heatmap` (h, w) float32 is the thumbnail-sized map in [0, 1] (weight / largest weight), NaN where no attention
    is defined; `overlay` (h, w, 3) uint8 is the blended thumbnail inside the figure; `value_range` the smallest
    and largest composed weight (share of the slide's attention) over defined items.
    """

    out: Path
    gallery: Path | None
    seconds: float
    value_range: tuple[float, float]
    top: list[TopItem]
    level: str
    head: str
    heatmap: np.ndarray
    overlay: np.ndarray
    downsample: float


# --- run folder ---

def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run folder (finished or not: attention is written fold by fold)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise MrantoolError(f"{run_dir} is not a fit run (no config.json); pass the --out folder of `mrantool fit` "
                            "as --run.")
    return json.loads(path.read_text())


def load_attention(run_dir: str | Path, slide_id: str) -> dict[str, np.ndarray]:
    """The arrays of attention/<slide_id>.npz; an error naming the slides that do have attention otherwise."""
    folder = Path(run_dir) / "attention"
    path = folder / f"{validate_slide_id(slide_id, LOOKUP)}.npz"  # never a path outside the run ("../../x")
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        if not have:
            raise MrantoolError(f"Run {run_dir} saved no attention (fit with save_attention = false, or no fold has "
                                "finished); re-run `mrantool fit` with save_attention = true.")
        listed = ", ".join(have[:5]) + (f" and {len(have) - 5} more" if len(have) > 5 else "")
        raise MrantoolError(f"Run {run_dir} has no attention for slide '{slide_id}' (only test slides of repeat 0 "
                            f"get one); slides with attention: {listed}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in npz.files if key in LEVELS}
    except (OSError, ValueError) as exc:
        raise MrantoolError(f"Attention file {path} cannot be read ({exc}); re-run `mrantool fit`.") from None
    if "patch" not in arrays and "bag" not in arrays:
        raise MrantoolError(f"Attention file {path} holds neither 'bag' nor 'patch' weights; re-run `mrantool fit`.")
    return arrays


def _prediction_text(run_dir: Path, slide_id: str) -> str | None:
    """'predicted X (p = 0.87), label Y' from the run's out-of-fold predictions.csv (repeat 0), if present."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("slide_id") == slide_id]
    if not rows:
        return None
    row = next((r for r in rows if r.get("repeat") in ("0", None)), rows[0])
    predicted = row.get("predicted")
    prob = row.get(f"prob_{predicted}")
    if predicted is None or prob is None:
        return None
    label = f", label {row['label']}" if row.get("label") else ""
    return f"predicted {predicted} (p = {float(prob):.3f}){label}"


# --- composition ---

def _within_groups(weights: np.ndarray) -> bool:
    """Whether every group (last axis) with any weight sums to 1: weights normalised within their parent item."""
    sums = weights.sum(-1)
    used = sums > 1e-12
    return bool(used.any()) and bool(np.allclose(sums[used], 1.0, atol=1e-3))


def _normalise(weights: np.ndarray) -> np.ndarray:
    total = weights.sum()
    return weights / total if total > 0 else weights


def compose(attention: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each level's weights as shares of the slide decision (each level sums to 1 over the slide).

    A run's files already hold composed weights (bag = alpha_b, patch = alpha_b * alpha, cell = patch * beta for
    MRAN). Weights normalised inside their parent instead (patches summing to 1 in each bag, cells summing to 1 in
    each patch, as MRAN's alpha and beta are) are multiplied by the parent level's composed weight first.
    """
    out: dict[str, np.ndarray] = {}
    bag = attention.get("bag")
    patch = attention.get("patch")
    if patch is not None:
        if bag is not None and _within_groups(patch):
            patch = patch * bag[:, None]
        out["patch"] = _normalise(patch)
    out["bag"] = _normalise(bag) if bag is not None else out["patch"].sum(-1)
    cell = attention.get("cell")
    if cell is not None and patch is not None:
        if _within_groups(cell):
            cell = cell * out["patch"][..., None]
        out["cell"] = _normalise(cell)
    return out


def level_tiles(weights: np.ndarray, level: str, grid: int, cells: int) -> np.ndarray:
    """Per-bag square tiles (n_bags, k, k) of a level's values in spatial order: k = 1, grid, or grid * cells."""
    n = weights.shape[0]
    if level == "bag":
        return weights.reshape(n, 1, 1)
    if level == "patch":
        return weights.reshape(n, grid, grid)
    # cell index p = row * grid + col, c = crow * cells + ccol -> pixel row = row * cells + crow.
    return weights.reshape(n, grid, grid, cells, cells).transpose(0, 1, 3, 2, 4).reshape(n, grid * cells, grid * cells)


def paint(tiles: np.ndarray, coords: np.ndarray, bag_l0: float, shape: tuple[int, int],
          downsample: tuple[float, float]) -> np.ndarray:
    """A (h, w) float32 map (NaN outside every bag) where each thumbnail pixel takes the tile value under its centre.

    `tiles` (n_bags, k, k) cover the squares of side `bag_l0` at level-0 top-left `coords`; `downsample` is
    level-0 pixels per thumbnail pixel along (x, y). NaN tile values leave the pixel as it was.
    """
    h, w = shape
    dsx, dsy = downsample
    k = tiles.shape[1]
    step = bag_l0 / k
    heat = np.full(shape, np.nan, np.float32)
    for (x0, y0), tile in zip(coords.astype(np.float64), tiles, strict=True):
        u0, u1 = max(0, math.floor(x0 / dsx)), min(w, math.ceil((x0 + bag_l0) / dsx))
        v0, v1 = max(0, math.floor(y0 / dsy)), min(h, math.ceil((y0 + bag_l0) / dsy))
        if u0 >= u1 or v0 >= v1:
            continue
        cols = np.floor(((np.arange(u0, u1) + 0.5) * dsx - x0) / step).astype(np.int64)
        rows = np.floor(((np.arange(v0, v1) + 0.5) * dsy - y0) / step).astype(np.int64)
        ci, ri = np.nonzero((cols >= 0) & (cols < k))[0], np.nonzero((rows >= 0) & (rows < k))[0]
        if not len(ci) or not len(ri):
            continue
        values = tile[np.ix_(rows[ri], cols[ci])]
        block = np.ix_(v0 + ri, u0 + ci)
        heat[block] = np.where(np.isnan(values), heat[block], values)
    return heat


# --- drawing ---

def defined_items(level: str, weights: np.ndarray, tissue: np.ndarray, min_tissue: float) -> np.ndarray:
    """Items the head could attend to: every bag; patches with enough tissue (or any weight); their cells."""
    if level == "bag":
        return np.ones(weights.shape, bool)
    patch_ok = tissue >= min_tissue
    if level == "patch":
        return patch_ok | (weights > 0)
    return patch_ok[..., None] | (weights > 0)


def _top_items(weights: np.ndarray, defined: np.ndarray, level: str, coords: np.ndarray, bag_l0: float,
               grid: int, cells: int, k: int) -> list[tuple[TopItem, int]]:
    """The `k` largest defined weights as (TopItem, cell index or -1), ties broken by position."""
    flat = np.where(defined, weights, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[:min(k, int(defined.sum()))]
    items = []
    for index in order:
        where = np.unravel_index(index, weights.shape)
        bag = int(where[0])
        patch = int(where[1]) if level != "bag" else -1
        cell = int(where[2]) if level == "cell" else -1
        x, y = coords[bag].astype(np.float64)
        if patch >= 0:
            row, col = divmod(patch, grid)
            x, y = x + col * bag_l0 / grid, y + row * bag_l0 / grid
        if cell >= 0:
            row, col = divmod(cell, cells)
            x, y = x + col * bag_l0 / grid / cells, y + row * bag_l0 / grid / cells
        items.append((TopItem(bag, patch, round(x), round(y), float(flat[index])), cell))
    return items


def _blend(thumb: np.ndarray, heat: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """The thumbnail with the colour-mapped heat blended in where it is defined."""
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.float32)
    overlay = thumb.copy()
    defined = ~np.isnan(heat)
    colours = lut[np.round(heat[defined] * 255).astype(np.int64)]
    overlay[defined] = (thumb[defined] * (1 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)
    return overlay


def _tissue_outline(thumb: np.ndarray) -> np.ndarray:
    """Outline (2 px) of the tissue mask, computed at most OUTLINE_MASK_PX wide for speed and scaled up."""
    h, w = thumb.shape[:2]
    scale = min(1.0, OUTLINE_MASK_PX / max(h, w))
    small = thumb if scale == 1.0 else np.asarray(
        Image.fromarray(thumb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX))
    mask = tissue_mask(small)
    if scale < 1.0:
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    return mask ^ ndimage.binary_erosion(mask, iterations=2)


def _figure(overlay: np.ndarray, vmax: float, cmap: str, title: str, out: Path) -> None:
    """The overlay at one pixel per thumbnail pixel, a colour bar of the weights and a wrapped title.

    Matplotlib (Agg) draws the colour bar and title on an empty canvas; the overlay is pasted into its pixels
    (no resampling), which is several times faster than letting matplotlib draw a large image.
    """
    h, w = overlay.shape[:2]
    dpi, pad, bar_px, line_px = 100, 10, 120, 18
    lines = [part for line in title.splitlines() for part in textwrap.wrap(line, max(30, (w + bar_px) // 7))]
    top = pad + line_px * len(lines)
    fig_w, fig_h = w + bar_px + 2 * pad, h + top + pad
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    cax = fig.add_axes(((pad + w + 12) / fig_w, pad / fig_h, 16 / fig_w, h / fig_h))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, vmax if vmax > 0 else 1.0), colormaps[cmap]), cax=cax)
    bar.set_label("share of the slide's attention")
    fig.text(pad / fig_w, 1 - (pad / 2) / fig_h, "\n".join(lines), va="top", ha="left", fontsize=10)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    pixels[top:top + h, pad:pad + w] = overlay
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out, compress_level=PNG_COMPRESS_LEVEL)


def _slide_file(provenance: dict[str, Any], slide_path: str | Path | None, slide_id: str) -> Path:
    if slide_path is not None:
        path = Path(slide_path)
        if not path.is_file():
            raise SlideError(f"Slide file {path} given as --slide-path does not exist; pass the slide '{slide_id}' "
                             "was extracted from.")
        return path
    source = provenance.get("source")
    if not source:
        raise SlideError(f"The store records no slide file for '{slide_id}' (imported features); pass the slide "
                         "with --slide-path.")
    if not Path(source).is_file():
        raise SlideError(f"Slide file {source} recorded for '{slide_id}' in the store does not exist (moved?); "
                         "pass its current location with --slide-path.")
    return Path(source)


def _read_thumbnail(slide_file: Path, provenance: dict[str, Any], slide_id: str,
                    max_px: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """(thumbnail, level-0 mpp used at extraction, level-0 size) of the slide the features came from."""
    with open_slide(slide_file, mpp=provenance.get("slide_mpp")) as slide:
        recorded = provenance.get("level0_size")
        if recorded and list(slide.dimensions) != list(recorded):
            raise SlideError(f"Slide file {slide_file} is {slide.dimensions[0]}x{slide.dimensions[1]} px but "
                             f"'{slide_id}' was extracted from a {recorded[0]}x{recorded[1]} px file; pass the "
                             "original slide with --slide-path.")
        thumb, _ = slide.thumbnail(max_px)
        return thumb, slide.mpp, slide.dimensions


def _gallery(items: list[tuple[TopItem, int]], level: str, slide_file: Path, slide_mpp: float, geometry: dict,
             bag_l0: float, coords: np.ndarray, out_png: Path, title: str) -> Path:
    """Read the top items from the slide at the store's mpp (bags at most MAX_BAG_TILE_PX) and write the gallery."""
    grid, cells, mpp = geometry["grid"], geometry["cells"], float(geometry["mpp"])
    patch_px = geometry["bag_px"] // grid
    if level == "bag":
        size = min(geometry["bag_px"], MAX_BAG_TILE_PX)
        corners = [(it.x, it.y) for it, _ in items]
        images = read_patches(slide_file, corners, size, mpp * geometry["bag_px"] / size, slide_mpp)
    else:
        corners = []
        for it, _ in items:
            row, col = divmod(it.patch, grid)
            x0, y0 = coords[it.bag]
            corners.append((x0 + col * bag_l0 / grid, y0 + row * bag_l0 / grid))
        images = read_patches(slide_file, corners, patch_px, mpp, slide_mpp)
    captions = []
    for rank, ((it, cell), image) in enumerate(zip(items, images, strict=True), start=1):
        extra = ""
        if cell >= 0:
            row, col = divmod(cell, cells)
            side = patch_px / cells
            pil = Image.fromarray(image)
            ImageDraw.Draw(pil).rectangle((col * side, row * side, (col + 1) * side - 1, (row + 1) * side - 1),
                                          outline=CELL_OUTLINE, width=max(1, round(patch_px / 64)))
            images[rank - 1] = np.asarray(pil)
            extra = f" cell {row},{col}"
        captions.append(f"#{rank} {it.score:.3g}{extra}\nx={it.x} y={it.y}")
    return patch_gallery(images, captions, out_png, cols=min(5, len(images)), title=title)


def draw_heatmap(run_dir: str | Path, store_path: str | Path, slide_id: str, out_png: str | Path, *,
                 level: str = "patch", top: int = 0, slide_path: str | Path | None = None, alpha: float = 0.5,
                 max_px: int = 2048, cmap: str = "inferno") -> HeatmapResult:
    """Draw the run's `level` attention for `slide_id` over its thumbnail to `out_png`; with `top` K > 0 also a
    gallery of the K most attended items (`out_png` with suffix _top.png) read at the store's resolution.
    """
    started = time.perf_counter()
    run_dir, out_png = Path(run_dir), Path(out_png)
    if level not in LEVELS:
        raise MrantoolError(f"Unknown attention level {level!r}; use --level bag, patch or cell.")
    if not 0 <= alpha <= 1 or max_px < 16 or top < 0:
        raise MrantoolError(f"Heatmap settings out of range (alpha {alpha}, max_px {max_px}, top {top}); use "
                            "0 <= alpha <= 1, max_px >= 16 and top >= 0.")
    if cmap not in colormaps:
        raise MrantoolError(f"Unknown colour map {cmap!r}; use a matplotlib name such as 'inferno' or 'jet'.")
    run = read_run_config(run_dir)
    head = str(run.get("model", "unknown"))
    composed = compose(load_attention(run_dir, slide_id))
    levels = [name for name in LEVELS if name in composed]
    if level not in levels:
        raise MrantoolError(f"Head '{head}' of run {run_dir} has no {level} attention, only {', '.join(levels)}; "
                            f"use --level {' or --level '.join(levels)}.")
    store = FeatureStore.open(store_path)
    check_identity(run, store, run_dir, Path(store_path))
    features = store.slide(slide_id)
    store.require_whole([slide_id], "the heatmap")
    geometry = store.identity["geometry"]
    grid, cells = geometry["grid"], geometry["cells"]
    weights = composed[level]
    expected = {"bag": (features.n_bags,), "patch": (features.n_bags, grid * grid),
                "cell": (features.n_bags, grid * grid, cells * cells)}[level]
    if weights.shape != expected:
        raise MrantoolError(f"The {level} attention of '{slide_id}' in run {run_dir} has shape {weights.shape} but "
                            f"store {store_path} implies {expected}; pass the store the run was fit on.")
    coords = np.asarray(features.coords[:], np.int64)
    provenance = features.provenance
    min_tissue = float(run.get("config", {}).get("patch_min_tissue", DEFAULT_PATCH_MIN_TISSUE))
    defined = defined_items(level, weights, features.patch_tissue[:].astype(np.float32), min_tissue)
    slide_file = _slide_file(provenance, slide_path, slide_id)
    thumb, slide_mpp, (w0, h0) = _read_thumbnail(slide_file, provenance, slide_id, max_px)
    bag_l0 = float(provenance.get("bag_size_l0") or geometry["bag_px"] * geometry["mpp"] / slide_mpp)
    shape = thumb.shape[:2]
    downsample = (w0 / shape[1], h0 / shape[0])

    vmin = float(weights[defined].min()) if defined.any() else 0.0
    vmax = float(weights[defined].max()) if defined.any() else 0.0
    scaled = np.where(defined, weights / vmax if vmax > 0 else 0.0, np.nan)
    heat = paint(level_tiles(scaled, level, grid, cells), coords, bag_l0, shape, downsample)
    overlay = _blend(thumb, heat, cmap, alpha)
    overlay[_tissue_outline(thumb)] = TISSUE_OUTLINE
    prediction = _prediction_text(run_dir, slide_id)
    title = (f"{slide_id}: {level} attention of head {head}" + (f"; {prediction}" if prediction else "")
             + f"\n{int(defined.sum())} {PLURAL[level]}, colour = share of the slide's attention (max {vmax:.3g}); "
             "green = tissue outline")
    _figure(overlay, vmax, cmap, title, output_file(out_png, "--out"))

    ranked = _top_items(weights, defined, level, coords, bag_l0, grid, cells, top) if top else []
    gallery = None
    if ranked:
        gallery = _gallery(ranked, level, slide_file, slide_mpp, geometry, bag_l0, coords,
                           out_png.with_name(f"{out_png.stem}_top.png"),
                           f"{slide_id}: top {len(ranked)} {PLURAL[level]} by attention (head {head})")
    return HeatmapResult(out=out_png, gallery=gallery, seconds=time.perf_counter() - started,
                         value_range=(vmin, vmax), top=[item for item, _ in ranked], level=level, head=head,
                         heatmap=heat, overlay=overlay, downsample=downsample[0])


def check_identity(run: dict[str, Any], store: FeatureStore, run_dir: Path, store_path: Path) -> None:
    """The store must hold the features the run was fit on (same encoder and geometry)."""
    identity = run.get("store_identity")
    if identity is None:
        raise MrantoolError(f"Run {run_dir} was fit on in-memory features, not a store; heatmaps need a run fit "
                            "with --store.")
    diffs = identity_differences(identity, store.identity)
    if diffs:
        raise StoreError(f"Store {store_path} holds features of another encoder or geometry than run {run_dir} "
                         f"({'; '.join(diffs)}); pass the store the run was fit on.")
