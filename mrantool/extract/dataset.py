"""DataLoader side of extraction: read one bag region per item at the target mpp, cut it into patches, and measure
the share of each cell's pixels that are not glass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mrantool.errors import SlideError
from mrantool.slides.reader import Slide, open_slide
from mrantool.tiling.geometry import not_glass_share
from mrantool.tiling.presets import Geometry


@dataclass(frozen=True)
class BagItem:
    """One bag to read: which slide (index into the run's list), which bag, where (level-0 px), the slide's mpp."""

    slide_index: int
    bag_index: int
    x0: int
    y0: int
    slide_mpp: float


def cut_patches(region: np.ndarray, grid: int) -> np.ndarray:
    """(S, S, 3) bag region -> (grid*grid, S/grid, S/grid, 3) patches in row-major order (a view, no copy)."""
    side = region.shape[0] // grid
    return region.reshape(grid, side, grid, side, 3).swapaxes(1, 2).reshape(grid * grid, side, side, 3)


class BagRegions(Dataset):
    """Items are `BagItem`s; each worker keeps its own OpenSlide handles (never shared across processes)."""

    def __init__(self, paths: list[Path], geometry: Geometry) -> None:
        self.paths = paths
        self.geometry = geometry
        self._handles: dict[int, Slide] = {}

    def __len__(self) -> int:  # items come from the batch sampler, not from indices
        return 0

    def _slide(self, index: int, mpp: float) -> Slide:
        if index not in self._handles:
            for old in list(self._handles):  # one open slide per worker at a time: bounded memory
                self._handles.pop(old).close()
            self._handles[index] = open_slide(self.paths[index], mpp=mpp)
        return self._handles[index]

    def __getitem__(self, item: BagItem) -> dict:
        g = self.geometry
        try:
            region = self._slide(item.slide_index, item.slide_mpp).read_region_mpp(item.x0, item.y0, g.bag_px, g.mpp)
        except SlideError as exc:
            return {"item": item, "error": str(exc)}
        patches = cut_patches(region, g.grid)
        return {"item": item, "patches": torch.from_numpy(np.ascontiguousarray(patches)),
                "not_glass": torch.from_numpy(not_glass_share(patches, g.cells))}


def collate_bags(samples: list[dict]) -> dict:
    """Stack the bags of one batch; errors travel along so the main process can fail just that slide."""
    errors = [s for s in samples if "error" in s]
    good = [s for s in samples if "error" not in s]
    return {
        "items": [s["item"] for s in good],
        "patches": torch.stack([s["patches"] for s in good]) if good else None,
        "not_glass": torch.stack([s["not_glass"] for s in good]) if good else None,
        "errors": [(s["item"], s["error"]) for s in errors],
    }
