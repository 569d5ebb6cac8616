"""`FeatureStore`: open or create a store, read committed slides lazily, and hand out writers and locks."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mrantool import __version__
from mrantool.errors import StoreError
from mrantool.slide_ids import case_twin
from mrantool.store import locks as _locks
from mrantool.store.backends import Backend, PosixBackend, open_backend
from mrantool.store.health import REDO, read_provenance
from mrantool.store.locks import DEFAULT_TTL_S, SlideLock
from mrantool.store.schema import (
    CELL_EMB,
    CELL_TISSUE,
    COORDS,
    PATCH_EMB,
    PATCH_TISSUE,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    Dims,
    Layout,
    identity_differences,
    jsonable,
    validate_identity,
    validate_slide_id,
)
from mrantool.store.writer import SlideWriter, record_failure


class SlideFeatures:
    """One committed slide: lazy zarr arrays plus provenance; reads load only what they index."""

    def __init__(self, slide_id: str, group: Any, location: str) -> None:
        self.slide_id = slide_id
        self.path = location
        try:
            self.provenance: dict[str, Any] = dict(group.attrs)
            missing = [name for name in (COORDS, PATCH_TISSUE, PATCH_EMB) if name not in group]
            arrays = {name: group.get(name) for name in (COORDS, PATCH_TISSUE, PATCH_EMB, CELL_EMB, CELL_TISSUE)}
        except Exception as exc:  # zarr raises many types for damaged metadata
            raise StoreError(f"Slide '{slide_id}' at {location} has unreadable metadata ({type(exc).__name__}); "
                             f"{REDO}.") from None
        if missing:
            raise StoreError(f"Slide '{slide_id}' at {location} lacks {', '.join(missing)}; {REDO}.")
        self.coords = arrays[COORDS]
        self.patch_tissue = arrays[PATCH_TISSUE]
        self.patch_emb = arrays[PATCH_EMB]
        self.cell_emb = arrays[CELL_EMB]
        self.cell_tissue = arrays[CELL_TISSUE]  # (n_bags, P, C) fractions; None in slides written before it was kept

    @property
    def n_bags(self) -> int:
        return self.patch_emb.shape[0]

    @property
    def n_patches(self) -> int:
        return self.patch_emb.shape[1]

    @property
    def n_cells(self) -> int:
        return 0 if self.cell_emb is None else self.cell_emb.shape[2]

    @property
    def dim(self) -> int:
        return self.patch_emb.shape[2]

    def _bag(self, bag: int) -> int:
        if not 0 <= bag < self.n_bags:
            raise StoreError(f"Bag {bag} is outside slide '{self.slide_id}' ({self.n_bags} bags); use 0.."
                             f"{self.n_bags - 1}.")
        return int(bag)

    def _read(self, array: Any, index: Any) -> np.ndarray:
        try:
            return array[index]
        except Exception as exc:  # codec and checksum errors come in several types
            raise StoreError(f"Slide '{self.slide_id}' at {self.path} has a damaged chunk ({type(exc).__name__}: "
                             f"{exc}); {REDO}.") from None

    def read_bag(self, bag: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(patch embeddings (P, D), cell embeddings (P, C, D) or None) of one bag."""
        bag = self._bag(bag)
        cells = None if self.cell_emb is None else self._read(self.cell_emb, bag)
        return self._read(self.patch_emb, bag), cells

    def read_patches(self) -> np.ndarray:
        """All patch embeddings of the slide, (n_bags, P, D) float16."""
        return self._read(self.patch_emb, slice(None))

    def read_cells(self, bag: int, patch: int) -> np.ndarray:
        """Cell embeddings (C, D) of one patch."""
        if self.cell_emb is None:
            raise StoreError(f"Slide '{self.slide_id}' at {self.path} has no cell embeddings (imported or "
                             "patch-only store); use a head that needs only patches.")
        if not 0 <= patch < self.n_patches:
            raise StoreError(f"Patch {patch} is outside a bag of {self.n_patches} patches; use 0.."
                             f"{self.n_patches - 1}.")
        return self._read(self.cell_emb, (self._bag(bag), int(patch)))

    def __repr__(self) -> str:
        return (f"SlideFeatures({self.slide_id!r}, n_bags={self.n_bags}, P={self.n_patches}, C={self.n_cells}, "
                f"D={self.dim})")


class FeatureStore:
    """One store per (cohort, encoder, geometry); see docs/store-format.md for the layout.

    `path` is a local path or an fsspec URL (s3://bucket/cohort.zarr, gs://..., az://...; http(s):// to read).
    """

    def __init__(self, backend: Backend, attrs: dict[str, Any], writable: bool, lock_ttl_s: float) -> None:
        self.backend = backend
        self.path: Any = backend.path if isinstance(backend, PosixBackend) else backend.root
        self.identity: dict[str, Any] = attrs["identity"]
        self.schema_version: int = attrs["schema_version"]
        self.mrantool_version: str | None = attrs.get("mrantool_version")
        self.created: str | None = attrs.get("created")
        self.dims = Dims.from_identity(self.identity)
        self.writable = writable
        self.lock_ttl_s = lock_ttl_s
        self._heartbeat = _locks.Heartbeat(lock_ttl_s)

    @property
    def layout(self) -> Layout:
        """The directory layout of a local store (StoreError for object stores)."""
        if not isinstance(self.backend, PosixBackend):
            raise StoreError(f"Store {self.path} is on object storage; it has no local directory layout.")
        return self.backend.layout

    @property
    def is_local(self) -> bool:
        return isinstance(self.backend, PosixBackend)

    # --- opening -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], identity: dict[str, Any], *,
               lock_ttl_s: float = DEFAULT_TTL_S) -> FeatureStore:
        """Create a store at `path`, or open the existing one there if its identity equals `identity`."""
        backend = open_backend(path)
        identity = validate_identity(identity, backend.root)
        if isinstance(backend, PosixBackend) and backend.path.exists() and not (backend.path / "zarr.json").is_file():
            backend.create_root({})  # refuses a path that is neither a store nor an empty folder
        if _root_attrs(backend) is None:
            backend.create_root({"schema_version": SCHEMA_VERSION, "mrantool_version": __version__,
                                 "identity": identity,
                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return cls.open(path, identity, writable=True, lock_ttl_s=lock_ttl_s)

    @classmethod
    def open(cls, path: str | os.PathLike[str], identity: dict[str, Any] | None = None, *, writable: bool = False,
             lock_ttl_s: float = DEFAULT_TTL_S) -> FeatureStore:
        """Open an existing store; with `identity`, refuse a store written with another encoder or geometry."""
        if not lock_ttl_s > 0:
            raise StoreError(f"The lock TTL must be a positive number of seconds, got {lock_ttl_s}; pass e.g. "
                             "--lock-ttl 600.")
        backend = open_backend(path)
        root = backend.root
        attrs = _root_attrs(backend)
        if attrs is None:
            raise StoreError(f"Store {root} does not exist; create it with `mrantool extract ... --store {root}` "
                             "or `mrantool import`.")
        if attrs.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise StoreError(f"Store {root} has schema version {attrs.get('schema_version')} (written by mrantool "
                             f"{attrs.get('mrantool_version')}) but mrantool {__version__} reads versions "
                             f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; use a new --store or the mrantool "
                             "version that wrote it.")
        if identity is not None:
            diffs = identity_differences(attrs["identity"], validate_identity(identity, root))
            if diffs:
                raise StoreError(f"Store {root} was written with another encoder or geometry ({'; '.join(diffs)}); "
                                 "use a new --store for this encoder and geometry.")
        store = cls(backend, attrs, writable, lock_ttl_s)
        if writable:
            backend.prepare()
            if store.is_local:  # a local sweep is one directory listing; object stores clean per slide
                store.clean_staging()
        return store

    # --- reading -------------------------------------------------------------------------------------------

    def slide_ids(self) -> list[str]:
        """Sorted ids of complete (committed) slides."""
        return self.backend.committed_ids()

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and slide_id in set(self.slide_ids())

    def slide(self, slide_id: str) -> SlideFeatures:
        """The committed slide `slide_id`; StoreError when it is not (yet) in the store."""
        try:
            found = self.backend.slide_group(validate_slide_id(slide_id))
        except StoreError:
            raise
        except Exception as exc:  # zarr raises many types for damaged metadata
            raise StoreError(f"Slide '{slide_id}' in store {self.path} has unreadable metadata "
                             f"({type(exc).__name__}); {REDO}.") from None
        if found is None:
            raise StoreError(f"Slide '{slide_id}' is not in store {self.path} ({len(self.slide_ids())} complete "
                             "slides); check the id with `mrantool info` or extract that slide.")
        return SlideFeatures(slide_id, *found)

    def provenance(self, slide_id: str) -> dict[str, Any]:
        """Provenance of a committed slide without opening its arrays."""
        if self.is_local:
            path = self.layout.slide(validate_slide_id(slide_id))
            if (path / "zarr.json").is_file():
                return read_provenance(path)
        return self.slide(slide_id).provenance

    def is_complete(self, slide_id: str, fingerprint: dict[str, Any] | None = None) -> bool:
        """Whether `slide_id` is committed and whole (quick check), and, when given, was extracted from a file
        with this fingerprint. A defective slide is not complete, so `extract` redoes it."""
        committed, recorded = self.backend.committed_fingerprint(validate_slide_id(slide_id))
        if not committed or (fingerprint is not None and recorded != jsonable(fingerprint)):
            return False
        return not self.backend.slide_defects(slide_id, self.identity)

    def case_twin(self, slide_id: str) -> str | None:
        """A slide of the store whose id differs from `slide_id` only in case (one folder on case-insensitive file
        systems), or None. Lists names only, so it stays cheap in stores of many slides."""
        return case_twin(slide_id, self.backend.slide_names())

    def content_hash(self) -> str:
        """A hash of what the store holds: its identity and, per committed slide, id, file fingerprint, bag count
        and commit time. It changes when a slide is added, removed or re-extracted (metadata only: cheap)."""
        slides = []
        for slide_id in self.slide_ids():
            try:
                prov = self.provenance(slide_id)
            except StoreError:
                prov = {"unreadable": True}
            slides.append([slide_id, prov.get("fingerprint"), prov.get("n_bags"), prov.get("extracted_at")])
        text = json.dumps({"identity": self.identity, "slides": slides}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def defective(self, slide_ids: list[str] | None = None, *, deep: bool = False) -> dict[str, list[str]]:
        """slide_id -> defects of the committed slides (all, or `slide_ids`) that are not whole."""
        found = {}
        for slide_id in self.slide_ids() if slide_ids is None else slide_ids:
            defects = self.backend.slide_defects(validate_slide_id(slide_id), self.identity, deep=deep)
            if defects:
                found[slide_id] = defects
        return found

    def require_whole(self, slide_ids: list[str], what: str) -> None:
        """StoreError naming every defective slide among `slide_ids` (quick check), before `what` uses them."""
        bad = self.defective(slide_ids)
        if bad:
            listed = "; ".join(f"'{sid}' ({found[0]})" for sid, found in list(bad.items())[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise StoreError(f"Store {self.path} has {len(bad)} defective slide(s) that {what} needs: {listed}{more}; "
                             f"{REDO}, or leave those slides out.")

    def failures(self) -> dict[str, dict[str, Any]]:
        """slide_id -> {slide_id, source, message, time, host, pid, mrantool_version} of recorded failures."""
        return self.backend.failures()

    def summary(self) -> list[dict[str, Any]]:
        """One row per committed or failed slide, for `mrantool info`."""
        failures = self.failures()
        cells = self.identity["geometry"]["cells"]
        rows = []
        for slide_id in self.slide_ids():
            try:
                prov = self.provenance(slide_id)
            except StoreError as exc:
                rows.append({"slide_id": slide_id, "status": "defective", "n_bags": None, "n_patches": None,
                             "dim": None, "cells": None, "mpp": None, "encoder": self.identity["encoder"],
                             "source": None, "error": str(exc)})
                continue
            rows.append({"slide_id": slide_id, "status": "complete", "n_bags": prov.get("n_bags"),
                         "n_patches": self.dims.n_patches, "dim": self.dims.dim,
                         "cells": f"{cells}x{cells}" if self.dims.n_cells else None, "mpp": prov.get("mpp"),
                         "encoder": self.identity["encoder"], "source": prov.get("source"),
                         "error": failures.get(slide_id, {}).get("message")})
        done = {row["slide_id"] for row in rows}
        for slide_id, record in failures.items():
            if slide_id not in done:
                rows.append({"slide_id": slide_id, "status": "failed", "n_bags": None, "n_patches": None,
                             "dim": None, "cells": None, "mpp": None, "encoder": self.identity["encoder"],
                             "source": record.get("source"), "error": record.get("message")})
        return sorted(rows, key=lambda row: row["slide_id"])

    # --- writing -------------------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"Store {self.path} was opened read-only; open it with FeatureStore.create or "
                             "FeatureStore.open(..., writable=True) to write.")

    def begin_slide(self, slide_id: str, n_bags: int, provenance: dict[str, Any],
                    lock: SlideLock | None = None) -> SlideWriter:
        """A writer for one slide; provenance needs source, fingerprint, mpp, level0_size, bag_size_l0 (+ extras).
        With the slide's `lock`, commit() refuses once the lock is no longer this writer's."""
        self._require_writable()
        twin = self.case_twin(validate_slide_id(slide_id))
        if twin:
            raise StoreError(f"Slide id '{slide_id}' differs only in case from '{twin}' in store {self.path} (one "
                             "folder on case-insensitive file systems); rename the file or give a `slide_id` column "
                             "in a slide list CSV.")
        return SlideWriter(self.backend, slide_id, n_bags, self.identity, provenance, lock)

    def record_failure(self, slide_id: str, source: str | os.PathLike[str], message: str) -> str:
        """Record that `slide_id` failed; a later successful commit removes the record."""
        self._require_writable()
        return record_failure(self.backend, slide_id, source, message)

    def try_lock(self, slide_id: str) -> SlideLock | None:
        """The lock (a lease the store's heartbeat renews) on `slide_id`, or None when it is busy. Attempts at
        the slide left by writers that lost their lock are deleted once it is taken."""
        return self._acquire(slide_id)[0]

    def lock(self, slide_id: str) -> SlideLock:
        """Hold the lock on `slide_id` (use `with`); LockedError when a live extractor holds it."""
        held, holder = self._acquire(slide_id)
        if held is None:
            raise _locks.locked_error(self.backend.lock_files(), slide_id, holder, str(self.path))
        return held

    def _acquire(self, slide_id: str) -> tuple[SlideLock | None, dict[str, Any] | None]:
        self._require_writable()
        files = self.backend.lock_files()
        held, holder = _locks.acquire(files, validate_slide_id(slide_id), self.lock_ttl_s, self._heartbeat)
        if held is not None:
            self.backend.abandon_attempts(slide_id)
        return held, holder

    def locks(self) -> list[dict[str, Any]]:
        """Current lock records: slide_id, pid, host, started, expires, age_s, stale, path."""
        return _locks.list_locks(self.backend.lock_files(), self.lock_ttl_s)

    def clear_stale_locks(self) -> list[str]:
        """Remove locks whose owner is dead or whose lease expired; return their slide ids."""
        return _locks.clear_locks(self.backend.lock_files(), force=False, ttl_s=self.lock_ttl_s)

    def clear_locks(self, force: bool = False) -> list[str]:
        """Remove stale locks, or every lock with `force` (only when no extractor is running)."""
        return _locks.clear_locks(self.backend.lock_files(), force=force, ttl_s=self.lock_ttl_s)

    def _busy(self, slide_id: str) -> bool:
        version = self.backend.lock_files().read(slide_id)
        return version is not None and not _locks.is_stale(_locks.describe(version), self.lock_ttl_s)

    def clean_staging(self) -> list[str]:
        """Delete attempts, trash and temp files left by dead writers; return what was removed."""
        return self.backend.clean_orphans(self.lock_ttl_s, self._busy)

    def leftovers(self) -> list[tuple[str, bool]]:
        """(name, abandoned?) of uncommitted attempts and trash present now."""
        return self.backend.leftovers(self.lock_ttl_s, self._busy)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, encoder={self.identity['encoder']!r}, slides={len(self.slide_ids())})"


def _root_attrs(backend: Backend) -> dict[str, Any] | None:
    """The root attributes of an mrantool store, None when there is none; StoreError for another zarr group."""
    attrs = backend.root_attrs()
    if attrs is not None and ("schema_version" not in attrs or "identity" not in attrs):
        raise StoreError(f"{backend.root} is a zarr group but not an mrantool feature store; pass a store made by "
                         "`mrantool extract` or `mrantool import`, or a new path.")
    return attrs
