"""Bags for training and evaluation: slides stream from a store through a RAM cache, or come from arrays.

The trainer sees only `MILData`: slide ids, bag counts, `read(slide_id, index)` -> arrays in the source's
float dtype (float16 from a store: converted to float32 only on the device), the tissue mask and, for heads that
use cells, the cells' tissue mask. Nothing here
assumes coordinates or a geometry, so Musk-style bags (one bag of N instances per "slide", N varying) work
through `ArrayData`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mrantool.errors import ConfigError, StoreError
from mrantool.models.base import MILHead
from mrantool.store import FeatureStore, SlideFeatures
from mrantool.store.health import REDO

CHUNK_BYTES = 256 * 2**20  # bags are read (and converted to float32) in pieces of about this many fp16 bytes
Entry = tuple[np.ndarray, np.ndarray | None]
MIN_TISSUE_WEIGHT = 1e-3  # a kept cell's smallest tissue weight, so no kept cell or patch weighs exactly 0


@dataclass
class Bags:
    """Some or all bags of one slide as tensors: patches (n, P, D), cells (n, P, C, D) | None, mask (n, P),
    cell_mask (n, P, C) | None (None: every cell of a valid patch counts)."""

    patches: Tensor
    cells: Tensor | None
    mask: Tensor
    index: np.ndarray  # which bags of the slide, in order
    cell_mask: Tensor | None = None


def tissue_mask(patch_tissue: np.ndarray, threshold: float) -> np.ndarray:
    """Patches with at least `threshold` tissue; a bag with none keeps its most-tissue patch."""
    tissue = np.nan_to_num(np.asarray(patch_tissue, dtype=np.float32), nan=0.0)
    mask = tissue >= threshold
    empty = ~mask.any(axis=1)
    mask[np.flatnonzero(empty), tissue[empty].argmax(axis=1)] = True
    return mask


def cell_tissue_mask(cell_tissue: np.ndarray, threshold: float, weights: bool = False) -> np.ndarray:
    """(n_bags, P, C) cells with at least `threshold` tissue; a patch with none keeps its most-tissue cell. Bool
    flags, or with `weights` the cells' tissue fractions (at least MIN_TISSUE_WEIGHT) there and 0 elsewhere."""
    tissue = np.nan_to_num(np.asarray(cell_tissue, dtype=np.float32), nan=0.0)
    mask = tissue >= threshold
    np.put_along_axis(mask, tissue.argmax(-1)[..., None], True, axis=-1)
    return np.where(mask, np.maximum(tissue, MIN_TISSUE_WEIGHT), 0.0).astype(np.float32) if weights else mask


def sample_bags(n_bags: int, max_bags: int, rng: np.random.Generator) -> np.ndarray | None:
    """A sorted random subset of `max_bags` bag indices, or None (all bags) when the slide is small enough."""
    if n_bags <= max_bags:
        return None
    return np.sort(rng.choice(n_bags, size=max_bags, replace=False))


class LRUCache:
    """Least-recently-used cache of numpy entries with a byte budget; an entry larger than it is not kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[object, tuple[Entry, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: object) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: object, entry: Entry) -> None:
        size = sum(a.nbytes for a in entry if a is not None)
        if size > self.budget or key in self._items:
            return
        while self.nbytes + size > self.budget:
            _, (_, old) = self._items.popitem(last=False)
            self.nbytes -= old
            self.evictions += 1
        self._items[key] = (entry, size)
        self.nbytes += size


class MILData(ABC):
    """Slides as bags. `cells` says whether cell embeddings are loaded (only for heads that need them).

    `fold_dependent` data changes with the fold being trained (it follows fit's fold_start events), so its folds
    are trained one at a time instead of together.
    """

    slide_ids: list[str]
    in_dim: int
    has_cells: bool
    cells: bool
    fold_dependent: bool = False

    @abstractmethod
    def n_bags(self, slide_id: str) -> int:
        """Number of bags of a slide."""

    @abstractmethod
    def mask(self, slide_id: str) -> np.ndarray:
        """(n_bags, P) bool tissue mask of a slide."""

    def cell_mask(self, slide_id: str) -> np.ndarray | None:
        """(n_bags, P, C) bool: the cells with enough tissue to count, or None when every cell counts; float32
        tissue fractions instead (0: does not count) when the data weights cells by tissue (`tissue_weights`)."""
        return None

    @abstractmethod
    def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(patches (n, P, D), cells (n, P, C, D) | None) of the bags `index` as float16 or float32 arrays;
        cells only when this data loads them and `cells` is True."""

    def bag_values(self, slide_id: str) -> int:
        """Numbers in one bag of a slide as `read` returns it (patches, plus cells when loaded)."""
        patches, cells = self.read(slide_id, np.arange(1))
        return patches[0].size + (0 if cells is None else cells[0].size)

    def notes(self) -> list[str]:
        """Things a user should know about this data before training (printed by fit)."""
        return []

    def in_ram(self) -> bool:
        """Whether every bag is in RAM already (reads then cost too little to prepare them in a thread)."""
        return False

    def check_head(self, head: MILHead) -> None:
        """Raise the head's own ConfigError when it needs cells that this data does not have."""
        if head.needs_cells and not self.has_cells:
            head.check_inputs(torch.zeros(1, 1, self.in_dim), None, None)

    def bags(self, slide_id: str, index: np.ndarray | None = None,
             device: str | torch.device = "cpu") -> Bags:
        """Bags `index` (all when None) of a slide as float32 tensors on `device` (converted there)."""
        index = np.arange(self.n_bags(slide_id)) if index is None else np.asarray(index, dtype=np.int64)
        patches, cells = self.read(slide_id, index)
        cell_mask = None if cells is None else self.cell_mask(slide_id)
        return Bags(
            patches=torch.from_numpy(patches).to(device).float(),
            cells=None if cells is None else torch.from_numpy(cells).to(device).float(),
            mask=torch.from_numpy(self.mask(slide_id)[index]).to(device),
            index=index,
            cell_mask=None if cell_mask is None else torch.from_numpy(cell_mask[index]).to(device),
        )


class StoreData(MILData):
    """Bags read from a `FeatureStore` through an LRU cache of float16 bags (`cache_gb`).

    When the cohort fits the budget every bag stays in RAM after its first read; otherwise the least
    recently used bags are dropped (`cohort_bytes()` against `cache.budget` tells which). Reads go in chunks
    of about CHUNK_BYTES. Patch-only reads (`cells=False`) use cached bags but never cache partial ones.
    """

    def __init__(self, store: FeatureStore, slide_ids: Sequence[str], *, cells: bool, patch_min_tissue: float,
                 cache_gb: float, cell_min_tissue: float = 0.0, tissue_weights: bool = False) -> None:
        self.store = store
        self.slide_ids = list(slide_ids)
        self.in_dim = store.dims.dim
        self.has_cells = store.dims.n_cells > 0
        self.cells = cells and self.has_cells
        if tissue_weights and not self.cells:
            where = "this head reads no cells" if self.has_cells else f"store {store.path} has none"
            raise ConfigError(f"tissue_weights weighs cells, patches and bags by their tissue through the cell level, "
                              f"but {where}; use a head with cells (mran) on a store with cells, or set "
                              "tissue_weights = false (`fit --glass` sets it).")
        self.patch_min_tissue, self.cell_min_tissue = patch_min_tissue, cell_min_tissue
        self.tissue_weights = tissue_weights
        self.cache = LRUCache(int(cache_gb * 2**30))
        self._slides: dict[str, SlideFeatures] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._cell_masks: dict[str, np.ndarray | None] = {}
        self._bags_total: int | None = None

    def _slide(self, slide_id: str) -> SlideFeatures:
        if slide_id not in self._slides:
            self._slides[slide_id] = self.store.slide(slide_id)
        return self._slides[slide_id]

    def n_bags(self, slide_id: str) -> int:
        return self._slide(slide_id).n_bags

    def mask(self, slide_id: str) -> np.ndarray:
        if slide_id not in self._masks:
            self._masks[slide_id] = tissue_mask(self._slide(slide_id).patch_tissue[:], self.patch_min_tissue)
        return self._masks[slide_id]

    def cell_mask(self, slide_id: str) -> np.ndarray | None:
        """From the slide's cell tissue fractions (`cell_min_tissue`, `tissue_weights`); None when neither is set
        or the slide has none."""
        if slide_id not in self._cell_masks:
            tissue = self._slide(slide_id).cell_tissue
            if self.tissue_weights and tissue is None:
                raise ConfigError(f"Slide {slide_id} of store {self.store.path} has no cell tissue fractions, which "
                                  "tissue_weights needs (it was written before they were kept); extract the slides "
                                  "into a new store, or set tissue_weights = false (`fit --glass` sets it).")
            use = self.cells and (self.cell_min_tissue > 0 or self.tissue_weights) and tissue is not None
            self._cell_masks[slide_id] = (cell_tissue_mask(tissue[:], self.cell_min_tissue, self.tissue_weights)
                                          if use else None)
        return self._cell_masks[slide_id]

    def bag_values(self, slide_id: str) -> int:
        slide = self._slide(slide_id)
        return slide.n_patches * self.in_dim * (1 + (slide.n_cells if self.cells else 0))

    def cohort_bytes(self) -> int:
        """float16 bytes of every bag of this data's slides as the cache holds them (cells when loaded)."""
        return sum(2 * self.n_bags(slide_id) * self.bag_values(slide_id) for slide_id in self.slide_ids)

    def in_ram(self) -> bool:
        if self._bags_total is None:
            self._bags_total = sum(self.n_bags(slide_id) for slide_id in self.slide_ids)
        return len(self.cache) >= self._bags_total

    def notes(self) -> list[str]:
        size, budget = self.cohort_bytes(), self.cache.budget
        if size <= budget:
            return []
        what = "patch and cell embeddings" if self.cells else "patch embeddings"
        return [f"The {what} of these {len(self.slide_ids)} slides take {_size(size)} in float16 but cache_gb "
                f"holds {_size(budget)}, so every epoch re-reads about {_size(size - budget)} from "
                f"{self.store.path}; set cache_gb to {math.ceil(size / 2**30 * 10) / 10:g} or more if RAM allows."]

    def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        slide = self._slide(slide_id)
        with_cells = self.cells and cells
        n, p, d = len(index), slide.n_patches, self.in_dim
        patches = np.empty((n, p, d), np.float16)
        cell_out = np.empty((n, p, slide.n_cells, d), np.float16) if with_cells else None
        per_bag = 2 * p * d * (1 + (slide.n_cells if with_cells else 0))
        step = max(1, CHUNK_BYTES // per_bag)
        for start in range(0, n, step):
            for j, (pe, ce) in enumerate(self._fetch(slide, index[start:start + step], with_cells), start):
                patches[j] = pe
                if cell_out is not None:
                    cell_out[j] = ce
        return patches, cell_out

    def _fetch(self, slide: SlideFeatures, index: np.ndarray, with_cells: bool) -> list[Entry]:
        """float16 bags from the cache, reading the missing ones from the store in one selection."""
        keys = [(slide.slide_id, int(b)) for b in index]
        entries = [self.cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            wanted = index[missing]
            try:
                patches = _take(slide.patch_emb, wanted)
                cells = _take(slide.cell_emb, wanted) if with_cells else None
            except Exception as exc:  # codec and checksum errors come in several types
                raise StoreError(f"Slide '{slide.slide_id}' at {slide.path} has a damaged chunk "
                                 f"({type(exc).__name__}); {REDO}.") from None
            if not (np.isfinite(patches).all() and (cells is None or np.isfinite(cells).all())):
                raise StoreError(f"Slide '{slide.slide_id}' at {slide.path} holds NaN/inf features (a missing or "
                                 f"damaged chunk); {REDO}.")
            for j, i in enumerate(missing):
                entry = (patches[j].copy(), None if cells is None else cells[j].copy())
                entries[i] = entry
                if with_cells or not self.cells:  # a patch-only entry would lack the cells later reads need
                    self.cache.put(keys[i], entry)
        return entries  # type: ignore[return-value]


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB" if n_bytes >= 2**30 / 100 else f"{n_bytes / 2**20:.2f} MB"


def _take(array: object, index: np.ndarray) -> np.ndarray:
    """Rows `index` of a zarr array as float16: a slice when contiguous, else an orthogonal selection."""
    lo, hi = int(index[0]), int(index[-1]) + 1
    rows = array[lo:hi] if hi - lo == len(index) and np.all(np.diff(index) == 1) else array.oindex[index]
    return np.asarray(rows, dtype=np.float16)


class ArrayData(MILData):
    """Slides from in-memory arrays: `patches[id] (n_bags, P, D)`, optional `cells[id] (n_bags, P, C, D)` and
    `masks[id] (n_bags, P)` (all True when absent). P may differ between slides; a bag of N instances
    without geometry is `x[None]` (1, N, D)."""

    def __init__(self, patches: Mapping[str, np.ndarray], cells: Mapping[str, np.ndarray] | None = None,
                 masks: Mapping[str, np.ndarray] | None = None) -> None:
        self.slide_ids = list(patches)
        if not self.slide_ids:
            raise ConfigError("ArrayData got no slides; pass a mapping slide_id -> (n_bags, P, D) array.")
        self._patches = {k: np.asarray(v) for k, v in patches.items()}
        self._cells = None if cells is None else {k: np.asarray(cells[k]) for k in self.slide_ids}
        masks = masks or {}
        self._masks = {k: np.asarray(masks[k], bool) if k in masks else np.ones(v.shape[:2], bool)
                       for k, v in self._patches.items()}
        dims = {v.shape[-1] for v in self._patches.values()}
        if len(dims) != 1 or any(v.ndim != 3 for v in self._patches.values()):
            raise ConfigError(f"ArrayData patches must all be (n_bags, P, D) with one D, got D in "
                              f"{sorted(dims)}; pass features from one encoder.")
        for k, v in self._patches.items():
            c = None if self._cells is None else self._cells[k]
            bad_cells = c is not None and (c.ndim != 4 or c.shape[:2] != v.shape[:2])
            if self._masks[k].shape != v.shape[:2] or bad_cells:
                raise ConfigError(f"ArrayData slide {k!r}: mask or cells do not match patches {v.shape}; "
                                  "pass masks (n_bags, P) and cells (n_bags, P, C, D).")
            if not self._masks[k].any():  # a batch would train on it silently; one slide alone raises
                raise ConfigError(f"ArrayData slide {k!r} has no True in its mask (no tissue patch); drop the "
                                  "slide or fix its mask.")
        self.in_dim = dims.pop()
        self.has_cells = self.cells = self._cells is not None

    def n_bags(self, slide_id: str) -> int:
        return self._patches[slide_id].shape[0]

    def in_ram(self) -> bool:
        return True

    def mask(self, slide_id: str) -> np.ndarray:
        return self._masks[slide_id]

    def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        patches = _floating(self._patches[slide_id][index])
        if not (self.cells and cells) or self._cells is None:
            return patches, None
        return patches, _floating(self._cells[slide_id][index])


def _floating(array: np.ndarray) -> np.ndarray:
    """float16/float32 arrays as they are, anything else as float32."""
    return array if array.dtype in (np.float16, np.float32) else array.astype(np.float32)
