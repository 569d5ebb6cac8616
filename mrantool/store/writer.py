"""Writing one slide: stream bags into a staging group, then commit it into `slides/` with one rename.

Also the failures manifest (one JSON file per slide) and the clean-up of staging/trash left by dead writers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.storage

from mrantool import __version__
from mrantool.errors import StoreError
from mrantool.files import atomic_write
from mrantool.store.locks import DEFAULT_MAX_AGE_S, owner_is_dead, owner_tag
from mrantool.store.schema import (
    ARRAY_DTYPES,
    CELL_EMB,
    COORDS,
    PATCH_EMB,
    PATCH_TISSUE,
    PROVENANCE_KEYS,
    ZSTD_LEVEL,
    Dims,
    Layout,
    hostname,
    jsonable,
    validate_slide_id,
)


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
    """Streams one slide's bags into `<store>/staging/<id>.<host>.<pid>.<hex>`; commit() makes it visible.

    Use as a context manager: leaving the block without commit() (e.g. on an exception) aborts. Not thread-safe:
    call write() from one thread at a time (a single writer thread per store is enough to keep up).
    """

    def __init__(self, layout: Layout, slide_id: str, n_bags: int, identity: dict[str, Any],
                 provenance: dict[str, Any]) -> None:
        self.layout = layout
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
        self.staging = layout.staging / f"{slide_id}.{owner_tag()}"
        self.committed = False
        self._written = np.zeros(self.n_bags, dtype=bool)
        attrs = jsonable({**provenance, "slide_id": slide_id, "n_bags": self.n_bags, "identity": identity,
                          "geometry": identity["geometry"], "mrantool_version": __version__,
                          "timings": provenance.get("timings", {}), "extracted_at": None})
        layout.staging.mkdir(parents=True, exist_ok=True)
        try:
            group = zarr.open_group(zarr.storage.LocalStore(self.staging), mode="w-", attributes=attrs)
            chunks = self.dims.chunks(self.n_bags)
            self._arrays = {
                name: _ChunkAligned(group.create_array(
                    name, shape=shape, chunks=chunks[name], dtype=ARRAY_DTYPES[name],
                    fill_value=0 if name == COORDS else np.nan,
                    compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=True),
                    config={"write_empty_chunks": True}))
                for name, shape in self.dims.shapes(self.n_bags).items()
            }
        except BaseException:  # e.g. a full disk: leave no half-made staging group behind
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        self._group = group

    def _check(self, name: str, value: np.ndarray, n: int) -> np.ndarray:
        expected = (n, *self._arrays[name].array.shape[1:])
        if value.shape != expected:
            raise StoreError(f"{name} for slide '{self.slide_id}' has shape {value.shape}, expected {expected}; "
                             "pass arrays that match the store's geometry and encoder.")
        return value.astype(ARRAY_DTYPES[name], copy=False)

    def write(self, start: int, coords: np.ndarray, patch_tissue: np.ndarray, patch_emb: np.ndarray,
              cell_emb: np.ndarray | None = None) -> None:
        """Write bags [start, start + len(coords)); floats are stored as float16."""
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
            raise StoreError(f"Store {self.layout.root} {state}; pass cell_emb only to stores whose identity "
                             "has has_cells=True.")
        values = {COORDS: coords, PATCH_TISSUE: patch_tissue, PATCH_EMB: patch_emb, CELL_EMB: cell_emb}
        checked = {name: self._check(name, np.asarray(values[name]), n) for name in self._arrays}
        for name, value in checked.items():
            self._arrays[name].write(start, value)
        self._written[start:start + n] = True
        os.utime(self.staging)  # last activity, for clean-up of idle staging from other hosts

    def commit(self, timings: dict[str, float] | None = None) -> Path:
        """Verify every bag was written, then rename the staging group to `slides/<id>`; return its path."""
        if self.committed:
            return self.layout.slide(self.slide_id)
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise StoreError(f"Slide '{self.slide_id}' cannot be committed: bags {_ranges(missing)} were never "
                             "written; write every bag before commit() or abort().")
        for array in self._arrays.values():
            array.flush()
        self._group.attrs.update(jsonable({"timings": {**self._group.attrs.get("timings", {}), **(timings or {})},
                                           "extracted_at": _now_iso()}))
        target = self.layout.slide(self.slide_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        _swap_into_place(self.staging, target, self.layout.trash / f"{self.slide_id}.{owner_tag()}")
        self.committed = True
        clear_failure(self.layout, self.slide_id)
        return target

    def abort(self) -> None:
        """Delete the staging group; the store is as if this writer never ran."""
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            self.abort()


def _swap_into_place(staging: Path, target: Path, aside: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is first renamed to `aside`, then deleted."""
    for _ in range(3):
        try:
            os.rename(staging, target)
            break
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue
    else:
        raise StoreError(f"Could not move slide into {target}; another process keeps replacing it (lock slides "
                         "with store.lock before writing).")
    shutil.rmtree(aside, ignore_errors=True)


def clean_orphans(layout: Layout, max_age_s: float = DEFAULT_MAX_AGE_S) -> list[Path]:
    """Delete staging groups, trash and temp files whose writer is dead; never touches a live writer's files."""
    removed = []
    for folder in (layout.staging, layout.trash, layout.failures):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            is_temp = entry.name.startswith(".tmp.")
            if folder == layout.failures and not is_temp:
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if owner_is_dead(entry.name, mtime, max_age_s):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def leftovers(layout: Layout) -> list[Path]:
    """Staging groups and trash currently present (live or dead writers)."""
    return sorted(Path(entry.path) for folder in (layout.staging, layout.trash) if folder.is_dir()
                  for entry in os.scandir(folder))


def record_failure(layout: Layout, slide_id: str, source: str | os.PathLike[str], message: str) -> Path:
    """Write `failures/<id>.json` atomically (temp file + os.replace)."""
    path = layout.failure(validate_slide_id(slide_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"slide_id": slide_id, "source": os.fspath(source), "message": str(message), "time": _now_iso(),
              "host": hostname(), "pid": os.getpid(), "mrantool_version": __version__}
    return atomic_write(path, json.dumps(record, indent=1), temp_name=f".tmp.{owner_tag()}")


def clear_failure(layout: Layout, slide_id: str) -> None:
    layout.failure(slide_id).unlink(missing_ok=True)


def read_failures(layout: Layout) -> dict[str, dict[str, Any]]:
    """slide_id -> failure record; an unreadable record becomes {'message': 'unreadable failure record ...'}."""
    if not layout.failures.is_dir():
        return {}
    failures = {}
    for path in sorted(layout.failures.glob("*.json")):
        if path.name.startswith("."):
            continue
        slide_id = path.name[: -len(".json")]
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError(f"it holds {str(record)[:40]!r}, not a JSON object")
            failures[slide_id] = record
        except (OSError, ValueError) as exc:
            failures[slide_id] = {"slide_id": slide_id, "message": f"unreadable failure record {path}: {exc}"}
    return failures

