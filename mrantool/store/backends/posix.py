"""A store directory on a POSIX filesystem: O_EXCL lock files, commit by rename."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

from mrantool.errors import StoreError
from mrantool.files import atomic_write, os_error_message
from mrantool.store.backends.base import Backend, StillHeld, failure_from
from mrantool.store.health import read_provenance, slide_defects
from mrantool.store.locks import Version, owner_is_dead, owner_tag
from mrantool.store.schema import SLIDES_DIR, Layout, validate_slide_id

MUTEX_STALE_S = 10.0  # a lock-file mutex is held for milliseconds; one this old was left by a dead process



class PosixLockFiles:
    """Lock files on a POSIX filesystem: O_EXCL create; replace/remove under a short per-lock mutex file, so a
    lock that changed since it was read is never overwritten or deleted."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def where(self, slide_id: str) -> str:
        return str(self.layout.lock(slide_id))

    def _version(self, path: Path) -> Version | None:
        try:
            with open(path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            return None
        return Version(raw, (stat.st_ino, stat.st_mtime_ns, raw), stat.st_mtime)

    def create(self, slide_id: str, data: bytes) -> Any | None:
        path = self.layout.lock(validate_slide_id(slide_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        version = self._version(path)
        return None if version is None or version.raw != data else version.tag

    def read(self, slide_id: str) -> Version | None:
        return self._version(self.layout.lock(slide_id))

    @contextmanager
    def _mutex(self, slide_id: str) -> Iterator[bool]:
        mutex = self.layout.locks / f".{slide_id}.mutex"
        deadline = time.time() + 2 * MUTEX_STALE_S
        while True:
            try:
                os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                try:
                    if time.time() - mutex.stat().st_mtime > MUTEX_STALE_S:
                        mutex.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
                if time.time() > deadline:
                    yield False
                    return
                time.sleep(0.002)
        try:
            yield True
        finally:
            mutex.unlink(missing_ok=True)

    def replace(self, slide_id: str, data: bytes, tag: Any) -> Any | None:
        path = self.layout.lock(slide_id)
        with self._mutex(slide_id) as ok:
            current = self._version(path)
            if not ok or current is None or current.tag != tag:
                return None
            temp = path.parent / f".tmp.{owner_tag()}"
            temp.write_bytes(data)
            os.replace(temp, path)
            version = self._version(path)
            return None if version is None else version.tag

    def remove(self, slide_id: str, tag: Any) -> bool:
        path = self.layout.lock(slide_id)
        with self._mutex(slide_id) as ok:
            current = self._version(path)
            if not ok or current is None or current.tag != tag:
                return False
            path.unlink(missing_ok=True)
            return True

    def ids(self) -> list[str]:
        if not self.layout.locks.is_dir():
            return []
        return sorted(p.name[: -len(".lock")] for p in self.layout.locks.glob("*.lock") if not p.name.startswith("."))


class PosixBackend(Backend):
    """A store directory on a POSIX filesystem (local disk, NFS, Lustre): slides are committed by rename."""

    can_write = True

    def __init__(self, root: Path) -> None:
        self.path = root
        self.root = str(root)
        self.layout = Layout(root)
        self._locks = PosixLockFiles(self.layout)

    def root_attrs(self) -> dict[str, Any] | None:
        root = self.path
        if not root.exists() or (root.is_dir() and not any(root.iterdir())):
            return None
        if not (root / "zarr.json").is_file():
            raise StoreError(f"{root} is not an mrantool feature store (no zarr.json); pass a store made by "
                             "`mrantool extract` or `mrantool import`, or a new path.")
        try:
            return dict(zarr.open_group(zarr.storage.LocalStore(root, read_only=True), mode="r").attrs)
        except Exception as exc:  # zarr raises several types for damaged metadata
            raise StoreError(f"{root} has unreadable zarr metadata ({exc}); restore it or use a new --store.") from None

    def create_root(self, attrs: dict[str, Any]) -> None:
        """Build the root group in a temp dir beside the root and rename it into place."""
        root = self.path
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            if attrs and (root / "zarr.json").is_file():
                return  # another process created the store since the caller looked; opening checks its identity
            raise StoreError(f"{root} exists and is not a feature store; choose a new --store path.")
        if not attrs:
            return
        temp = root.parent / f".{root.name}.{owner_tag()}"
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(zarr.storage.LocalStore(temp), mode="w-", attributes=attrs)
            group.create_group(SLIDES_DIR)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            raise StoreError(os_error_message(exc, "create store", root)) from None
        try:
            os.rename(temp, root)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreError(f"Cannot create store {root} ({exc.strerror}); choose a writable --store "
                                 "path.") from None

    def prepare(self) -> None:
        try:
            for folder in (self.layout.slides, self.layout.staging, self.layout.locks, self.layout.failures):
                folder.mkdir(exist_ok=True)
            probe = self.layout.staging / f".tmp.{owner_tag()}"
            probe.write_bytes(b"")  # a read-only or full store fails here, before any slide is read
            probe.unlink()
        except OSError as exc:
            raise StoreError(os_error_message(exc, "write to store", self.root)) from None

    def committed_ids(self) -> list[str]:
        return self.layout.committed_ids()

    def committed_fingerprint(self, slide_id: str) -> tuple[bool, Any]:
        path = self.layout.slide(validate_slide_id(slide_id))
        if not (path / "zarr.json").is_file():
            return False, None
        try:
            return True, read_provenance(path).get("fingerprint")
        except StoreError:  # damaged metadata: committed, but whole it is not (see slide_defects)
            return True, None

    def slide_group(self, slide_id: str) -> tuple[Any, str] | None:
        path = self.layout.slide(validate_slide_id(slide_id))
        if not (path / "zarr.json").is_file():
            return None
        return zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r"), str(path)

    def slide_names(self) -> list[str]:
        names = os.listdir(self.layout.slides) if self.layout.slides.is_dir() else []
        return [name for name in names if name != "zarr.json"]

    def slide_defects(self, slide_id: str, identity: dict[str, Any], *, deep: bool = False) -> list[str]:
        return slide_defects(self.layout.slide(slide_id), identity, deep=deep)

    def retract(self, slide_id: str) -> None:
        aside = self.layout.trash / f"{slide_id}.{owner_tag()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.layout.slide(slide_id), aside)
        shutil.rmtree(aside, ignore_errors=True)

    def new_attempt(self, slide_id: str) -> tuple[Any, str]:
        staging = self.layout.staging / f"{slide_id}.{owner_tag()}"
        self.layout.staging.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(staging), str(staging)

    def commit(self, slide_id: str, location: str, marker: dict[str, Any], still_held: StillHeld | None) -> str:
        if still_held is not None and not still_held():
            raise StoreError(f"Slide '{slide_id}' was not committed: this writer's lock expired and was taken over "
                             "(raise --lock-ttl); rerun extract to redo it.")
        target = self.layout.slide(slide_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        _swap_into_place(Path(location), target, self.layout.trash / f"{slide_id}.{owner_tag()}")
        return str(target)

    def discard(self, location: str) -> None:
        shutil.rmtree(location, ignore_errors=True)

    def touch(self, location: str) -> None:
        os.utime(location)

    def put_failure(self, slide_id: str, record: dict[str, Any]) -> str:
        path = self.layout.failure(validate_slide_id(slide_id))
        return str(atomic_write(path, json.dumps(record, indent=1), temp_name=f".tmp.{owner_tag()}"))

    def clear_failure(self, slide_id: str) -> None:
        self.layout.failure(slide_id).unlink(missing_ok=True)

    def failures(self) -> dict[str, dict[str, Any]]:
        if not self.layout.failures.is_dir():
            return {}
        out = {}
        for path in sorted(self.layout.failures.glob("*.json")):
            if path.name.startswith("."):
                continue
            slide_id = path.name[: -len(".json")]
            try:
                out[slide_id] = failure_from(slide_id, path.read_bytes(), str(path))
            except OSError as exc:
                out[slide_id] = {"slide_id": slide_id, "message": f"unreadable failure record {path}: {exc}"}
        return out

    def lock_files(self) -> PosixLockFiles:
        return self._locks

    def _entries(self) -> Iterator[tuple[Path, os.DirEntry, bool]]:
        """(folder, entry, is temp file) of staging, trash and failure temp files."""
        for folder in (self.layout.staging, self.layout.trash, self.layout.failures, self.layout.locks):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                is_temp = entry.name.startswith(".tmp.")
                if folder in (self.layout.failures, self.layout.locks) and not is_temp:
                    continue
                yield folder, entry, is_temp

    def _abandoned(self, folder: Path, entry: os.DirEntry, ttl_s: float, busy: Callable[[str], bool]) -> bool:
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return False
        if folder == self.layout.staging and busy(entry.name.rsplit(".", 3)[0]) \
                and not owner_is_dead(entry.name, mtime, float("inf")):
            return False  # a live lease on the slide: its writer may be on another host, still working
        return owner_is_dead(entry.name, mtime, ttl_s)

    def _remove(self, entry: os.DirEntry) -> str:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        return str(Path(entry.path).relative_to(self.path))

    def clean_orphans(self, ttl_s: float, busy: Callable[[str], bool]) -> list[str]:
        return [self._remove(entry) for folder, entry, _ in list(self._entries())
                if self._abandoned(folder, entry, ttl_s, busy)]

    def abandon_attempts(self, slide_id: str) -> list[str]:
        return [self._remove(entry) for folder, entry, _ in list(self._entries())
                if folder == self.layout.staging and entry.name.rsplit(".", 3)[0] == slide_id]

    def leftovers(self, ttl_s: float, busy: Callable[[str], bool]) -> list[tuple[str, bool]]:
        return sorted((str(Path(entry.path).relative_to(self.path)), self._abandoned(folder, entry, ttl_s, busy))
                      for folder, entry, is_temp in self._entries()
                      if folder in (self.layout.staging, self.layout.trash))

    def stray_entries(self) -> list[str]:
        if not self.layout.slides.is_dir():
            return []
        committed = set(self.committed_ids())
        return [f"slides/{entry.name}" for entry in os.scandir(self.layout.slides)
                if entry.name != "zarr.json" and entry.name not in committed]


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


