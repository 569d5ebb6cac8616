"""Integrity check of a store: `check_store` lists defects (empty = healthy), `store_warnings` lists leftovers.

Defects: missing or mis-shaped arrays, wrong dtypes, missing chunks, NaN/inf values, tissue fractions outside
[0, 1], incomplete provenance, an identity that differs from the store's, stray entries under slides/, unreadable
failure records. Warnings (not defects): staging groups and trash left by writers, stale locks, failed slides.
Arrays are scanned a few chunks at a time, so memory stays bounded whatever the slide size.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mrantool.errors import StoreError
from mrantool.store.locks import DEFAULT_TTL_S
from mrantool.store.reader import FeatureStore
from mrantool.store.schema import (
    ARRAY_DTYPES,
    COORDS,
    PATCH_TISSUE,
    PROVENANCE_KEYS,
    STORE_PROVENANCE_KEYS,
    identity_differences,
)

SCAN_BYTES = 32 << 20


def check_store(path: str | os.PathLike[str]) -> list[str]:
    """Every defect found in the store at `path`, one sentence each; an empty list means healthy."""
    try:
        store = FeatureStore.open(path)
    except StoreError as exc:
        return [str(exc)]
    defects = _stray_entries(store)
    for slide_id in store.slide_ids():
        defects.extend(f"slide '{slide_id}': {defect}" for defect in _check_slide(store, slide_id))
    defects.extend(f"failure record for '{slide_id}' is unreadable: {record['message']}"
                   for slide_id, record in store.failures().items() if "source" not in record)
    return defects


def store_warnings(path: str | os.PathLike[str], lock_ttl_s: float = DEFAULT_TTL_S) -> list[str]:
    """Things worth knowing that do not make the store unhealthy: leftovers, stale locks, failed slides."""
    try:
        store = FeatureStore.open(path, lock_ttl_s=lock_ttl_s)
    except StoreError:
        return []
    warnings = []
    for name, dead in store.leftovers():
        state = ("left by a dead writer; opening the store for writing removes it" if dead
                 else "its writer is still running")
        warnings.append(f"{name}: {state}.")
    warnings.extend(f"lock on '{lock['slide_id']}' is stale (pid {lock['pid']} on {lock['host']}); the next "
                    f"extract takes it over, or remove it with `mrantool check {store.path} --clear-stale-locks`."
                    for lock in store.locks() if lock["stale"])
    warnings.extend(f"slide '{slide_id}' failed: {record.get('message')}"
                    for slide_id, record in store.failures().items())
    return warnings


def _stray_entries(store: FeatureStore) -> list[str]:
    return [f"{name} is not a committed slide group; delete it." for name in store.backend.stray_entries()]


def _check_slide(store: FeatureStore, slide_id: str) -> list[str]:
    try:
        found = store.backend.slide_group(slide_id)
        if found is None:
            return ["its commit names data that is missing"]
        group = found[0]
        prov = dict(group.attrs)
    except (OSError, ValueError) as exc:
        return [f"unreadable group metadata ({exc})"]
    defects = []
    missing = [key for key in (*PROVENANCE_KEYS, *STORE_PROVENANCE_KEYS) if key not in prov]
    if missing:
        defects.append(f"provenance lacks {', '.join(missing)}")
    if "identity" in prov and prov["identity"] != store.identity:
        diffs = identity_differences(store.identity, prov["identity"])
        defects.append(f"identity differs from the store's: {'; '.join(diffs)}")
    present = set(group.array_keys())
    n_bags = prov.get("n_bags")
    if not isinstance(n_bags, int):
        n_bags = group[COORDS].shape[0] if COORDS in present else 0
    expected = store.dims.shapes(n_bags)
    defects.extend(f"unexpected array {name}" for name in sorted(present - set(expected)))
    for name, shape in expected.items():
        if name not in present:
            defects.append(f"array {name} is missing")
            continue
        array = group[name]
        if array.shape != shape:
            defects.append(f"{name} has shape {array.shape}, expected {shape}")
        if str(array.dtype) != ARRAY_DTYPES[name]:
            defects.append(f"{name} has dtype {array.dtype}, expected {ARRAY_DTYPES[name]}")
        if array.nchunks_initialized < array.nchunks:
            defects.append(f"{name} lacks {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks")
        try:
            defects.extend(_scan_values(name, array))
        except Exception as exc:  # codec errors on corrupted chunks come in several types
            defects.append(f"{name} has an unreadable chunk ({type(exc).__name__}: {exc})")
    return defects


def _scan_values(name: str, array: Any) -> list[str]:
    """NaN/inf (and, for tissue fractions, values outside [0, 1]) found reading a few chunks at a time."""
    if not np.issubdtype(array.dtype, np.floating) or array.shape[0] == 0:
        return []
    chunk_bytes = int(np.prod(array.chunks)) * array.dtype.itemsize
    step = array.chunks[0] * max(1, SCAN_BYTES // chunk_bytes)
    nonfinite, out_of_range, first_bad = 0, 0, None
    for start in range(0, array.shape[0], step):
        block = array[start:start + step]
        bad = ~np.isfinite(block)
        if name == PATCH_TISSUE:
            bad_range = (block < 0) | (block > 1)
            out_of_range += int(bad_range.sum())
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

