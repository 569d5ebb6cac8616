"""Images laid over the slide in the viewer: attention at one scale (a small RGBA PNG spanning the slide, drawn
pixelated so each bag, patch or cell stays a crisp square) with its legend, and the tissue outline as SVG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage import measure

from mrantool.errors import MrantoolError
from mrantool.slides.reader import Slide
from mrantool.slides.tissue import tissue_mask
from mrantool.viz.heatmap import PLURAL, level_tiles, paint
from mrantool.viz.slide_attention import SlideAttention, percentile_ranks

CMAP = "turbo"
SCALES = ("percentile", "linear")
PIXELS_PER_ITEM = 2  # overlay pixels per item side: enough for any bag alignment, still tiny
MAX_OVERLAY_PX = 8192
TICKS = (0, 25, 50, 75, 100)
OUTLINE_THUMB_PX = 1024
OUTLINE_COLOUR = "#00e060"


@dataclass(frozen=True)
class Overlay:
    """A PNG covering level-0 [0, width_l0] x [0, height_l0], and its legend (JSON-ready)."""

    png: bytes
    width_l0: float
    height_l0: float
    legend: dict[str, Any]


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _share(value: float) -> str:
    """A share of the slide's attention as a short percentage."""
    return f"{100 * value:.2g}%"


def attention_overlay(att: SlideAttention, level: str, scale: str, level0_size: tuple[int, int]) -> Overlay:
    """`level` attention coloured by its percentile among the slide's items (or linearly up to the maximum)."""
    if level not in att.levels:
        raise MrantoolError(f"Head '{att.head}' has no {level} attention, only {', '.join(att.levels)}.")
    if scale not in SCALES:
        raise MrantoolError(f"Unknown colour scale {scale!r}; use {' or '.join(SCALES)}.")
    weights, defined = att.weights[level], att.defined[level]
    shown = weights[defined]
    values = np.full(weights.shape, np.nan)
    if shown.size:
        if scale == "percentile":
            values[defined] = percentile_ranks(shown) / 100.0
            ticks = [{"at": q / 100, "label": _share(float(np.percentile(shown, q)))} for q in TICKS]
            title = f"percentile among the slide's {shown.size} {PLURAL[level]} (labels: share of attention)"
        else:
            top = float(shown.max()) or 1.0
            values[defined] = shown / top
            ticks = [{"at": q / 100, "label": _share(top * q / 100)} for q in TICKS]
            title = f"share of the slide's attention, {shown.size} {PLURAL[level]}"
    else:
        ticks, title = [], f"no {level} attention on tissue"
    w0, h0 = level0_size
    ds = max(att.item_side(level) / PIXELS_PER_ITEM, max(w0, h0) / MAX_OVERLAY_PX)
    shape = (max(1, math.ceil(h0 / ds)), max(1, math.ceil(w0 / ds)))
    heat = paint(level_tiles(values, level, att.grid, att.cells), att.coords, att.bag_l0, shape, (ds, ds))
    lut = (colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    rgba = np.zeros((*shape, 4), np.uint8)
    inside = ~np.isnan(heat)
    rgba[inside, :3] = lut[np.round(heat[inside] * 255).astype(np.int64)]
    rgba[inside, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    legend = {"level": level, "scale": scale, "title": title, "ticks": ticks, "n_items": int(shown.size),
              "colors": [_hex(lut[i]) for i in np.linspace(0, 255, 11).round().astype(int)]}
    return Overlay(buffer.getvalue(), shape[1] * ds, shape[0] * ds, legend)


def tissue_outline_svg(slide: Slide) -> str:
    """The tissue mask's outline as SVG paths in level-0 pixels (strokes stay 2 screen px at any zoom)."""
    thumb, _ = slide.thumbnail(OUTLINE_THUMB_PX)
    mask = tissue_mask(thumb)
    w0, h0 = slide.dimensions
    sx, sy = w0 / mask.shape[1], h0 / mask.shape[0]
    paths = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        if len(contour) < 8:
            continue
        points = measure.approximate_polygon(contour, tolerance=0.8) - 1.0  # undo the padding
        coords = " ".join(f"{c * sx:.0f},{r * sy:.0f}" for r, c in points)
        paths.append(f'<polygon points="{coords}"/>')
    style = f"polygon{{fill:none;stroke:{OUTLINE_COLOUR};stroke-width:2;vector-effect:non-scaling-stroke}}"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w0} {h0}" width="{w0}" height="{h0}" '
            f'preserveAspectRatio="none"><style>{style}</style>{"".join(paths)}</svg>')
