"""Plain images (PNG, JPEG, BMP, and TIFFs OpenSlide refuses: striped or single-level ones) as one-level slides.

TMA cores, regions of interest and tiles come this way. The pixels are read once: an uncompressed TIFF stored in
one contiguous block is memory-mapped with tifffile (any size); anything else is decoded into RAM, up to
`MAX_DECODED_PIXELS`. The resolution comes from `--mpp` or, for a TIFF, from its resolution tags when they hold a
microscope's resolution; PNG/JPEG dpi fields are screen or print settings and are never used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from mrantool.errors import MissingMppError, SlideError
from mrantool.slides.base import Slide, thumbnail_size
from mrantool.slides.wsi import rgba_on_white

#: File name suffixes read as plain images without asking OpenSlide first.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
#: The largest image decoded into RAM (2**27 px: 384 MiB as RGB, held by each reader process).
MAX_DECODED_PIXELS = 2**27
#: TIFF resolution tags outside this range (um/px) are not a microscope's (72 dpi is 353 um/px) and are ignored.
MPP_TAG_RANGE = (0.05, 20.0)


class PlainImageSlide(Slide):
    """A one-level slide over an (h, w), (h, w, 3) or (h, w, 4) uint8 array, in RAM or memory-mapped."""

    backend = "image"

    def __init__(self, path: Path, pixels: np.ndarray, mpp: float) -> None:
        h, w = pixels.shape[:2]
        super().__init__(path, mpp, ((w, h),), (1.0,))
        self._pixels: np.ndarray | None = pixels

    def _array(self) -> np.ndarray:
        if self._pixels is None:
            raise SlideError(f"{self.path} was closed; open it again to read pixels.")
        return self._pixels

    def read_level(self, x0: int, y0: int, level: int, side: int) -> np.ndarray:
        pixels = self._array()
        w, h = self.dimensions
        out = np.full((side, side, 3), 255, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if xa < xb and ya < yb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = _rgb(pixels[ya:yb, xa:xb])
        return out

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        pixels = self._array()
        size = thumbnail_size(self.dimensions, max_px)
        step = max(1, self.dimensions[0] // size[0] // 2)  # strided pre-reduction keeps a huge memory map cheap
        image = Image.fromarray(np.ascontiguousarray(_rgb(pixels[::step, ::step])))
        if image.size != size:
            image = image.resize(size, Image.Resampling.BOX)
        return np.asarray(image), self.dimensions[0] / size[0]

    def close(self) -> None:
        self._pixels = None


def _rgb(block: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA uint8 -> RGB uint8 (transparent pixels become white)."""
    if block.ndim == 2:
        return np.repeat(block[..., None], 3, axis=2)
    if block.shape[2] == 4:
        return rgba_on_white(block)
    return block


def is_plain_image(path: Path) -> bool:
    """Whether `path` is read as a plain image without asking OpenSlide (by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def open_plain_image(path: Path, mpp: float | None) -> PlainImageSlide:
    """Open a PNG/JPEG/BMP (Pillow) or TIFF (tifffile) as a one-level slide; `mpp` overrides the TIFF's tags."""
    if path.suffix.lower() in (".tif", ".tiff"):
        pixels, tag_mpp = _read_tiff(path)
    else:
        pixels, tag_mpp = _read_pillow(path), None
    mpp = mpp if mpp is not None else tag_mpp
    if mpp is None:
        raise MissingMppError(
            f"{path} is a plain image with no microns-per-pixel metadata; pass --mpp with its resolution, "
            "e.g. --mpp 0.5 for a 20x image."
        )
    return PlainImageSlide(path, pixels, float(mpp))


def _too_large(path: Path, w: int, h: int) -> SlideError:
    return SlideError(
        f"{path} is {w}x{h} px, more than the {MAX_DECODED_PIXELS / 1e6:.0f} megapixels mrantool decodes into RAM; "
        "convert it to a pyramidal tiled TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg)."
    )


def _unsupported(path: Path, what: str) -> SlideError:
    return SlideError(f"{path} is {what}; mrantool reads 8-bit greyscale, RGB or RGBA images: convert it to 8-bit RGB.")


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            with Image.open(path) as image:
                w, h = image.size
                if w * h > MAX_DECODED_PIXELS:
                    raise _too_large(path, w, h)
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    raise _unsupported(path, f"a {image.mode} image (more than 8 bits per channel)")
                alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
                return np.asarray(image.convert("RGBA" if alpha else "RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise SlideError(
            f"{path} cannot be read as an image ({exc}); the file may be truncated or not an image: copy it again."
        ) from None


def _read_tiff(path: Path) -> tuple[np.ndarray, float | None]:
    """(pixels as (h, w[, c]) uint8, memory-mapped when possible; mpp from the resolution tags or None)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = tif.pages.first
            tag_mpp = _tag_mpp(page)
            axes, shape, dtype = series.axes, series.shape, series.dtype
            layout = _layout(path, axes, shape, dtype)
            if series.dataoffset is not None and layout != "SYX":
                pixels = tifffile.memmap(path, series=0, mode="r")
            else:
                h, w = shape[axes.index("Y")], shape[axes.index("X")]
                if w * h > MAX_DECODED_PIXELS:
                    raise _too_large(path, w, h)
                pixels = series.asarray()
            pixels = pixels.reshape([n for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX"])
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
        raise SlideError(
            f"{path} is neither a slide OpenSlide can read nor a readable TIFF ({exc}); the file may be truncated: "
            "copy it again."
        ) from None
    if layout == "SYX":
        pixels = np.moveaxis(pixels, 0, -1)
    return pixels, tag_mpp


def _layout(path: Path, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
    """'YX' (grey), 'YXS' (samples last) or 'SYX' (planar) for an 8-bit image with 1, 3 or 4 samples."""
    if dtype != np.uint8:
        raise _unsupported(path, f"a {dtype} TIFF")
    squeezed = "".join(a for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX")
    if squeezed == "YX":
        return "YX"
    if squeezed in ("YXS", "SYX") and shape[axes.index("S")] in (3, 4):
        return squeezed
    raise _unsupported(path, f"a TIFF with axes {axes} and shape {shape} (not one grey or RGB image)")


def _tag_mpp(page: tifffile.TiffPage) -> float | None:
    """Microns per pixel from XResolution/YResolution, when a physical unit is set and the value is plausible."""
    if "XResolution" not in page.tags or page.resolutionunit == tifffile.RESUNIT.NONE:
        return None
    try:
        per_um = page.get_resolution(tifffile.RESUNIT.MICROMETER)
    except (ValueError, ZeroDivisionError):
        return None
    values = [1.0 / r for r in per_um if r > 0]
    if not values:
        return None
    mpp = float(np.mean(values))
    return mpp if MPP_TAG_RANGE[0] <= mpp <= MPP_TAG_RANGE[1] else None
