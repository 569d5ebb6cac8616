"""Tissue detection on RGB images: saturation thresholding, pen-ink and white exclusion, morphology.

`tissue_mask` works on a slide thumbnail (Otsu on HSV saturation, clamped to a sane range); `tissue_fraction` and
`has_tissue` work on a single tile at any magnification (fixed saturation threshold, since a tile need not contain
any background for Otsu to separate). H&E stains are pink to purple (red > green); marker ink is green, blue or
blue-green (green > red), red or maroon of a purer red hue than eosin, or grey-black, and is excluded with a margin
that covers its blurred edge. Dark purple ink cannot be told from dense nuclei or keratin by colour and is kept.
Fluorescence scans (dark background, e.g. DAPI) are recognised by their dark median and thresholded on smoothed
brightness instead: tissue is where the signal is, not where the stain is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from mrantool.errors import MrantoolError

#: Tile-level saturation threshold: background glass is below 0.03, pale eosin above 0.1.
TILE_SATURATION = 0.07
#: Otsu on a thumbnail is clamped to this range (all-white or all-tissue images have no useful Otsu split).
OTSU_RANGE = (0.07, 0.15)
#: A pixel whose mean channel is above this is glass (near white), whatever its saturation.
WHITE_LEVEL = 225.0
#: A thumbnail whose median channel mean is below this is a fluorescence scan (dark background).
FLUORESCENCE_MEDIAN = 40.0
#: Default minimum tissue fraction for a tile to count as tissue.
MIN_TILE_FRACTION = 0.25


def _channels(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    """(r, g, b, max, min) float32 planes of an (h, w, 3|4) image; an alpha channel is ignored."""
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise MrantoolError(f"Tissue detection needs an (h, w, 3) RGB image, got shape {rgb.shape}; pass an RGB array.")
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    return r, g, b, np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a square of half-side `radius` px (separable, so fast at any radius)."""
    size = 2 * round(radius) + 1
    if size == 1:
        return mask
    return ndi.maximum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary erosion by a square; the image border does not erode (pixels outside repeat the edge)."""
    size = 2 * round(radius) + 1
    if size == 1:
        return mask
    return ndi.minimum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)


def _ink(r: np.ndarray, g: np.ndarray, b: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    chroma = mx - mn
    green_blue = (g - r > 12) & (chroma > 25)
    blue = (b - r > 60) & (b - g > 60) & (r - g < 15)
    # Red ink: a purer red hue than eosin (blue little above green; this holds for ink thinned by blur too), or a
    # slightly pinker red that is more saturated than eosin ever is.
    pinkness = (b - g) / np.maximum(r - g, 1.0)
    red = (r - g > 30) & (r >= b) & ((pinkness < 0.2) | ((pinkness < 0.35) & (chroma > 0.65 * mx)))
    # Dark red ink is less blue than dark eosinophilic tissue (keratin); black ink is grey, dark tissue is purple.
    maroon = (mx < 130) & (r - g > 30) & (pinkness < 0.45)
    black = (mx < 80) & (chroma < 0.4 * mx)
    return green_blue | blue | red | maroon | black


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels coloured like marker-pen ink (green, blue, red, maroon or black) rather than H&E stain."""
    return _ink(*_channels(rgb))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max in [0, 1] of an RGB image."""
    _, _, _, mx, mn = _channels(rgb)
    return (mx - mn) / np.maximum(mx, 1.0)


def _candidates(rgb: np.ndarray, sat_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(stained, ink) pixel masks; `sat_threshold=None` picks it by Otsu clamped to `OTSU_RANGE`."""
    r, g, b, mx, mn = _channels(rgb)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    ink = _ink(r, g, b, mx, mn)
    glass = (r + g + b) >= 3 * WHITE_LEVEL
    if sat_threshold is None:
        values = sat[~ink & ~glass]
        if values.size == 0 or np.ptp(values) < 1e-3:  # uniform: nothing to separate, Otsu is undefined
            return np.zeros_like(ink), ink
        sat_threshold = float(np.clip(threshold_otsu(values), *OTSU_RANGE))
    return (sat > sat_threshold) & ~glass & ~ink, ink


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected objects smaller than `min_px` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tissue_mask(
    rgb: np.ndarray,
    *,
    min_area_frac: float = 0.001,
    sat_threshold: float | None = None,
    close_frac: float = 0.004,
    open_frac: float = 0.004,
    ink_margin_frac: float = 0.01,
) -> np.ndarray:
    """Boolean tissue mask of a slide thumbnail (True = tissue).

    Saturated, not near-white, not ink pixels (Otsu threshold on saturation unless `sat_threshold` is given), then
    closing, hole filling and opening with squares of half-side `close_frac` / `open_frac` x the short side; pen
    ink (objects of at least `min_area_frac` / 4 of the image) is removed with a margin of `ink_margin_frac` x the
    short side, and tissue objects under `min_area_frac` of the image are dropped. A uniform image has no tissue.
    """
    if is_fluorescence(rgb):
        return _fluorescence_mask(rgb, min_area_frac, close_frac)
    stained, ink = _candidates(rgb, sat_threshold)
    h, w = stained.shape
    side = min(h, w)
    ink = _remove_small(ink, max(4.0, min_area_frac / 4 * h * w))
    ink_zone = _dilate(ink, ink_margin_frac * side)
    mask = stained & ~ink_zone
    radius = max(1.0, close_frac * side)
    mask = ndi.binary_fill_holes(_erode(_dilate(mask, radius), radius))
    radius = open_frac * side
    mask = _dilate(_erode(mask, radius), radius) & ~ink_zone
    return _remove_small(mask, min_area_frac * h * w)


def is_fluorescence(rgb: np.ndarray) -> bool:
    """A dark-field image: most pixels are near black (fluorescence background), not near white (glass)."""
    r, g, b, _, _ = _channels(rgb)
    return float(np.median((r + g + b) / 3)) < FLUORESCENCE_MEDIAN


def _fluorescence_mask(rgb: np.ndarray, min_area_frac: float, close_frac: float) -> np.ndarray:
    """Tissue of a fluorescence thumbnail: Otsu on smoothed brightest-channel signal, closed and filled."""
    _, _, _, mx, _ = _channels(rgb)
    side = min(mx.shape)
    signal = ndi.gaussian_filter(mx, sigma=max(1.0, 0.01 * side))
    if float(signal.max() - signal.min()) < 1.0:
        return np.zeros(mx.shape, bool)
    mask = signal > threshold_otsu(signal) / 2  # half the Otsu split keeps dim cytoplasm between nuclei
    radius = max(1.0, close_frac * side)
    mask = ndi.binary_fill_holes(_erode(_dilate(mask, radius), radius))
    return _remove_small(mask, min_area_frac * mx.size)


def tissue_fraction(rgb: np.ndarray, *, sat_threshold: float = TILE_SATURATION) -> float:
    """Fraction of a tile's pixels that are tissue (fixed saturation threshold; see `tissue_mask`)."""
    mask = tissue_mask(rgb, min_area_frac=0.0005, sat_threshold=sat_threshold, close_frac=0.01)
    return float(mask.mean())


def has_tissue(rgb: np.ndarray, min_fraction: float = MIN_TILE_FRACTION) -> bool:
    """Whether a tile holds at least `min_fraction` tissue (pen marks, lines and bare glass do not count)."""
    return tissue_fraction(rgb) >= min_fraction
