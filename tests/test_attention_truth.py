"""Attention against point annotations: cell centres, hits within a radius, top-k shares with ties, chance."""

from __future__ import annotations

import numpy as np
import pytest

from mrantool.evaluation.attention_truth import in_discs, near_points, top_k_hits
from mrantool.store.geometry import cell_centres


def test_cell_centres_of_a_two_by_two_grid():
    # One bag at (100, 200) of 64 level-0 px, 2x2 patches of 2x2 cells: cells are 16 px, centres 8 px in.
    centres = cell_centres(np.array([[100, 200]]), 64.0, 2, 2)
    assert centres.shape == (1, 4, 4, 2)
    assert centres[0, 0, 0].tolist() == [108.0, 208.0]
    assert centres[0, 0, 3].tolist() == [124.0, 224.0]  # patch 0, cell (1, 1)
    assert centres[0, 1, 0].tolist() == [140.0, 208.0]  # patch (0, 1) starts 32 px right
    assert centres[0, 2, 1].tolist() == [124.0, 240.0]  # patch (1, 0), cell (0, 1)


def test_near_points_uses_the_radius():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0]])
    assert near_points(centres, np.array([[0.0, 7.0]]), 8.0).tolist() == [True, False, False]  # 7 and 12.2 away
    assert near_points(centres, np.array([[0.0, 7.0], [29.0, 1.0]]), 8.0).tolist() == [True, False, True]
    assert near_points(centres, np.empty((0, 2)), 8.0).tolist() == [False, False, False]


def test_in_discs_uses_each_disc_radius():
    centres = np.array([[[0.0, 0.0], [10.0, 0.0]], [[50.0, 50.0], [58.0, 50.0]]])
    discs = np.array([[0, 3, 5], [50, 56, 9]])  # (x, y, radius): 3 from the first, 6 and 10 from the second
    assert in_discs(centres, discs).tolist() == [[True, False], [True, False]]
    assert in_discs(centres, np.empty((0, 3))).tolist() == [[False, False], [False, False]]


def test_top_k_hits_counts_the_most_attended_cells():
    attention = np.array([0.5, 0.2, 0.2, 0.1])
    hits = np.array([True, False, True, False])
    valid = np.ones(4, bool)
    one = top_k_hits(attention, hits, valid, 1)
    assert (one.hit_share, one.chance_share, one.ratio) == (1.0, 0.5, 2.0)
    # k = 2: cell 0 plus one place shared by the tied cells 1 and 2 (half a hit on average).
    assert top_k_hits(attention, hits, valid, 2).hit_share == pytest.approx(0.75)
    # Invalid cells neither count as attended nor as chance.
    masked = top_k_hits(attention, hits, np.array([False, True, True, True]), 1)
    assert masked.hit_share == pytest.approx(0.5) and masked.chance_share == pytest.approx(1 / 3)


def test_patch_attention_spread_over_cells_scores_its_cells_evenly():
    # Two patches of four cells; the attended patch holds one hit: top-4 expected share 1/4, whatever the order.
    attention = np.repeat([0.9, 0.1], 4) / 4
    hits = np.array([False, True, False, False, True, True, True, True])
    result = top_k_hits(attention, hits, np.ones(8, bool), 2)
    assert result.hit_share == pytest.approx(0.25) and result.chance_share == pytest.approx(5 / 8)
