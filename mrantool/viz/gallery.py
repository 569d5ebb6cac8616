"""Read a few regions of a slide at a physical resolution and lay images out as a captioned gallery PNG.

Used by heatmaps (the most attended patches) and retrieval (a query beside its neighbours). Memory is bounded by
the number of images: only the requested regions are read, never a whole level.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrantool.errors import MrantoolError
from mrantool.slides.reader import open_slide

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
FONT_PX = 12
MARGIN = 6


def read_patches(slide_path: str | Path, coords_l0: Iterable[Sequence[float]], size_px: int, mpp: float,
                 slide_mpp: float | None = None) -> list[np.ndarray]:
    """RGB uint8 (size_px, size_px, 3) squares whose top-left corners are `coords_l0` (level-0 x, y), read at `mpp`.

    `slide_mpp` overrides the slide's level-0 resolution (as `--mpp` does for extraction). One handle is opened
    for all reads; each read comes from the best pyramid level for `mpp`.
    """
    if size_px < 1 or not mpp > 0:
        raise MrantoolError(f"Reading patches of {slide_path} needs size_px >= 1 and mpp > 0, got {size_px} and "
                            f"{mpp}; pass a positive size and resolution.")
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        return [slide.read_region_mpp(round(float(x)), round(float(y)), size_px, mpp) for x, y in coords_l0]


def patch_gallery(images: Sequence[np.ndarray], captions: Sequence[str], out_png: str | Path, *, cols: int = 5,
                  tile_px: int | None = None, title: str | None = None) -> Path:
    """Write a grid of `images` (RGB uint8), each resized to `tile_px` (default: the largest, at least 128 px) with
    its caption (lines split on newlines) below; an optional `title` on top. Returns `out_png`.
    """
    out_png = Path(out_png)
    if not images:
        raise MrantoolError(f"No images to put in gallery {out_png}; pass at least one image.")
    if len(captions) != len(images):
        raise MrantoolError(f"Gallery {out_png} got {len(images)} images but {len(captions)} captions; pass one "
                            "caption per image.")
    if cols < 1:
        raise MrantoolError(f"Gallery {out_png} needs cols >= 1, got {cols}.")
    tile = tile_px or max(128, *(max(im.shape[:2]) for im in images))
    font = ImageFont.load_default(size=FONT_PX)
    line_px = FONT_PX + 3
    caption_px = line_px * max(len(c.splitlines()) or 1 for c in captions) + MARGIN
    title_px = line_px * len(title.splitlines()) + MARGIN if title else 0
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    cell_w, cell_h = tile + MARGIN, tile + caption_px
    canvas = Image.new("RGB", (MARGIN + cols * cell_w, MARGIN + title_px + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.multiline_text((MARGIN, MARGIN), title, fill=TEXT, font=font, spacing=3)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        x, y = MARGIN + c * cell_w, MARGIN + title_px + r * cell_h
        canvas.paste(_fit(image, tile), (x, y))
        draw.multiline_text((x, y + tile + 2), caption, fill=TEXT, font=font, spacing=3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def _fit(image: np.ndarray, tile: int) -> Image.Image:
    """`image` as a PIL image resized to `tile` x `tile` (nearest when enlarging by a whole factor, else bilinear)."""
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    if pil.size == (tile, tile):
        return pil
    whole = tile % pil.width == 0 and tile % pil.height == 0
    return pil.resize((tile, tile), Image.Resampling.NEAREST if whole else Image.Resampling.BILINEAR)
