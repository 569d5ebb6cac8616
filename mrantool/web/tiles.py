"""Deep Zoom tiles of a slide, read through mrantool's slide reader interface, with an LRU cache of JPEG tiles.

The pyramid follows the Deep Zoom (DZI) layout OpenSeadragon expects: level `max_level` is the slide at level-0
resolution, each level below halves it, level 0 is one pixel; tiles are `TILE` px squares (smaller at the right
and bottom edges) without overlap. A tile is one `read_region_mpp` at the level's resolution, so it comes from the
best pyramid level of the file (OpenSlide's DeepZoomGenerator does the same) and plain-image slides work alike.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mrantool.slides.reader import Slide, open_slide

TILE = 256
JPEG_QUALITY = 85
MAX_OPEN_SLIDES = 8
MAX_CACHED_TILES = 4096  # about 60 MB of JPEG tiles


@dataclass(frozen=True)
class DeepZoomLayout:
    """The Deep Zoom pyramid of a `width` x `height` level-0 image."""

    width: int
    height: int
    tile: int = TILE

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def scale(self, level: int) -> float:
        """Level pixels per level-0 pixel."""
        return 2.0 ** (level - self.max_level)

    def level_size(self, level: int) -> tuple[int, int]:
        s = self.scale(level)
        return max(1, math.ceil(self.width * s)), max(1, math.ceil(self.height * s))

    def tile_count(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile), math.ceil(h / self.tile)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int] | None:
        """(x, y, w, h) of a tile in level pixels, or None when the tile does not exist."""
        if not 0 <= level <= self.max_level:
            return None
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            return None
        w, h = self.level_size(level)
        x, y = col * self.tile, row * self.tile
        return x, y, min(self.tile, w - x), min(self.tile, h - y)

    def dzi(self, url: str) -> dict:
        """The DZI descriptor as the JSON OpenSeadragon accepts in place of the XML file."""
        return {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008", "Url": url, "Format": "jpeg",
                          "Overlap": "0", "TileSize": str(self.tile),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}


def read_tile(slide: Slide, layout: DeepZoomLayout, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """RGB uint8 (h, w, 3) pixels of the tile at `box` (from `layout.tile_box`) of `level`."""
    x, y, w, h = box
    scale = layout.scale(level)
    side = max(w, h)
    region = slide.read_region_mpp(round(x / scale), round(y / scale), side, slide.mpp / scale)
    return region[:h, :w]


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class SlideHandles:
    """Open slides shared by the server's threads: at most MAX_OPEN_SLIDES, one lock each (reads are serialised
    per slide, as the reader asks for one handle per thread)."""

    def __init__(self, opener: Callable[[Path, float | None], Slide] = open_slide) -> None:
        self._opener = opener
        self._open: OrderedDict[Path, tuple[Slide, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def use(self, path: Path, mpp: float | None) -> Iterator[Slide]:
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                entry = (self._opener(path, mpp), threading.Lock())
                self._open[path] = entry
                while len(self._open) > MAX_OPEN_SLIDES:
                    old, old_lock = self._open.popitem(last=False)[1]
                    with old_lock:
                        old.close()
            self._open.move_to_end(path)
        slide, lock = entry
        with lock:
            yield slide

    def close(self) -> None:
        with self._lock:
            for slide, lock in self._open.values():
                with lock:
                    slide.close()
            self._open.clear()


class BytesCache:
    """A thread-safe LRU of small byte strings (encoded tiles)."""

    def __init__(self, capacity: int = MAX_CACHED_TILES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_make(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value
