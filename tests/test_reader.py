"""Slides read at physical resolution: level choice, mpp handling, clean errors for files OpenSlide refuses."""

from __future__ import annotations

import numpy as np
import pytest

from mrantool.errors import SlideError
from mrantool.slides.reader import open_slide
from tests.conftest import shared_file, tissue_image


def test_cmu_metadata_and_region(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.dimensions == (2220, 2967)
        assert s.best_level(1.0) == 0  # one level only
        region = s.read_region_mpp(100, 200, 256, 1.0)
        assert region.shape == (256, 256, 3) and region.dtype == np.uint8
        # 256 px at 1.0 mpp spans ~513 level-0 px: compare with a direct level-0 read resized.
        assert 60 < region.mean() < 250
        thumb, ds = s.thumbnail(512)
        assert max(thumb.shape[:2]) == 512
        assert ds == pytest.approx(2967 / 512, rel=0.01)


def test_ndpi_picks_the_right_level(ndpi):
    with open_slide(ndpi) as s:
        assert s.level_count == 7
        assert s.mpp == pytest.approx(0.2282, abs=1e-4)
        # target / slide mpp = downsample wanted; the chosen level is the coarsest not coarser than that.
        assert s.best_level(0.2282) == 0
        assert s.best_level(0.5) == 1  # wanted 2.19 -> level 1 (2x)
        assert s.best_level(1.0) == 2  # wanted 4.38 -> level 2 (4x), never level 0
        assert s.best_level(0.2282 * 4) == 2  # exact match within floating point slack
        assert s.best_level(100.0) == 6
        assert s.read_region_mpp(0, 0, 128, 1.0).shape == (128, 128, 3)


def test_single_dicom_instance_is_refused():
    """A striped TIFF is read as a plain image now (tests/test_plain_images.py); one DICOM instance stays refused."""
    path = shared_file("not-slides/DICOM-WSI_TCGA-XK-AAJU_single-instance.dcm")
    with pytest.raises(SlideError, match=f"{path.name} as a DICOM slide .*copy the complete series"):
        open_slide(path)
    with pytest.raises(SlideError, match="copy the complete series"):
        open_slide(path, mpp=0.5)


def test_zero_byte_and_truncated(tmp_path, cmu_svs):
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(SlideError, match="empty"):
        open_slide(empty)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_svs.read_bytes()[:300_000])
    with pytest.raises(SlideError, match="truncated"):
        s = open_slide(truncated)
        s.read_region_mpp(0, 0, 1024, 0.5)


def test_missing_mpp_names_the_option(tmp_path):
    from mrantool.slides.writer import write_pyramid_tiff

    path = tmp_path / "nompp.tif"
    write_pyramid_tiff(path, tissue_image(1024), mpp=None)
    with pytest.raises(SlideError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_generated_slide_levels_and_white_outside(small_slide):
    with open_slide(small_slide) as s:
        assert s.mpp == pytest.approx(0.5)
        assert s.level_count >= 3
        assert s.best_level(2.0) == 2
        edge = s.read_region_mpp(2048 - 32, 2048 - 32, 64, 0.5)  # three quarters lie beyond the slide
        assert (edge[32:, :] == 255).all() and (edge[:, 32:] == 255).all()
        assert (edge[:32, :32] < 250).all()  # the slide's own (off-white) background
