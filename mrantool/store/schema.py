"""The store layout (schema version 2): paths, array names and chunking, identity and provenance rules.

See docs/store-format.md for the on-disk description; this module is the single place that encodes it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import StoreError
from mrantool.slide_ids import validate_slide_id as validate_slide_id  # the one validator, re-exported

SCHEMA_VERSION = 2  # 2: several bags per cell_emb chunk (1: one); arrays record their own chunk shapes
READABLE_SCHEMA_VERSIONS = (1, 2)  # version-1 stores are read (and extended) as they are

SLIDES_DIR = "slides"
STAGING_DIR = "staging"
TRASH_DIR = "trash"
LOCKS_DIR = "locks"
FAILURES_DIR = "failures"
COMMITS_DIR = "commits"  # object stores only: one commit marker per slide

COORDS = "coords"
PATCH_TISSUE = "patch_tissue"
PATCH_EMB = "patch_emb"
CELL_EMB = "cell_emb"
CELL_TISSUE = "cell_tissue"
ARRAY_DTYPES = {COORDS: "int64", PATCH_TISSUE: "float16", PATCH_EMB: "float16", CELL_EMB: "float16",
                CELL_TISSUE: "float16"}
TISSUE_ARRAYS = (PATCH_TISSUE, CELL_TISSUE)  # fractions in [0, 1]
OPTIONAL_ARRAYS = (CELL_TISSUE,)  # absent from slides written before it was recorded: read as None, not a defect

ZSTD_LEVEL = 1  # measured: same ratio as level 3 on fp16 features, ~3x faster to encode
PATCH_CHUNK_INSTANCES = 256  # a patch_emb chunk holds max(1, 256 // P) bags
CELL_CHUNK_BYTES = 4 * 2**20  # a cell_emb chunk holds max(1, 4 MiB // float16 bytes per bag) bags
TABLE_CHUNK_BAGS = 4096  # coords and the tissue fractions are small: many bags per chunk

IDENTITY_KEYS = ("encoder", "weights", "transforms", "embed_dim", "geometry", "preset", "has_cells")
PROVENANCE_KEYS = ("source", "fingerprint", "mpp", "level0_size", "bag_size_l0")
STORE_PROVENANCE_KEYS = ("slide_id", "n_bags", "identity", "geometry", "mrantool_version", "timings", "extracted_at")


def hostname() -> str:
    """This machine's name (or $MRANTOOL_HOSTNAME, e.g. a pod's name), reduced to characters safe in file names."""
    name = os.environ.get("MRANTOOL_HOSTNAME") or socket.gethostname()
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "host"


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (numpy scalars/arrays, tuples and paths converted), for zarr attributes."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"Store metadata must be JSON-serialisable ({exc}); pass plain numbers, strings, "
                         "lists and dicts.") from None


def validate_identity(identity: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """Check that `identity` has the required fields and return it as plain JSON."""
    if not isinstance(identity, dict):
        raise StoreError(f"The identity for store {path} must be a dict with keys {', '.join(IDENTITY_KEYS)}.")
    missing = [key for key in IDENTITY_KEYS if key not in identity]
    if missing:
        raise StoreError(f"The identity for store {path} lacks {', '.join(missing)}; build it with "
                         "mrantool.store.schema.make_identity.")
    geometry = identity["geometry"]
    if not isinstance(geometry, dict) or not all(isinstance(geometry.get(k), int) and geometry[k] > 0
                                                 for k in ("grid", "cells")):
        raise StoreError(f"The identity for store {path} needs geometry.grid and geometry.cells as positive "
                         "integers; pass Geometry.to_dict().")
    if not isinstance(identity["embed_dim"], int) or identity["embed_dim"] <= 0:
        raise StoreError(f"The identity for store {path} needs a positive integer embed_dim.")
    return jsonable(identity)


def make_identity(*, encoder: str, weights: str, transforms: dict[str, Any], embed_dim: int,
                  geometry: dict[str, Any], preset: str | None, has_cells: bool, **extra: Any) -> dict[str, Any]:
    """The identity of a store: what must be equal for two slides' features to be comparable."""
    identity = {"encoder": encoder, "weights": weights, "transforms": transforms, "embed_dim": int(embed_dim),
                "geometry": geometry, "preset": preset, "has_cells": bool(has_cells), **extra}
    return validate_identity(identity, "<new>")


def identity_differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where two identities differ, with both values."""
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        name = f"{prefix}{key}"
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(identity_differences(a, b, prefix=f"{name}."))
        elif a != b:
            diffs.append(f"{name} (store: {a!r}, requested: {b!r})")
    return diffs


@dataclass(frozen=True)
class Dims:
    """Per-bag array dimensions implied by a store identity: P patches, C cells (0 without cells), D dims."""

    n_patches: int
    n_cells: int
    dim: int

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> Dims:
        geometry = identity["geometry"]
        cells = geometry["cells"] ** 2 if identity["has_cells"] else 0
        return cls(n_patches=geometry["grid"] ** 2, n_cells=cells, dim=identity["embed_dim"])

    def shapes(self, n_bags: int) -> dict[str, tuple[int, ...]]:
        """Array name -> shape for a slide with `n_bags` bags."""
        shapes = {COORDS: (n_bags, 2), PATCH_TISSUE: (n_bags, self.n_patches),
                  PATCH_EMB: (n_bags, self.n_patches, self.dim)}
        if self.n_cells:
            shapes[CELL_EMB] = (n_bags, self.n_patches, self.n_cells, self.dim)
            shapes[CELL_TISSUE] = (n_bags, self.n_patches, self.n_cells)
        return shapes

    def chunks(self, n_bags: int) -> dict[str, tuple[int, ...]]:
        """Array name -> chunk shape: about 4 MiB of bags per cell chunk, a few bags per patch chunk, many bags
        per table chunk."""
        bags = {CELL_EMB: CELL_CHUNK_BYTES // max(1, 2 * self.n_patches * self.n_cells * self.dim),
                PATCH_EMB: PATCH_CHUNK_INSTANCES // self.n_patches}
        return {name: (min(n_bags, max(1, bags.get(name, TABLE_CHUNK_BAGS))), *shape[1:])
                for name, shape in self.shapes(n_bags).items()}


@dataclass(frozen=True)
class Layout:
    """Paths inside one store directory."""

    root: Path

    @property
    def slides(self) -> Path:
        return self.root / SLIDES_DIR

    @property
    def staging(self) -> Path:
        return self.root / STAGING_DIR

    @property
    def trash(self) -> Path:
        return self.root / TRASH_DIR

    @property
    def locks(self) -> Path:
        return self.root / LOCKS_DIR

    @property
    def failures(self) -> Path:
        return self.root / FAILURES_DIR

    def slide(self, slide_id: str) -> Path:
        return self.slides / slide_id

    def lock(self, slide_id: str) -> Path:
        return self.locks / f"{slide_id}.lock"

    def failure(self, slide_id: str) -> Path:
        return self.failures / f"{slide_id}.json"

    def committed_ids(self) -> list[str]:
        """Sorted ids of committed slides (directories under slides/ holding group metadata)."""
        if not self.slides.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(self.slides)
                      if not entry.name.startswith(".") and os.path.isfile(os.path.join(entry.path, "zarr.json")))
