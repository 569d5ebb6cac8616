"""Whole slide images (SVS, NDPI, MRXS, pyramidal TIFF, DICOM series...) through OpenSlide."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide

from mrantool.errors import MissingMppError, SlideError
from mrantool.slides.base import Slide, thumbnail_size


class OpenSlideSlide(Slide):
    """A slide read through an OpenSlide handle (its pyramid levels, tile cache and metadata)."""

    backend = "openslide"

    def __init__(self, path: Path, handle: openslide.OpenSlide, mpp: float) -> None:
        super().__init__(path, mpp, tuple(handle.level_dimensions), tuple(handle.level_downsamples))
        self._osr = handle

    def read_level(self, x0: int, y0: int, level: int, side: int) -> np.ndarray:
        try:
            rgba = self._osr.read_region((x0, y0), level, (side, side))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"Could not read pixels from {self.path} ({str(exc).rsplit(': ', 1)[-1]}); the file may be truncated "
                "or corrupt: copy it again."
            ) from None
        return rgba_on_white(np.asarray(rgba))

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        try:
            thumb = self._osr.get_thumbnail(thumbnail_size(self.dimensions, max_px)).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"Could not read a thumbnail of {self.path} ({exc}); the file may be truncated or corrupt."
            ) from None
        return np.asarray(thumb), self.dimensions[0] / thumb.width

    def close(self) -> None:
        self._osr.close()


def rgba_on_white(arr: np.ndarray) -> np.ndarray:
    """Composite an (h, w, 4) uint8 RGBA array (transparent = not scanned) onto white; RGB uint8 out."""
    alpha = arr[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(arr[..., :3])
    rgb = (arr[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
    return rgb.astype(np.uint8)


def open_wsi(path: Path, mpp: float | None) -> OpenSlideSlide:
    """Open `path` with OpenSlide (raises `openslide.OpenSlideUnsupportedFormatError` for formats it does not know,
    so the caller can try another reader); `mpp` overrides the metadata, none in either is a `SlideError`."""
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise
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
    return OpenSlideSlide(path, handle, float(mpp))


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
