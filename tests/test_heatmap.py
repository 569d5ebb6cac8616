"""Attention heatmaps and patch galleries: geometry of the painted map, level composition, errors, galleries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from mrantool.config import ExtractConfig
from mrantool.errors import MrantoolError, SlideError, StoreError
from mrantool.extract.api import extract
from mrantool.store import FeatureStore
from mrantool.viz import gallery
from mrantool.viz.gallery import patch_gallery, read_patches
from mrantool.viz.heatmap import TopItem, compose, draw_heatmap, level_tiles
from tests.conftest import tissue_image

TINY = {"preset": "tiny", "workers": 0, "device": "cpu"}
# tiny preset on a 0.5 mpp slide: bags of 1024 level-0 px, 4x4 patches of 256 px, 2x2 cells of 128 px.
# With max_px=512 the 2048 px slide's thumbnail is 4x smaller: a patch is 64 thumbnail px, a cell 32.


@pytest.fixture(scope="module")
def disc(tmp_path_factory) -> tuple[Path, Path]:
    """(slide file, store) of a 2048 px generated slide with a central tissue disc."""
    from mrantool.slides.writer import write_pyramid_tiff

    folder = tmp_path_factory.mktemp("heatmap")
    (folder / "slides").mkdir()
    slide = write_pyramid_tiff(folder / "slides" / "disc.tif", tissue_image(2048))
    extract(ExtractConfig(slides=[str(slide)], store=str(folder / "s.zarr"), **TINY))
    return slide, folder / "s.zarr"


def fake_run(folder: Path, store_path: Path, slide_id: str, model: str = "mran", **arrays: np.ndarray) -> Path:
    """A run folder with config.json, predictions.csv and attention/<slide_id>.npz holding `arrays`."""
    (folder / "attention").mkdir(parents=True, exist_ok=True)
    identity = FeatureStore.open(store_path).identity
    (folder / "config.json").write_text(json.dumps({"model": model, "store_identity": identity,
                                                    "config": {"patch_min_tissue": 0.25}}))
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "fold", "repeat", "label", "prob_a", "prob_b", "predicted"])
        writer.writerow([slide_id, 0, 0, "b", 0.1, 0.9, "b"])
    np.savez(folder / "attention" / f"{slide_id}.npz", **arrays)
    return folder


def bag_at(store_path: Path, slide_id: str, x: int, y: int) -> int:
    coords = FeatureStore.open(store_path).slide(slide_id).coords[:].tolist()
    return coords.index([x, y])


def hot_patch_attention(store_path: Path, bag: int, patch: int) -> dict[str, np.ndarray]:
    """Slide-normalised (as fit writes them) bag/patch attention with all weight on one patch."""
    n_bags = FeatureStore.open(store_path).slide("disc").n_bags
    patch_w = np.zeros((n_bags, 16), np.float32)
    patch_w[bag, patch] = 1.0
    return {"bag": patch_w.sum(-1), "patch": patch_w}


def test_patch_heatmap_puts_the_hot_patch_where_its_coordinates_say(disc, tmp_path):
    _, store = disc
    b0 = bag_at(store, "disc", 0, 0)
    run = fake_run(tmp_path / "run", store, "disc", **hot_patch_attention(store, b0, 15))
    result = draw_heatmap(run, store, "disc", tmp_path / "map.png", level="patch", top=3, alpha=1.0, max_px=512)

    assert result.heatmap.shape == (512, 512) and result.overlay.shape == (512, 512, 3)
    assert result.downsample == pytest.approx(4.0)
    with Image.open(result.out) as png:
        assert png.width > 512 and png.height > 512
    values = result.heatmap[~np.isnan(result.heatmap)]
    assert values.min() == 0.0 and values.max() == 1.0
    assert result.value_range == (0.0, 1.0)
    # Patch 15 of bag (0, 0) is row 3, col 3: level-0 768..1024, thumbnail 192..256; its centre is (224, 224).
    hot = np.argwhere(result.heatmap == 1.0)
    assert hot.min(0).tolist() == [192, 192] and hot.max(0).tolist() == [255, 255]
    top_colour = (np.array(colormaps["inferno"](1.0)[:3]) * 255).round()
    np.testing.assert_array_equal(result.overlay[224, 224], top_colour)
    assert result.heatmap[160, 160] == 0.0  # patch 10 of that bag: tissue, no attention
    assert np.isnan(result.heatmap[16, 16])  # patch 0: no tissue, attention undefined
    # --top 3: the hot patch first, with its level-0 top-left; two zero-weight tissue patches after it.
    assert result.top[0] == TopItem(b0, 15, 768, 768, 1.0)
    assert len(result.top) == 3 and [t.score for t in result.top[1:]] == [0.0, 0.0]
    assert result.gallery == tmp_path / "map_top.png"
    with Image.open(result.gallery) as png:
        assert png.width == gallery.MARGIN + 3 * (128 + gallery.MARGIN)  # 3 tiles of 64 px patches shown at 128


def test_cell_level_composes_bag_patch_and_cell_weights(disc, tmp_path):
    _, store = disc
    features = FeatureStore.open(store).slide("disc")
    n = features.n_bags
    b0 = bag_at(store, "disc", 0, 0)
    tissue = features.patch_tissue[:].astype(np.float32) >= 0.25
    # Within-parent weights, as MRAN's alpha_b, alpha and beta are before composition.
    bag = np.full(n, 0.3 / (n - 1))
    bag[b0] = 0.7
    alpha = tissue / tissue.sum(1, keepdims=True)
    alpha[b0] = np.where(tissue[b0], 0.5 / (tissue[b0].sum() - 1), 0.0)
    alpha[b0, 15] = 0.5
    beta = np.full((n, 16, 4), 0.25)
    beta[b0, 15] = [0.1, 0.1, 0.1, 0.7]
    run = fake_run(tmp_path / "run", store, "disc", bag=bag, patch=alpha, cell=beta)
    result = draw_heatmap(run, store, "disc", tmp_path / "cells.png", level="cell", top=2, max_px=512)

    assert result.value_range[1] == pytest.approx(0.7 * 0.5 * 0.7)
    # Cell 3 (row 1, col 1) of patch 15 of bag (0, 0): level-0 896..1024 -> thumbnail 224..256.
    assert result.heatmap[240, 240] == 1.0
    assert result.heatmap[208, 208] == pytest.approx(0.1 / 0.7, rel=1e-5)  # cell 0 of the same patch
    assert result.top[0] == TopItem(b0, 15, 896, 896, pytest.approx(0.245))
    assert result.gallery is not None and result.gallery.is_file()
    patch_level = draw_heatmap(run, store, "disc", tmp_path / "p.png", level="patch", max_px=512)
    assert patch_level.value_range[1] == pytest.approx(0.35)
    assert patch_level.gallery is None and patch_level.top == []
    bag_level = draw_heatmap(run, store, "disc", tmp_path / "b.png", level="bag", max_px=512)
    assert bag_level.heatmap[100, 100] == 1.0 and bag_level.value_range[1] == pytest.approx(0.7)


def test_compose_keeps_slide_normalised_weights_and_composes_within_parent_ones():
    rng = np.random.default_rng(0)
    bag = np.array([0.6, 0.4])
    alpha = rng.random((2, 4))
    alpha /= alpha.sum(1, keepdims=True)
    beta = rng.random((2, 4, 9))
    beta /= beta.sum(-1, keepdims=True)
    within = compose({"bag": bag, "patch": alpha, "cell": beta})
    np.testing.assert_allclose(within["patch"], bag[:, None] * alpha)
    np.testing.assert_allclose(within["cell"], bag[:, None, None] * alpha[..., None] * beta)
    again = compose(within)  # already shares of the slide (what fit writes): unchanged
    for level in ("bag", "patch", "cell"):
        np.testing.assert_allclose(again[level], within[level])
        assert again[level].sum() == pytest.approx(1.0)
    assert set(compose({"patch": within["patch"]})) == {"bag", "patch"}  # bag = each bag's patch sum


def test_level_tiles_put_cells_in_spatial_order():
    # 1 bag, 2x2 patches of 2x2 cells: value = 10 * patch + cell.
    weights = (10 * np.arange(4)[:, None] + np.arange(4)[None]).reshape(1, 4, 4)
    tiles = level_tiles(weights, "cell", grid=2, cells=2)
    np.testing.assert_array_equal(tiles[0], [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]])
    np.testing.assert_array_equal(level_tiles(np.arange(4.0)[None], "patch", 2, 2)[0], [[0, 1], [2, 3]])


def test_errors_name_the_fix(disc, tmp_path):
    slide, store = disc
    run = fake_run(tmp_path / "run", store, "disc", **hot_patch_attention(store, 0, 5))
    with pytest.raises(MrantoolError, match=r"no attention for slide 'other'.*slides with attention: disc"):
        draw_heatmap(run, store, "other", tmp_path / "x.png")
    with pytest.raises(MrantoolError, match=r"Head 'mran' .* no cell attention, only bag, patch; use --level bag"):
        draw_heatmap(run, store, "disc", tmp_path / "x.png", level="cell")
    with pytest.raises(MrantoolError, match="Unknown attention level 'tile'"):
        draw_heatmap(run, store, "disc", tmp_path / "x.png", level="tile")
    moved = slide.with_name("moved.tif")
    slide.rename(moved)
    try:
        with pytest.raises(SlideError, match=r"disc\.tif recorded for 'disc' .* does not exist.*--slide-path"):
            draw_heatmap(run, store, "disc", tmp_path / "x.png")
        result = draw_heatmap(run, store, "disc", tmp_path / "x.png", slide_path=moved, max_px=256)
        assert result.heatmap.shape == (256, 256)
    finally:
        moved.rename(slide)
    config = json.loads((run / "config.json").read_text())
    config["store_identity"]["encoder"] = "vit_small"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreError, match=r"encoder .*pass the store the run was fit on"):
        draw_heatmap(run, store, "disc", tmp_path / "x.png")
    empty = tmp_path / "empty"
    (empty / "attention").mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    with pytest.raises(MrantoolError, match="saved no attention"):
        draw_heatmap(empty, store, "disc", tmp_path / "x.png")


def test_patch_gallery_lays_out_tiles_and_read_patches_reads_regions(disc, tmp_path):
    slide, _ = disc
    colours = [(255 * (i & 1), 255 * (i >> 1 & 1), 40 * i) for i in range(7)]
    images = [np.full((50, 50, 3), c, np.uint8) for c in colours]
    out = patch_gallery(images, [f"#{i}\nline two" for i in range(7)], tmp_path / "g.png", cols=3, tile_px=100)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    caption_px = (gallery.FONT_PX + 3) * 2 + gallery.MARGIN
    for i, colour in enumerate(colours):
        r, c = divmod(i, 3)
        x = gallery.MARGIN + c * (100 + gallery.MARGIN) + 50
        y = gallery.MARGIN + r * (100 + caption_px) + 50
        assert tuple(pixels[y, x]) == colour
    with pytest.raises(MrantoolError, match="one caption per image"):
        patch_gallery(images, ["a"], tmp_path / "bad.png")
    centre, corner = read_patches(slide, [(960, 960), (0, 0)], 64, 2.0)
    assert centre.shape == corner.shape == (64, 64, 3)
    assert centre[..., 0].mean() > centre[..., 1].mean() + 50  # pink tissue
    assert corner.min() > 200  # white glass


def test_real_slide_top_patches_gallery(cmu_svs, tmp_path):
    store = tmp_path / "cmu.zarr"
    extract(ExtractConfig(slides=[str(cmu_svs)], store=str(store), **TINY))
    features = FeatureStore.open(store).slide("CMU-1-Small-Region")
    tissue = features.patch_tissue[:].astype(np.float64)
    patch = tissue ** 4 / (tissue ** 4).sum()  # attention on the fullest patches
    run = fake_run(tmp_path / "run", store, "CMU-1-Small-Region", **{"bag": patch.sum(1), "patch": patch})
    result = draw_heatmap(run, store, "CMU-1-Small-Region", tmp_path / "cmu.png", top=6, max_px=1024)
    assert result.heatmap.shape[0] == 1024 and result.gallery is not None
    scores = [t.score for t in result.top]
    assert len(scores) == 6 and scores == sorted(scores, reverse=True)
    w, h = features.provenance["level0_size"]
    assert all(0 <= t.x < w and 0 <= t.y < h for t in result.top)
    with Image.open(result.gallery) as png:
        assert png.width == gallery.MARGIN + 5 * (128 + gallery.MARGIN)  # 5 columns, 2 rows
