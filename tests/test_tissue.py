"""Tissue detection on real tiles and thumbnails (skipped without ../shared/data) and on edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrantool.errors import MrantoolError
from mrantool.slides.tissue import MIN_TILE_FRACTION, has_tissue, ink_mask, tissue_fraction, tissue_mask
from tests.conftest import shared_file


def _data(sub: str) -> Path:
    return shared_file(sub)


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _files(sub: str, pattern: str) -> list[Path]:
    files = sorted(_data(sub).glob(pattern))
    assert files, f"no {pattern} in {sub}"
    return files


def test_real_tissue_tiles_are_tissue() -> None:
    for path in _files("tiles/tissue", "*.png"):
        rgb = _rgb(path)
        frac = tissue_fraction(rgb)
        assert frac > 2 * MIN_TILE_FRACTION, f"{path.name}: tissue fraction {frac:.3f}"
        assert has_tissue(rgb)


def test_real_tcga_tiles_are_tissue() -> None:
    paths = _files("tiles/TCGA-AD-6964-01Z-00-DX1", "*.jpg")
    assert len(paths) == 3
    for path in paths:
        assert tissue_fraction(_rgb(path)) > 0.7, path.name


def test_real_no_tissue_tiles_are_rejected() -> None:
    """Bare glass, a drawn line, dust, and green and red pen marks without tissue."""
    names = [p.name for p in _files("tiles/no-tissue", "*.png")]
    assert {"no-tissue-green-pen.png", "no-tissue-red-pen.png", "no-tissue-line.png", "almost-white-1.png"} <= set(
        names
    )
    for path in _files("tiles/no-tissue", "*.png"):
        rgb = _rgb(path)
        frac = tissue_fraction(rgb)
        assert frac < 0.7 * MIN_TILE_FRACTION, f"{path.name}: tissue fraction {frac:.3f}"
        assert not has_tissue(rgb)


def _ink_rules(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Strongly ink-coloured pixels by plain RGB boxes, independent of the module's rules."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return {"red": (r > 140) & (g < 60) & (b < 70), "green": g > r + 20, "blue": (b > r + 50) & (g > r + 20)}


@pytest.mark.parametrize(
    ("name", "colour", "fraction_range", "max_leak"),
    [
        ("thumb_tcga-red-pen.png", "red", (0.45, 0.75), 0.002),
        ("thumb_tcga-green-pen.png", "green", (0.6, 0.9), 0.02),
        ("thumb_wsi-blue-pen.png", "blue", (0.15, 0.45), 0.0),
        ("thumb_diagnostic-slide-thumb-rgb.png", "green", (0.3, 0.6), 0.005),
        ("thumb_diagnostic-slide-thumb-rgb.png", "red", (0.3, 0.6), 0.005),
    ],
)
def test_pen_ink_is_excluded_and_tissue_found(
    name: str, colour: str, fraction_range: tuple[float, float], max_leak: float
) -> None:
    rgb = _rgb(_data("thumbnails") / name)
    mask = tissue_mask(rgb)
    assert mask.shape == rgb.shape[:2] and mask.dtype == bool
    lo, hi = fraction_range
    assert lo < mask.mean() < hi, f"{name}: mask fraction {mask.mean():.3f}"
    ink = _ink_rules(rgb)[colour]
    assert ink.sum() > 500, f"{name} should contain {colour} ink"
    leak = (ink & mask).sum() / ink.sum()
    assert leak <= max_leak, f"{name}: {leak:.4f} of {colour} ink pixels are in the tissue mask"


def test_thumbnail_without_pen_is_mostly_tissue_but_not_the_lumens() -> None:
    rgb = _rgb(_data("thumbnails") / "thumb_tcga-lung-rgb.png")
    mask = tissue_mask(rgb)
    assert 0.6 < mask.mean() < 0.95
    glass = rgb.astype(int).min(axis=2) > 225
    assert (glass & mask).sum() / glass.sum() < 0.2


def test_real_slide_keeps_dark_tissue_and_drops_glass() -> None:
    """CMU-1-Small-Region: dark keratin and dense nuclei stay tissue (no false ink), glass stays out."""
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(_data("slides") / "CMU-1-Small-Region.svs")
    try:
        rgb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
    finally:
        slide.close()
    mask = tissue_mask(rgb)
    assert 0.3 < mask.mean() < 0.5
    r, g = rgb[..., 0].astype(int), rgb[..., 1].astype(int)
    dark_stain = (rgb.max(axis=2) < 130) & (r > g + 20)
    assert (dark_stain & mask).sum() / dark_stain.sum() > 0.98
    glass = rgb.min(axis=2) > 225
    assert (glass & mask).sum() / glass.sum() < 0.12


def test_ink_mask_flags_pen_colours_not_stain() -> None:
    ink = [[30, 160, 130], [60, 110, 210], [200, 20, 25], [96, 23, 35], [30, 30, 35]]
    stain = [[230, 140, 180], [110, 70, 160], [205, 85, 117], [113, 52, 91], [33, 13, 48]]  # incl. keratin
    pixels = np.array([ink + stain], np.uint8)
    assert ink_mask(pixels)[0].tolist() == [True] * len(ink) + [False] * len(stain)


@pytest.mark.parametrize("value", [(255, 255, 255), (243, 241, 244), (0, 0, 0), (200, 120, 170)])
def test_uniform_images_have_no_tissue(value: tuple[int, int, int]) -> None:
    rgb = np.empty((300, 400, 3), np.uint8)
    rgb[:] = value
    assert not tissue_mask(rgb).any()


def test_synthetic_blob_on_glass_and_small_specks_dropped() -> None:
    rng = np.random.default_rng(0)
    rgb = np.full((400, 400, 3), 242, np.uint8)
    yy, xx = np.mgrid[:400, :400]
    blob = (yy - 200) ** 2 + (xx - 180) ** 2 < 100**2
    rgb[blob] = np.array([215, 140, 185]) + rng.integers(-15, 15, (int(blob.sum()), 3))
    rgb[20:22, 350:352] = (150, 60, 120)  # a 4 px speck: below the minimum area
    mask = tissue_mask(rgb)
    assert (mask & blob).sum() / blob.sum() > 0.97
    assert (mask & ~blob).sum() < 0.01 * blob.sum()
    assert not mask[15:30, 345:360].any()


def test_alpha_channel_is_ignored_and_bad_shapes_raise() -> None:
    rgba = np.full((64, 64, 4), 255, np.uint8)
    assert tissue_fraction(rgba) == 0.0
    with pytest.raises(MrantoolError):
        tissue_mask(np.zeros((64, 64), np.uint8))
