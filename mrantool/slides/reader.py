"""Read whole slide images at a physical resolution (microns per pixel) through OpenSlide.

Thread and process safety: an OpenSlide handle caches tiles and is not meant to be shared across processes.
Open one `Slide` per DataLoader worker (or thread) with `open_slide`; handles are cheap to open.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from mrantool.errors import MissingMppError, SlideError

# A level is used when its resolution is within this factor of the target (floating point slack in mpp tags).
_LEVEL_SLACK = 1.01


class Slide:
    """An open slide with its level-0 resolution; all coordinates are level-0 pixels."""

    def __init__(self, path: Path, handle: openslide.OpenSlide, mpp: float) -> None:
        self.path = path
        self._osr = handle
        self.mpp = mpp
        self.dimensions: tuple[int, int] = handle.dimensions
        self.level_count: int = handle.level_count
        self.level_downsamples: tuple[float, ...] = tuple(handle.level_downsamples)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(handle.level_dimensions)

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
        region = self._read(x0, y0, level, side_level)
        if side_level != size_px:
            region = region.resize((size_px, size_px), Image.Resampling.BILINEAR)
        return np.asarray(region)

    def _read(self, x0: int, y0: int, level: int, side: int) -> Image.Image:
        try:
            rgba = self._osr.read_region((int(x0), int(y0)), level, (side, side))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"Could not read pixels from {self.path} ({str(exc).rsplit(': ', 1)[-1]}); the file may be truncated "
                "or corrupt: copy it again."
            ) from None
        return _rgba_on_white(rgba)

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most `max_px`, and its downsample from level 0."""
        w, h = self.dimensions
        scale = max(w, h) / max_px
        size = (max(1, round(w / max(scale, 1.0))), max(1, round(h / max(scale, 1.0))))
        try:
            thumb = self._osr.get_thumbnail(size).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"Could not read a thumbnail of {self.path} ({exc}); the file may be truncated or corrupt."
            ) from None
        return np.asarray(thumb), w / thumb.width

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rgba_on_white(rgba: Image.Image) -> Image.Image:
    """Composite OpenSlide's RGBA (transparent outside the scanned area) onto white."""
    arr = np.asarray(rgba)
    alpha = arr[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    rgb = (arr[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def slide_id_from_path(path: str | Path) -> str:
    """A slide's id: its file name without the extension (`CMU-1.svs` -> `CMU-1`)."""
    return Path(path).stem


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide with OpenSlide; `mpp` overrides (or supplies) the level-0 microns per pixel."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path} does not exist or is not a file; check the path.")
    if path.stat().st_size == 0:
        raise SlideError(f"{path} is empty (0 bytes); copy the slide again.")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{path} is not a whole slide image OpenSlide can read (a plain or striped TIFF, a single DICOM instance, "
            "another format or a truncated copy); use the scanner's original file or a pyramidal tiled TIFF."
        ) from None
    except openslide.OpenSlideError as exc:
        reason = str(exc).rsplit(": ", 1)[-1]  # OpenSlide repeats the path before the reason
        if path.suffix.lower() == ".dcm":
            raise SlideError(
                f"OpenSlide cannot open {path} as a DICOM slide ({reason}); it needs every instance of the series "
                "in one folder: copy the complete series."
            ) from None
        raise SlideError(f"OpenSlide cannot open {path} ({reason}); the file may be truncated or corrupt.") from None
    if mpp is None:
        mpp = _metadata_mpp(handle)
        if mpp is None:
            handle.close()
            raise MissingMppError(
                f"{path} has no microns-per-pixel metadata; pass --mpp with the scan resolution, e.g. --mpp 0.25."
            )
    elif not mpp > 0:
        handle.close()
        raise SlideError(f"--mpp must be positive for {path}, got {mpp}.")
    return Slide(path, handle, float(mpp))


def _metadata_mpp(handle: openslide.OpenSlide) -> float | None:
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(handle.properties.get(key, "nan"))
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            values.append(value)
    return float(np.mean(values)) if values else None
