"""Is one committed slide whole? Two levels, used by `check`, by `extract` (resume) and by the readers.

- quick (default): the slide's metadata parses, its provenance is complete and its identity equals the store's,
  every array is present with the expected shape and dtype, and every chunk file exists. Reads metadata and lists
  chunk files only, so it costs milliseconds per slide whatever the slide size.
- deep: quick, plus every chunk is read and decoded (zstd checksums catch overwritten or truncated chunks) and
  values are finite with tissue fractions in [0, 1]. Reads the whole slide, about 32 MiB at a time.

`slide_defects` checks a local slide folder; `group_defects` any opened slide group (object stores check the
attempt that the slide's commit marker names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

from mrantool.errors import StoreError
from mrantool.store.schema import (
    ARRAY_DTYPES,
    COORDS,
    OPTIONAL_ARRAYS,
    PROVENANCE_KEYS,
    STORE_PROVENANCE_KEYS,
    TISSUE_ARRAYS,
    Dims,
    identity_differences,
)

SCAN_BYTES = 32 << 20
REDO = "re-run `mrantool extract` (it redoes defective slides) or `mrantool check --repair`"


def read_provenance(slide_dir: Path) -> dict[str, Any]:
    """A committed slide's provenance (its group attributes) without opening its arrays; StoreError if unreadable."""
    path = slide_dir / "zarr.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"Slide metadata {path} is unreadable ({type(exc).__name__}: {exc}); {REDO}.") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
    if not isinstance(attrs, dict):
        raise StoreError(f"Slide metadata {path} is not a zarr group description (it holds "
                         f"{json.dumps(meta)[:40]}); {REDO}.")
    return attrs


def slide_defects(slide_dir: Path, identity: dict[str, Any], *, deep: bool = False) -> list[str]:
    """Every defect of the committed slide in `slide_dir` (empty = whole); never raises for damaged data."""
    try:
        prov = read_provenance(slide_dir)
        group = zarr.open_group(zarr.storage.LocalStore(slide_dir, read_only=True), mode="r")
    except StoreError as exc:
        return [str(exc)]
    except Exception as exc:  # zarr raises many types for damaged metadata
        return [f"unreadable zarr metadata ({type(exc).__name__}: {exc})"]
    return group_defects(group, prov, identity, deep=deep)


def group_defects(group: Any, prov: dict[str, Any], identity: dict[str, Any], *, deep: bool = False) -> list[str]:
    """Every defect of a committed slide's opened zarr group with provenance `prov` (any storage backend)."""
    try:
        present = {name: group[name] for name in group.array_keys()}
    except Exception as exc:  # zarr raises many types for damaged metadata
        return [f"unreadable zarr metadata ({type(exc).__name__}: {exc})"]
    defects = []
    missing = [key for key in (*PROVENANCE_KEYS, *STORE_PROVENANCE_KEYS) if key not in prov]
    if missing:
        defects.append(f"provenance lacks {', '.join(missing)}")
    if "identity" in prov and prov["identity"] != identity:
        diffs = identity_differences(identity, prov["identity"]) if isinstance(prov["identity"], dict) else ["all"]
        defects.append(f"identity differs from the store's: {'; '.join(diffs)}")
    n_bags = prov.get("n_bags")
    if not isinstance(n_bags, int) or isinstance(n_bags, bool):
        n_bags = present[COORDS].shape[0] if COORDS in present else 0
    expected = Dims.from_identity(identity).shapes(n_bags)
    defects.extend(f"unexpected array {name}" for name in sorted(set(present) - set(expected)))
    for name, shape in expected.items():
        if name not in present and name in OPTIONAL_ARRAYS:
            continue
        if name not in present:
            defects.append(f"array {name} is missing")
            continue
        array = present[name]
        if array.shape != shape:
            defects.append(f"{name} has shape {array.shape}, expected {shape}")
        if str(array.dtype) != ARRAY_DTYPES[name]:
            defects.append(f"{name} has dtype {array.dtype}, expected {ARRAY_DTYPES[name]}")
        try:
            if array.nchunks_initialized < array.nchunks:
                defects.append(f"{name} lacks {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks")
            if deep:
                defects.extend(_scan_values(name, array))
        except Exception as exc:  # codec errors on corrupted chunks come in several types
            defects.append(f"{name} has an unreadable chunk ({type(exc).__name__}: {exc})")
    return defects


def _scan_values(name: str, array: Any) -> list[str]:
    """NaN/inf (and, for tissue fractions, values outside [0, 1]) found reading a few chunks at a time."""
    if array.shape[0] == 0:
        return []
    if not np.issubdtype(array.dtype, np.floating):
        array[:]  # decode (checksums) without value checks
        return []
    chunk_bytes = int(np.prod(array.chunks)) * array.dtype.itemsize
    step = array.chunks[0] * max(1, SCAN_BYTES // chunk_bytes)
    nonfinite, out_of_range, first_bad = 0, 0, None
    for start in range(0, array.shape[0], step):
        block = array[start:start + step]
        bad = ~np.isfinite(block)
        if name in TISSUE_ARRAYS:
            out_of_range += int(((block < 0) | (block > 1)).sum())
        count = int(bad.sum())
        if count and first_bad is None:
            first_bad = start + int(np.argwhere(bad)[0][0])
        nonfinite += count
    defects = []
    if nonfinite:
        defects.append(f"{name} has {nonfinite} NaN/inf values (first in bag {first_bad})")
    if out_of_range:
        defects.append(f"{name} has {out_of_range} tissue fractions outside [0, 1]")
    return defects
