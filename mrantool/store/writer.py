"""Writing one slide: stream bags into a new attempt, then commit it (POSIX: one rename; object storage: a
commit marker written last). Also the failures manifest (one JSON file per slide)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from mrantool import __version__
from mrantool.errors import StoreError
from mrantool.store.backends import Backend
from mrantool.store.locks import SlideLock
from mrantool.store.schema import (
    ARRAY_DTYPES,
    CELL_EMB,
    CELL_TISSUE,
    COORDS,
    PATCH_EMB,
    PATCH_TISSUE,
    PROVENANCE_KEYS,
    ZSTD_LEVEL,
    Dims,
    hostname,
    jsonable,
    validate_slide_id,
)
from mrantool.urls import is_remote


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ranges(indices: np.ndarray, limit: int = 5) -> str:
    """'0-3, 7, 9-12' for sorted indices (first `limit` runs)."""
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate([[indices[0]], indices[breaks + 1]])
    ends = np.concatenate([indices[breaks], [indices[-1]]])
    runs = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts, ends, strict=True)]
    return ", ".join(runs[:limit]) + (", ..." if len(runs) > limit else "")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of the runs of True in a 1-d bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class _ChunkAligned:
    """Writes a zarr array in whole chunks along axis 0, buffering partly filled chunks (each chunk encoded once)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.rows = array.chunks[0]
        self.pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def write(self, start: int, values: np.ndarray) -> None:
        stop, n = start + len(values), self.array.shape[0]
        full: list[int] = []
        for k in range(start // self.rows, (stop - 1) // self.rows + 1):
            lo, hi = k * self.rows, min((k + 1) * self.rows, n)
            a, b = max(lo, start), min(hi, stop)
            if (a, b) == (lo, hi):  # fully overwritten: any buffered rows of this chunk are obsolete
                self.pending.pop(k, None)
                full.append(k)
                continue
            buf, filled = self.pending.setdefault(
                k, (np.empty((hi - lo, *values.shape[1:]), values.dtype), np.zeros(hi - lo, bool)))
            buf[a - lo:b - lo] = values[a - start:b - start]
            filled[a - lo:b - lo] = True
            if filled.all():
                self.array[lo:hi] = buf
                del self.pending[k]
        if full:  # whole chunks are contiguous: one call, so zarr encodes them concurrently
            lo, hi = full[0] * self.rows, min((full[-1] + 1) * self.rows, n)
            self.array[lo:hi] = values[lo - start:hi - start]

    def flush(self) -> None:
        """Write what is left of partly filled chunks (only rows rewritten after their chunk was stored)."""
        for k, (buf, filled) in self.pending.items():
            for a, b in _runs(filled):
                self.array[k * self.rows + a:k * self.rows + b] = buf[a:b]
        self.pending.clear()


class SlideWriter:
    """Streams one slide's bags into a new attempt (a staging folder, or a fresh prefix on object storage);
    commit() makes it the slide's visible version.

    Use as a context manager: leaving the block without commit() (e.g. on an exception) aborts. Not thread-safe:
    call write() from one thread at a time (a single writer thread per store is enough to keep up). With `lock`,
    commit() first checks that the lock is still this writer's, so a writer whose lease expired never commits.
    """

    def __init__(self, backend: Backend, slide_id: str, n_bags: int, identity: dict[str, Any],
                 provenance: dict[str, Any], lock: SlideLock | None = None) -> None:
        self.backend = backend
        self.slide_id = validate_slide_id(slide_id)
        if not isinstance(n_bags, (int, np.integer)) or n_bags < 1:
            raise StoreError(f"Slide '{slide_id}' has {n_bags} bags; a slide needs at least one bag to be stored "
                             "(record it as a failure instead).")
        missing = [key for key in PROVENANCE_KEYS if key not in provenance]
        if missing:
            raise StoreError(f"Provenance for slide '{slide_id}' lacks {', '.join(missing)}; pass them to "
                             "begin_slide (None where unknown).")
        self.n_bags = int(n_bags)
        self.dims = Dims.from_identity(identity)
        self.lock = lock
        self.committed = False
        self.location = ""
        self._written = np.zeros(self.n_bags, dtype=bool)
        attrs = jsonable({**provenance, "slide_id": slide_id, "n_bags": self.n_bags, "identity": identity,
                          "geometry": identity["geometry"], "mrantool_version": __version__,
                          "timings": provenance.get("timings", {}), "extracted_at": None})
        self._fingerprint = attrs.get("fingerprint")
        zstore, self.location = backend.new_attempt(slide_id)
        try:
            group = zarr.open_group(zstore, mode="w-", attributes=attrs)
            chunks = self.dims.chunks(self.n_bags)
            self._arrays = {
                name: _ChunkAligned(group.create_array(
                    name, shape=shape, chunks=chunks[name], dtype=ARRAY_DTYPES[name],
                    fill_value=0 if name == COORDS else np.nan,
                    compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=True),
                    config={"write_empty_chunks": True}))
                for name, shape in self.dims.shapes(self.n_bags).items()
            }
        except BaseException:  # e.g. a full disk: leave no half-made attempt behind
            backend.discard(self.location)
            raise
        self._group = group

    @property
    def staging(self) -> Path:
        """The attempt's local folder (POSIX stores)."""
        return Path(self.location)

    def _check(self, name: str, value: np.ndarray, n: int) -> np.ndarray:
        expected = (n, *self._arrays[name].array.shape[1:])
        if value.shape != expected:
            raise StoreError(f"{name} for slide '{self.slide_id}' has shape {value.shape}, expected {expected}; "
                             "pass arrays that match the store's geometry and encoder.")
        return value.astype(ARRAY_DTYPES[name], copy=False)

    def write(self, start: int, coords: np.ndarray, patch_tissue: np.ndarray, patch_emb: np.ndarray,
              cell_emb: np.ndarray | None = None, cell_tissue: np.ndarray | None = None) -> None:
        """Write bags [start, start + len(coords)); floats are stored as float16. `cell_tissue` (n, P, C) is
        kept by stores with cells (each cell gets its patch's fraction when None) and ignored by others."""
        if self.committed:
            raise StoreError(f"Slide '{self.slide_id}' is already committed; begin a new slide to rewrite it.")
        coords = np.asarray(coords)
        n = len(coords)
        if n == 0:
            return
        if start < 0 or start + n > self.n_bags:
            raise StoreError(f"Bags {start}..{start + n - 1} are outside slide '{self.slide_id}' "
                             f"({self.n_bags} bags); write within 0..{self.n_bags - 1}.")
        if (cell_emb is None) != (CELL_EMB not in self._arrays):
            state = "has no cells" if cell_emb is not None else "stores cells"
            raise StoreError(f"Store {self.backend.root} {state}; pass cell_emb only to stores whose identity "
                             "has has_cells=True.")
        if cell_tissue is None and CELL_TISSUE in self._arrays:
            cells = self._arrays[CELL_TISSUE].array.shape[2]
            cell_tissue = np.repeat(np.asarray(patch_tissue)[..., None], cells, axis=-1)
        values = {COORDS: coords, PATCH_TISSUE: patch_tissue, PATCH_EMB: patch_emb, CELL_EMB: cell_emb,
                  CELL_TISSUE: cell_tissue}
        checked = {name: self._check(name, np.asarray(values[name]), n) for name in self._arrays}
        for name, value in checked.items():
            self._arrays[name].write(start, value)
        self._written[start:start + n] = True
        self.backend.touch(self.location)  # last activity, for clean-up of idle staging from other hosts

    def commit(self, timings: dict[str, float] | None = None) -> Path | str:
        """Verify every bag was written, then commit the attempt (rename, or commit marker); return where it is."""
        if self.committed:
            return self.location if is_remote(self.location) else Path(self.location)
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise StoreError(f"Slide '{self.slide_id}' cannot be committed: bags {_ranges(missing)} were never "
                             "written; write every bag before commit() or abort().")
        for array in self._arrays.values():
            array.flush()
        self._group.attrs.update(jsonable({"timings": {**self._group.attrs.get("timings", {}), **(timings or {})},
                                           "extracted_at": _now_iso()}))
        marker = {"fingerprint": self._fingerprint, "n_bags": self.n_bags, "committed_at": _now_iso()}
        target = self.backend.commit(self.slide_id, self.location, marker, self.lock.held if self.lock else None)
        self.committed = True
        self.backend.clear_failure(self.slide_id)
        return target if is_remote(target) else Path(target)

    def abort(self) -> None:
        """Delete the staging group; the store is as if this writer never ran."""
        if not self.committed:
            self.backend.discard(self.location)

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            self.abort()


def record_failure(backend: Backend, slide_id: str, source: str | os.PathLike[str], message: str) -> str:
    """Write `failures/<id>.json` (atomically: temp file + rename, or one object PUT); return where."""
    record = {"slide_id": slide_id, "source": os.fspath(source), "message": str(message), "time": _now_iso(),
              "host": hostname(), "pid": os.getpid(), "mrantool_version": __version__}
    return backend.put_failure(slide_id, record)
