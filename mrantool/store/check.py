"""Integrity check of a store: `check_store` lists defects (empty = healthy), `store_warnings` lists leftovers,
`repair_store` takes defective slides out so that the next `extract` redoes them.

Defects: per slide, what `health.slide_defects` finds (quick: metadata, provenance, identity, arrays, chunk files;
deep: also every chunk decoded and values finite); stray entries under slides/; unreadable failure records.
Warnings (not defects): staging groups and trash left by writers, stale locks, failed slides.
"""

from __future__ import annotations

import os
import shutil

from mrantool.errors import StoreError
from mrantool.store.locks import owner_is_dead, owner_tag
from mrantool.store.reader import FeatureStore
from mrantool.store.writer import leftovers, record_failure


def check_store(path: str | os.PathLike[str], *, deep: bool = False) -> list[str]:
    """Every defect found in the store at `path`, one sentence each; an empty list means healthy.

    Quick by default (metadata and chunk presence); `deep` also reads and decodes every chunk.
    """
    try:
        store = FeatureStore.open(path)
    except StoreError as exc:
        return [str(exc)]
    defects = _stray_entries(store)
    for slide_id, found in store.defective(deep=deep).items():
        defects.extend(f"slide '{slide_id}': {defect}" for defect in found)
    defects.extend(f"failure record for '{slide_id}' is unreadable: {record['message']}"
                   for slide_id, record in store.failures().items() if "source" not in record)
    return defects


def repair_store(path: str | os.PathLike[str], *, deep: bool = False) -> dict[str, list[str]]:
    """Remove every defective slide from `slides/` and record it as failed, so that `extract` redoes it.

    Returns slide_id -> its defects. Other slides are not touched.
    """
    store = FeatureStore.open(path, writable=True)
    defective = store.defective(deep=deep)
    for slide_id, found in defective.items():
        aside = store.layout.trash / f"{slide_id}.{owner_tag()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(store.layout.slide(slide_id), aside)
        shutil.rmtree(aside, ignore_errors=True)
        record_failure(store.layout, slide_id, "", f"removed by `mrantool check --repair` ({'; '.join(found)}); "
                       "re-run `mrantool extract` on its slide file to redo it.")
    return defective


def store_warnings(path: str | os.PathLike[str]) -> list[str]:
    """Things worth knowing that do not make the store unhealthy: leftovers, stale locks, failed slides."""
    try:
        store = FeatureStore.open(path)
    except StoreError:
        return []
    warnings = []
    for leftover in leftovers(store.layout):
        dead = owner_is_dead(leftover.name, leftover.stat().st_mtime, store.lock_max_age_s)
        state = ("left by a dead writer; opening the store for writing removes it" if dead
                 else "its writer is still running")
        warnings.append(f"{leftover.relative_to(store.path)}: {state}.")
    warnings.extend(f"lock on '{lock['slide_id']}' is stale (pid {lock['pid']} on {lock['host']}); it is broken "
                    "automatically, or clear it with store.clear_stale_locks()." for lock in store.locks()
                    if lock["stale"])
    warnings.extend(f"slide '{slide_id}' failed: {record.get('message')}"
                    for slide_id, record in store.failures().items())
    return warnings


def _stray_entries(store: FeatureStore) -> list[str]:
    slides = store.layout.slides
    if not slides.is_dir():
        return []
    committed = set(store.slide_ids())
    return [f"slides/{entry.name} is not a committed slide group; delete it." for entry in os.scandir(slides)
            if entry.name != "zarr.json" and entry.name not in committed]
