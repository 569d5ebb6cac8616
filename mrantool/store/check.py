"""Integrity check of a store: `check_store` lists defects (empty = healthy), `store_warnings` lists leftovers,
`repair_store` takes defective slides out so that the next `extract` redoes them.

Defects: per slide, what `health.slide_defects` finds (quick: metadata, provenance, identity, arrays, chunk files;
deep: also every chunk decoded and values finite); stray entries under slides/; unreadable failure records.
Warnings (not defects): staging groups and trash left by writers, stale locks, failed slides.
"""

from __future__ import annotations

import os

from mrantool.errors import StoreError
from mrantool.store.locks import DEFAULT_TTL_S
from mrantool.store.reader import FeatureStore
from mrantool.store.writer import record_failure


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
    """Take every defective slide out of the store (local: out of `slides/`; object storage: its commit marker
    and data) and record it as failed, so that `extract` redoes it.

    Returns slide_id -> its defects. Other slides are not touched.
    """
    store = FeatureStore.open(path, writable=True)
    defective = store.defective(deep=deep)
    for slide_id, found in defective.items():
        store.backend.retract(slide_id)
        record_failure(store.backend, slide_id, "", f"removed by `mrantool check --repair` ({'; '.join(found)}); "
                       "re-run `mrantool extract` on its slide file to redo it.")
    return defective


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
