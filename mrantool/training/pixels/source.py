"""Pixels of a store's bags, read back from the slide files at the store's geometry (coordinates + provenance).

`BagPixels` reads chosen bags on demand (fine-tuning); `PixelData` reads every bag of a small cohort once and
keeps it in RAM as uint8 within a byte budget (end-to-end training), behind the trainer's `MILData` interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import ConfigError, MrantoolError
from mrantool.extract.dataset import cut_patches
from mrantool.slides.reader import Slide, open_slide
from mrantool.store import FeatureStore
from mrantool.tiling.presets import Geometry, Preset, get_preset
from mrantool.training.data import MILData, tissue_mask

Progress = Callable[[str, dict[str, Any]], None]


def transform_preset(identity: dict[str, Any]) -> Preset:
    """The preset whose geometry, input size and normalisation the store's encoder used."""
    t = identity["transforms"]
    return dataclasses.replace(get_preset(identity["preset"]), geometry=Geometry(**identity["geometry"]),
                               input_px=t["input_px"], mean=tuple(t["mean"]), std=tuple(t["std"]),
                               feature_index=t["feature_index"])


class BagPixels:
    """Reads bags of store slides from their source files at the store's geometry (one handle per slide)."""

    def __init__(self, store: FeatureStore, geometry: Geometry) -> None:
        self.store = store
        self.geometry = geometry
        self._slides: dict[str, Slide] = {}
        self._coords: dict[str, np.ndarray] = {}

    def read(self, slide_id: str, bags: np.ndarray) -> np.ndarray:
        """(len(bags) * P, patch_px, patch_px, 3) uint8 patches, bag after bag, row-major inside a bag."""
        if slide_id not in self._slides:
            prov = self.store.provenance(slide_id)
            source = Path(prov.get("source", ""))
            if not source.is_file():
                raise ConfigError(f"Slide file {source} of store slide '{slide_id}' is missing; training from pixels "
                                  "reads them from the extracted slides, so restore the file at that path.")
            self._slides[slide_id] = open_slide(source, mpp=prov.get("slide_mpp"))
            self._coords[slide_id] = np.asarray(self.store.slide(slide_id).coords[:])
        slide, g = self._slides[slide_id], self.geometry
        out = [cut_patches(slide.read_region_mpp(*map(int, self._coords[slide_id][b]), g.bag_px, g.mpp), g.grid)
               for b in bags]
        return np.ascontiguousarray(np.concatenate(out))

    def close(self) -> None:
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()


class PixelData(MILData):
    """Every bag of some store slides as uint8 pixels in RAM: `read` gives (n, P, h, w, 3) uint8, no cells.

    The pixels are read from the slide files once, when the object is built, after checking that they fit
    `budget_gb`; a slide that cannot be read is named in one error together with the others. The tissue mask
    comes from the store's per-patch tissue fractions, as for cached training.
    """

    def __init__(self, store: FeatureStore, slide_ids: Sequence[str], geometry: Geometry, *, patch_min_tissue: float,
                 budget_gb: float, progress: Progress | None = None) -> None:
        self.store = store
        self.slide_ids = list(slide_ids)
        self.geometry = geometry
        self.in_dim = 3
        self.has_cells = self.cells = False
        g = geometry
        features = {sid: store.slide(sid) for sid in self.slide_ids}
        n_bags = sum(f.n_bags for f in features.values())
        self.nbytes = n_bags * g.n_patches * g.patch_px ** 2 * 3
        if self.nbytes > budget_gb * 2**30:
            raise ConfigError(
                f"The pixels of {len(self.slide_ids)} slides ({n_bags} bags of {g.n_patches} patches of {g.patch_px} "
                f"px) need {self.nbytes / 2**30:.1f} GB of RAM, more than pixel_cache_gb = {budget_gb}; raise "
                "pixel_cache_gb if the machine has the memory, or train on the cache (fit, fit --finetune).")
        self._masks = {sid: tissue_mask(f.patch_tissue[:], patch_min_tissue) for sid, f in features.items()}
        self._pixels: dict[str, np.ndarray] = {}
        reader = BagPixels(store, geometry)
        failed: list[str] = []
        emit = progress or (lambda event, info: None)
        try:
            for i, sid in enumerate(self.slide_ids):
                try:
                    patches = reader.read(sid, np.arange(features[sid].n_bags))
                except MrantoolError as exc:
                    failed.append(f"{sid}: {exc}")
                    continue
                self._pixels[sid] = patches.reshape(features[sid].n_bags, g.n_patches, *patches.shape[1:])
                emit("pixels", {"index": i, "n_slides": len(self.slide_ids), "slide_id": sid})
        finally:
            reader.close()
        if failed:
            raise ConfigError(f"{len(failed)} slide(s) could not be read for training from pixels ("
                              + " | ".join(failed[:3]) + (" | ..." if len(failed) > 3 else "")
                              + "); fix or restore those files, or leave the slides out of the labels file.")

    def n_bags(self, slide_id: str) -> int:
        return self._pixels[slide_id].shape[0]

    def mask(self, slide_id: str) -> np.ndarray:
        return self._masks[slide_id]

    def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, None]:
        return self._pixels[slide_id][index], None

    def in_ram(self) -> bool:
        return True
