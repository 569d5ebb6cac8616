"""Open any slide file behind one interface (`Slide`): whole-slide formats through OpenSlide, plain images through
Pillow or tifffile as one-level slides.

PNG, JPEG and BMP files are plain images. A TIFF goes to OpenSlide first (pyramidal and tiled ones keep their
levels and metadata) and, when OpenSlide refuses it (striped or otherwise plain), is read as a plain image. Every
other file is OpenSlide's: a single DICOM instance stays refused with a sentence saying to copy the whole series.
"""

from __future__ import annotations

from pathlib import Path

import openslide

from mrantool.errors import SlideError
from mrantool.slides.base import Slide, slide_id_from_path
from mrantool.slides.plain import is_plain_image, open_plain_image
from mrantool.slides.wsi import open_wsi

__all__ = ["Slide", "open_slide", "slide_id_from_path"]


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide or plain image; `mpp` overrides (or supplies) the level-0 microns per pixel."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path} does not exist or is not a file; check the path.")
    if path.stat().st_size == 0:
        raise SlideError(f"{path} is empty (0 bytes); copy the slide again.")
    if mpp is not None and not mpp > 0:
        raise SlideError(f"--mpp must be positive for {path}, got {mpp}.")
    if is_plain_image(path):
        return open_plain_image(path, mpp)
    try:
        return open_wsi(path, mpp)
    except openslide.OpenSlideUnsupportedFormatError:
        if path.suffix.lower() in (".tif", ".tiff"):
            return open_plain_image(path, mpp)
        raise SlideError(
            f"{path} is not a whole slide image OpenSlide can read (a single DICOM instance, another format or a "
            "truncated copy); use the scanner's original file, a pyramidal tiled TIFF, or a PNG/JPEG/TIFF image."
        ) from None
