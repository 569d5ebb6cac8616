"""Place bags on a slide and measure the tissue in every patch.

Edge behaviour: bags start at level-0 (0, 0) and step by the bag's level-0 size without overlap. A bag that crosses
the right or bottom edge is kept when enough of it is tissue; its pixels outside the slide read as white and its
patches there have tissue fraction 0 (masked out by the models). On a slide narrower or shorter than one bag (a small
image: a tile, ROI or TMA core) a bag's tissue fraction is taken over the part of the bag the slide can fill, so
such an image is judged by its own tissue, not dropped for being small. Cells get their own fractions, measured the
same way on the same mask, then capped on the pixels the encoder reads (`not_glass_share`): at the thumbnail's
resolution a cell spans a few mask pixels, too coarse to see a gap of glass between tissue pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mrantool.slides.tissue import WHITE_LEVEL
from mrantool.tiling.presets import Geometry


@dataclass(frozen=True)
class BagPlan:
    """Where a slide's bags are and how much tissue each patch holds."""

    coords: np.ndarray  # (n_bags, 2) int64 level-0 top-left (x, y)
    bag_size_l0: float  # bag side in level-0 pixels
    patch_tissue: np.ndarray  # (n_bags, grid*grid) float32, row-major patches
    bag_tissue: np.ndarray  # (n_bags,) float32
    n_candidates: int  # bags on the grid before the tissue filter
    cell_tissue: np.ndarray  # (n_bags, grid*grid, cells*cells) float32, row-major cells inside row-major patches

    @property
    def n_bags(self) -> int:
        return len(self.coords)


def bag_size_l0(geometry: Geometry, slide_mpp: float) -> float:
    """Level-0 pixels spanned by one bag side."""
    return geometry.bag_px * geometry.mpp / slide_mpp


def thumbnail_size_for(dimensions: tuple[int, int], geometry: Geometry, slide_mpp: float) -> int:
    """A thumbnail side at which every patch spans at least ~4 pixels (bounded to 512..4096)."""
    patch_l0 = bag_size_l0(geometry, slide_mpp) / geometry.grid
    return int(min(4096, max(512, math.ceil(max(dimensions) / (patch_l0 / 4)))))


def plan_bags(
    dimensions: tuple[int, int],
    slide_mpp: float,
    geometry: Geometry,
    mask: np.ndarray,
    mask_downsample: float,
    min_tissue: float = 0.1,
) -> BagPlan:
    """Grid the slide into bags, measure tissue per patch from a thumbnail mask, keep bags with enough tissue.

    `mask` is a boolean tissue mask of the thumbnail; `mask_downsample` is level-0 pixels per mask pixel.
    A bag is kept when its tissue fraction (mean over its patches, over at most the slide's width and height) is
    at least `min_tissue`.
    """
    w, h = dimensions
    size = bag_size_l0(geometry, slide_mpp)
    nx, ny = math.ceil(w / size - 1e-9), math.ceil(h / size - 1e-9)
    g, c = geometry.grid, geometry.cells
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    per_bag = _fractions(integral, nx, ny, g, size, mask_downsample).reshape(ny * nx, g * g)
    cells = _fractions(integral, nx, ny, g * c, size, mask_downsample)  # (ny, nx, g*c, g*c)
    per_cell = cells.reshape(ny * nx, g, c, g, c).transpose(0, 1, 3, 2, 4).reshape(ny * nx, g * g, c * c)
    fillable = min(size, w) * min(size, h) / (size * size)  # 1 unless the slide is smaller than a bag
    bag_tissue = np.minimum(per_bag.mean(axis=1) / fillable, 1.0)
    keep = bag_tissue >= min_tissue
    iy, ix = np.divmod(np.arange(ny * nx), nx)
    coords = np.stack([np.round(ix * size), np.round(iy * size)], axis=1).astype(np.int64)
    return BagPlan(
        coords=coords[keep],
        bag_size_l0=size,
        patch_tissue=per_bag[keep].astype(np.float32),
        bag_tissue=bag_tissue[keep].astype(np.float32),
        n_candidates=int(ny * nx),
        cell_tissue=per_cell[keep].astype(np.float32),
    )


def _fractions(integral: np.ndarray, nx: int, ny: int, per_side: int, bag_l0: float,
               downsample: float) -> np.ndarray:
    """Tissue fraction of each of `per_side` x `per_side` squares of every bag: (ny, nx, per_side, per_side),
    from the integral image of the mask (squares outside the mask are no tissue)."""
    edges_x, edges_y = _edges(nx, per_side, bag_l0, downsample), _edges(ny, per_side, bag_l0, downsample)
    s = integral[np.ix_(np.clip(edges_y, 0, integral.shape[0] - 1), np.clip(edges_x, 0, integral.shape[1] - 1))]
    counts = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]  # tissue pixels between neighbouring edges
    area = np.outer(np.diff(edges_y), np.diff(edges_x)).astype(np.float64)
    frac = np.where(area > 0, counts / np.maximum(area, 1), 0.0)  # (ny*per_side, nx*per_side)
    return frac.reshape(ny, per_side, nx, per_side).transpose(0, 2, 1, 3)


def _edges(n_bags: int, grid: int, bag_l0: float, downsample: float) -> np.ndarray:
    """Patch edges along one axis in mask pixels (n_bags*grid + 1 values), rounded to whole mask pixels."""
    steps = np.arange(n_bags * grid + 1, dtype=np.float64) * (bag_l0 / grid)
    return np.round(steps / downsample).astype(np.int64)


def patch_coords(plan: BagPlan, geometry: Geometry) -> np.ndarray:
    """Level-0 top-left of every patch: (n_bags, grid*grid, 2), row-major inside each bag."""
    g = geometry.grid
    step = plan.bag_size_l0 / g
    rows, cols = np.divmod(np.arange(g * g), g)
    offsets = np.stack([cols * step, rows * step], axis=1)
    return np.round(plan.coords[:, None, :] + offsets[None]).astype(np.int64)


def not_glass_share(patches: np.ndarray, cells: int) -> np.ndarray:
    """Share of each cell's pixels that are not glass (mean RGB under the tissue detector's white level):
    (..., P, S, S, 3) uint8 patches -> (..., P, cells * cells) float32, cells row-major. Extraction caps each
    cell's thumbnail tissue fraction by it (the thumbnail mask fills holes and gives a cell a few pixels)."""
    p, size = patches.shape[-4], patches.shape[-3]
    side = size // cells
    cut = patches[..., : side * cells, : side * cells, :].reshape(-1, p, cells, side, cells, side, 3)
    not_glass = cut.sum(axis=-1, dtype=np.uint16) < 3 * WHITE_LEVEL
    share = np.count_nonzero(not_glass, axis=(3, 5)) / np.float32(side * side)
    return share.astype(np.float32).reshape(*patches.shape[:-4], p, cells * cells)
