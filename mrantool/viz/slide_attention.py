"""A slide's attention from a fit run, placed on the slide: each bag, patch and cell with its level-0 box.

Shared by the QuPath export and the browser viewer. Weights are `heatmap.compose`d shares of the slide's
attention (each level sums to 1 over the slide); `defined` marks the items the head could attend to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrantool.errors import MrantoolError
from mrantool.store import FeatureStore
from mrantool.store.geometry import bag_side_l0
from mrantool.viz.heatmap import (
    DEFAULT_PATCH_MIN_TISSUE,
    LEVELS,
    check_identity,
    compose,
    defined_items,
    load_attention,
    read_run_config,
)


@dataclass(frozen=True)
class SlideAttention:
    """Composed attention of one slide with the geometry to place it (level-0 pixels)."""

    slide_id: str
    head: str
    weights: dict[str, np.ndarray]  # level -> (n_bags,) | (n_bags, P) | (n_bags, P, C)
    defined: dict[str, np.ndarray]  # level -> bool mask of the same shape
    coords: np.ndarray  # (n_bags, 2) level-0 top-left of each bag
    tissue: np.ndarray  # (n_bags, P) tissue fraction of each patch
    bag_l0: float
    grid: int
    cells: int

    @property
    def levels(self) -> list[str]:
        return [level for level in LEVELS if level in self.weights]

    def item_side(self, level: str) -> float:
        """Level-0 side of one item of `level`."""
        return self.bag_l0 / {"bag": 1, "patch": self.grid, "cell": self.grid * self.cells}[level]

    def boxes(self, level: str) -> np.ndarray:
        """Level-0 top-left (x, y) of every item of `level`, shaped like its weights plus a trailing 2."""
        n = len(self.coords)
        corners = self.coords.astype(np.float64)
        if level == "bag":
            return corners
        step = self.bag_l0 / self.grid
        prow, pcol = np.divmod(np.arange(self.grid * self.grid), self.grid)
        patch = corners[:, None, :] + np.stack([pcol * step, prow * step], axis=1)[None]
        if level == "patch":
            return patch
        cstep = step / self.cells
        crow, ccol = np.divmod(np.arange(self.cells * self.cells), self.cells)
        cell_offsets = np.stack([ccol * cstep, crow * cstep], axis=1)
        return (patch[:, :, None, :] + cell_offsets[None, None]).reshape(n, self.grid ** 2, self.cells ** 2, 2)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Each value's percentile among `values`, 0 to 100: the share of the other values strictly below it.

    Ties share the lower percentile, so a slide whose weights are mostly equal (e.g. zero) stays cold rather than
    lighting up; the largest value is at 100 unless it is tied.
    """
    flat = np.asarray(values, np.float64).ravel()
    if flat.size < 2:
        return np.full(np.shape(values), 100.0)
    below = np.searchsorted(np.sort(flat), flat, side="left")
    return (100.0 * below / (flat.size - 1)).reshape(np.shape(values))


def load_slide_attention(run_dir: str | Path, store: FeatureStore, slide_id: str) -> SlideAttention:
    """The run's composed attention for `slide_id`, checked against the store it was fit on."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    check_identity(run, store, run_dir, store.path)
    composed = compose(load_attention(run_dir, slide_id))
    features = store.slide(slide_id)
    geometry = store.identity["geometry"]
    grid, cells = geometry["grid"], geometry["cells"]
    expected = {"bag": (features.n_bags,), "patch": (features.n_bags, grid * grid),
                "cell": (features.n_bags, grid * grid, cells * cells)}
    for level, weights in composed.items():
        if weights.shape != expected[level]:
            raise MrantoolError(f"The {level} attention of '{slide_id}' in run {run_dir} has shape {weights.shape} "
                                f"but store {store.path} implies {expected[level]}; pass the store the run was fit "
                                "on.")
    tissue = np.asarray(features.patch_tissue[:], np.float32)
    min_tissue = float(run.get("config", {}).get("patch_min_tissue", DEFAULT_PATCH_MIN_TISSUE))
    defined = {level: defined_items(level, w, tissue, min_tissue) for level, w in composed.items()}
    return SlideAttention(slide_id, str(run.get("model", "unknown")), composed, defined,
                          np.asarray(features.coords[:], np.int64), tissue,
                          bag_side_l0(features.provenance, slide_id), grid, cells)
