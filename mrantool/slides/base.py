"""The slide interface every reader implements: level-0 geometry, pyramid levels, mpp-exact reads, thumbnails.

Thread and process safety: a handle may cache pixels or hold a file open and is not meant to be shared across
processes. Open one `Slide` per DataLoader worker (or thread) with `open_slide`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

# A level is used when its resolution is within this factor of the target (floating point slack in mpp tags).
_LEVEL_SLACK = 1.01


class Slide(ABC):
    """An open slide with its level-0 resolution; all coordinates are level-0 pixels."""

    #: Which reader opened it ("openslide" or "image"), recorded in the store's provenance.
    backend: str = ""

    def __init__(self, path: Path, mpp: float, level_dimensions: tuple[tuple[int, int], ...],
                 level_downsamples: tuple[float, ...]) -> None:
        self.path = path
        self.mpp = mpp
        self.level_dimensions = level_dimensions
        self.dimensions: tuple[int, int] = level_dimensions[0]
        self.level_count = len(level_dimensions)
        self.level_downsamples = level_downsamples

    @property
    def slide_id(self) -> str:
        return slide_id_from_path(self.path)

    def best_level(self, mpp: float) -> int:
        """The lowest-resolution level that still has at least the target resolution (never upsampled needlessly)."""
        target_ds = mpp / self.mpp
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= target_ds * _LEVEL_SLACK:
                best = level
        return best

    def read_region_mpp(self, x0: int, y0: int, size_px: int, mpp: float) -> np.ndarray:
        """RGB uint8 (size_px, size_px, 3) of the square at level-0 (x0, y0) spanning size_px pixels at `mpp`.

        Reads from `best_level(mpp)` and resizes; area outside the slide is white.
        """
        level = self.best_level(mpp)
        ds = self.level_downsamples[level]
        side_l0 = size_px * mpp / self.mpp
        side_level = max(1, math.ceil(side_l0 / ds - 1e-6))
        region = self.read_level(int(x0), int(y0), level, side_level)
        if side_level != size_px:
            region = np.asarray(Image.fromarray(region).resize((size_px, size_px), Image.Resampling.BILINEAR))
        return region

    @abstractmethod
    def read_level(self, x0: int, y0: int, level: int, side: int) -> np.ndarray:
        """RGB uint8 (side, side, 3) at `level` whose top-left is level-0 (x0, y0); outside the slide is white."""

    @abstractmethod
    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most `max_px`, and its downsample from level 0."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle or pixels."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def thumbnail_size(dimensions: tuple[int, int], max_px: int) -> tuple[int, int]:
    """(w, h) of a thumbnail whose longer side is at most `max_px`, never larger than the slide."""
    w, h = dimensions
    scale = max(max(w, h) / max_px, 1.0)
    return max(1, round(w / scale)), max(1, round(h / scale))


def slide_id_from_path(path: str | Path) -> str:
    """A slide's id: its file name without the extension (`CMU-1.svs` -> `CMU-1`)."""
    return Path(path).stem
