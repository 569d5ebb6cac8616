"""Bag/patch/cell geometry: presets, placement, tissue fractions, coordinates inside the slide."""

from __future__ import annotations

import numpy as np
import pytest

from mrantool.errors import ConfigError
from mrantool.slides.reader import open_slide
from mrantool.tiling.geometry import bag_size_l0, patch_coords, plan_bags
from mrantool.tiling.presets import PRESETS, Geometry, Preset, get_preset
from mrantool.tiling.slide_plan import plan_slide


def test_mran_preset_is_the_reference_geometry():
    p = get_preset("mran")
    g = p.geometry
    assert (g.bag_px, g.mpp, g.grid, g.cells) == (1024, 1.0, 8, 4)
    assert g.patch_px == 128 and g.n_patches == 64 and g.n_cells == 16
    assert p.arch == "resnet18" and p.embed_dim == 512


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    p = PRESETS[name]
    assert Preset.from_dict(p.to_dict()) == p


def test_bad_geometry_and_unknown_preset():
    with pytest.raises(ConfigError, match="divisible"):
        Geometry(1000, 1.0, 7, 4)
    with pytest.raises(ConfigError, match="mran"):
        get_preset("nope")


def test_plan_counts_and_tissue_fractions():
    g = Geometry(256, 1.0, 4, 2)  # bag = 512 level-0 px at 0.5 mpp
    mask = np.zeros((100, 150), bool)  # downsample 10: slide 1500 x 1000 level-0 px
    mask[:, :52] = True  # the left 520 level-0 px are tissue
    plan = plan_bags((1500, 1000), 0.5, g, mask, 10.0, min_tissue=0.1)
    assert bag_size_l0(g, 0.5) == 512
    assert plan.n_candidates == 3 * 2  # ceil(1500/512) x ceil(1000/512)
    assert plan.n_bags == 2  # only the left column holds tissue
    assert plan.coords.tolist() == [[0, 0], [0, 512]]
    assert plan.patch_tissue.shape == (2, 16)
    assert np.allclose(plan.patch_tissue[0], 1.0)
    # The second bag crosses the bottom edge (y 512..1024 of 1000): its last patch row is 104 of 128 px inside.
    assert plan.patch_tissue[1][-4:] == pytest.approx(104 / 128, abs=0.05)
    pc = patch_coords(plan, g)
    assert pc.shape == (2, 16, 2) and pc[0, 1].tolist() == [128, 0] and pc[0, 4].tolist() == [0, 128]


def test_cells_get_their_own_tissue_fractions():
    """A bag of 2 x 2 patches of 2 x 2 cells, one mask pixel per level-0 pixel, tissue in its left 3 of 8 columns:
    counted by hand, a patch's cells in x 0-2 are all tissue, in x 2-4 half, the right patch none."""
    g = Geometry(8, 1.0, 2, 2)
    mask = np.zeros((8, 8), bool)
    mask[:, :3] = True
    plan = plan_bags((8, 8), 1.0, g, mask, 1.0, min_tissue=0.0)
    assert plan.cell_tissue.shape == (1, 4, 4)  # (bags, patches, cells), both row-major
    assert plan.cell_tissue[0].tolist() == [[1.0, 0.5, 1.0, 0.5], [0.0] * 4, [1.0, 0.5, 1.0, 0.5], [0.0] * 4]
    assert plan.patch_tissue[0].tolist() == [0.75, 0.0, 0.75, 0.0]


def test_cells_not_glass_share():
    """2 patches of 2 x 2 cells of 2 x 2 px: a glass cell (mean RGB 250 >= 225) has no non-glass pixel, a cell
    with one glass pixel of four 0.75; leading dimensions (bags) pass through."""
    from mrantool.tiling.geometry import not_glass_share

    patches = np.full((1, 2, 4, 4, 3), 150, np.uint8)
    patches[0, 0, :2, :2] = 250  # patch 0, cell 0: glass
    patches[0, 1, 2, 3] = [230, 230, 230]  # patch 1, cell 3: one pixel of glass
    patches[0, 1, 0, 0] = [255, 255, 180]  # mean 230: glass too (patch 1, cell 0)
    share = not_glass_share(patches, 2)
    assert share.dtype == np.float32 and share.shape == (1, 2, 4)
    np.testing.assert_allclose(share, [[[0.0, 1.0, 1.0, 1.0], [0.75, 1.0, 1.0, 0.75]]])
    np.testing.assert_allclose(not_glass_share(patches[0], 2), share[0])  # one bag


def test_cells_past_the_slide_edge_are_no_tissue():
    g = Geometry(256, 1.0, 4, 2)
    mask = np.ones((100, 150), bool)  # slide 1500 x 1000 level-0 px, all tissue, downsample 10
    plan = plan_bags((1500, 1000), 0.5, g, mask, 10.0, min_tissue=0.1)
    assert plan.coords[3].tolist() == [0, 512]
    last_row = plan.cell_tissue[3].reshape(4, 4, 2, 2)[-1]  # bag y 512..1024: its last patch row y 896..1024
    assert np.all(last_row[:, 0] == 1.0)  # upper cells (y 896..960) inside the slide
    assert np.all(last_row[:, 1] == pytest.approx(40 / 64, abs=0.1))  # lower cells y 960..1024: 40 px inside


def test_cmu_tiling_counts_and_coordinates(cmu_svs):
    g = get_preset("mran").geometry
    with open_slide(cmu_svs) as s:
        sp = plan_slide(s, g)
    plan = sp.plan
    assert plan.bag_size_l0 == pytest.approx(1024 / 0.499)
    assert plan.n_candidates == 4  # 2220 x 2967 at 2052 px per bag
    assert 2 <= plan.n_bags <= 4
    assert (plan.coords >= 0).all() and (plan.coords[:, 0] < 2220).all() and (plan.coords[:, 1] < 2967).all()
    assert (plan.patch_tissue >= 0).all() and (plan.patch_tissue <= 1).all()
    assert sp.read_level == 0
    assert 0.2 < sp.mask.mean() < 0.95


def test_generated_slide_tissue_disc(small_slide):
    g = Geometry(256, 1.0, 4, 2)  # 512 level-0 px bags on a 2048 px slide: 16 candidates
    with open_slide(small_slide) as s:
        sp = plan_slide(s, g, min_tissue=0.5)
    assert sp.plan.n_candidates == 16
    # The disc (radius 0.35 * 2048) covers the four central bags fully.
    centre = {(512, 512), (1024, 512), (512, 1024), (1024, 1024)}
    assert centre <= {tuple(c) for c in sp.plan.coords.tolist()}
    assert (0, 0) not in {tuple(c) for c in sp.plan.coords.tolist()}


def test_fluorescence_ndpi_finds_tissue_on_dark_background(ndpi):
    """DAPI scans have a black background: tissue is where the signal is, and the extract run needs its bags."""
    from mrantool.slides.tissue import is_fluorescence

    with open_slide(ndpi) as s:
        sp = plan_slide(s, get_preset("mran").geometry)
    assert is_fluorescence(sp.thumbnail)
    assert 0.3 < sp.mask.mean() < 0.9
    assert sp.plan.n_bags == 1 and sp.read_level == 2
    # Corners of the scan are empty background.
    assert not sp.mask[:20, :20].any()
