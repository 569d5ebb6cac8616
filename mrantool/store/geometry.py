"""Where each stored patch lies on its slide, in level-0 pixels, from a slide's bag corners and provenance.

Bags are squares of `bag_size_l0` level-0 pixels at `coords` (top-left), cut into grid x grid patches in
row-major order (`p = row * grid + col`), each cut into cells x cells cells, row-major too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrantool.errors import StoreError


def bag_side_l0(provenance: dict[str, Any], slide_id: str) -> float:
    """A slide's bag side in level-0 pixels; StoreError when the store does not know it (micrometre imports)."""
    side = provenance.get("bag_size_l0")
    if not side or not float(side) > 0:
        raise StoreError(f"Slide '{slide_id}' has no bag size in level-0 pixels (imported with micrometre or no "
                         "coordinates); re-import its h5 file with --mpp so positions are in pixels.")
    return float(side)


def patch_corners(coords: np.ndarray, bag_l0: float, grid: int) -> np.ndarray:
    """Level-0 top-left (x, y) of every patch: (n_bags, grid*grid, 2) float64, row-major inside each bag."""
    step = bag_l0 / grid
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    offsets = np.stack([cols * step, rows * step], axis=1)
    return np.asarray(coords, np.float64)[:, None, :] + offsets[None]


def locate_patch(coords: np.ndarray, bag_l0: float, grid: int, x: float, y: float) -> tuple[int, int] | None:
    """(bag, patch) under the level-0 point (x, y), or None when no bag covers it."""
    c = np.asarray(coords, np.float64)
    inside = np.nonzero((c[:, 0] <= x) & (x < c[:, 0] + bag_l0) & (c[:, 1] <= y) & (y < c[:, 1] + bag_l0))[0]
    if not len(inside):
        return None
    bag = int(inside[0])
    step = bag_l0 / grid
    col = min(grid - 1, int((x - c[bag, 0]) // step))
    row = min(grid - 1, int((y - c[bag, 1]) // step))
    return bag, row * grid + col


def cell_centres(coords: np.ndarray, bag_l0: float, grid: int, cells: int) -> np.ndarray:
    """Level-0 (x, y) centre of every cell: (n_bags, grid*grid, cells*cells, 2) float64, row-major at both levels."""
    step = bag_l0 / grid / cells
    rows, cols = np.divmod(np.arange(cells * cells), cells)
    offsets = np.stack([(cols + 0.5) * step, (rows + 0.5) * step], axis=1)
    return patch_corners(coords, bag_l0, grid)[:, :, None, :] + offsets[None, None]
