"""Write slides: pixels in RAM -> a tiled pyramidal TIFF that OpenSlide opens with the right mpp.

The generated and mosaic cohorts (mrantool.cohorts) and the tests write their slides with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mrantool.errors import SlideError
from mrantool.files import atomic_path


def _pyramid(rgb: np.ndarray) -> list[np.ndarray]:
    """Level 0, then 2x box-downsampled levels until the long side is under 512 px."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= 512:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def write_pyramid_tiff(
    path: str | Path, rgb: np.ndarray, mpp: float | None = 0.5, tile: int = 256, jpeg: bool = True, quality: int = 90
) -> Path:
    """Write `rgb` (h, w, 3) uint8 as a tiled pyramidal TIFF that OpenSlide opens with `openslide.mpp-x == mpp`.

    `mpp=None` writes no resolution tags: a slide without mpp metadata, as some scanners export.
    Level 0 first, then 2x reductions marked reduced-resolution (subfiletype 1) in the main IFD chain; resolution
    in pixels per centimetre; JPEG tiles (zlib when `jpeg=False`). Written under a temporary name and renamed, so a
    half-written file never appears at `path`.
    """
    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SlideError(f"Cannot write {path}: pixels must be an (h, w, 3) uint8 array, got {rgb.shape} {rgb.dtype}.")
    if tile <= 0 or tile % 16:
        raise SlideError(f"Cannot write {path}: the tile size {tile} must be a positive multiple of 16.")
    if mpp is not None and mpp <= 0:
        raise SlideError(f"Cannot write {path}: mpp must be positive, got {mpp}.")
    compression, args = ("jpeg", {"level": quality}) if jpeg else ("zlib", {"level": 6})
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(_pyramid(rgb)):
            tags = {}
            if mpp is not None:
                res = 1e4 / mpp / 2**i  # pixels per centimetre at this level
                tags = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tif.write(level, photometric="rgb", tile=(tile, tile), compression=compression,
                      compressionargs=args, subfiletype=1 if i else 0, metadata=None, **tags)
    return path
