"""A store on object storage through fsspec: conditional-write lock objects, commit markers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import zarr
import zarr.storage

from mrantool.errors import StoreError
from mrantool.store.backends.base import Backend, StillHeld, failure_from
from mrantool.store.health import group_defects
from mrantool.store.locks import Version, owner_tag
from mrantool.store.schema import COMMITS_DIR, FAILURES_DIR, LOCKS_DIR, SLIDES_DIR, validate_slide_id
from mrantool.urls import READ_ONLY_PROTOCOLS, filesystem, protocol

ATTEMPT_GRACE_S = 60.0  # an object-store attempt younger than this may belong to a writer about to take its lock



def _precondition_failed(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "PreconditionFailed" in text or "412" in text or "pre-conditions" in text or "precondition" in text


class ObjectLockFiles:
    """Lock objects with conditional writes: create with If-None-Match: *, replace with If-Match: <ETag>.

    On S3 (and S3-compatible servers that implement conditional writes) both are atomic. Other fsspec backends
    fall back to check-then-write followed by a read-back of the token: good against slow collisions only.
    """

    def __init__(self, fs: Any, prefix: str) -> None:
        self.fs = fs
        self.prefix = prefix
        self.conditional = type(fs).__name__ == "S3FileSystem"

    def _key(self, slide_id: str) -> str:
        return f"{self.prefix}/{LOCKS_DIR}/{validate_slide_id(slide_id)}.lock"

    def where(self, slide_id: str) -> str:
        return f"{protocol_of(self.fs)}://{self._key(slide_id)}"

    def _etag(self, key: str) -> str | None:
        try:
            info = self.fs.info(key, refresh=True)
        except FileNotFoundError:
            return None
        return info.get("ETag") or info.get("etag")

    def create(self, slide_id: str, data: bytes) -> Any | None:
        key = self._key(slide_id)
        if self.conditional:
            try:
                self.fs.pipe_file(key, data, mode="create")
            except FileExistsError:
                return None
            except OSError as exc:
                if _precondition_failed(exc):
                    return None
                raise
        else:
            if self._etag(key) is not None:
                return None
            self.fs.pipe_file(key, data)
            time.sleep(0.2)
            if self._read_raw(key) != data:
                return None
        return self._etag(key)

    def _read_raw(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(key)
        except FileNotFoundError:
            return None

    def read(self, slide_id: str) -> Version | None:
        key = self._key(slide_id)
        try:
            info = self.fs.info(key, refresh=True)
        except FileNotFoundError:
            return None
        raw = self._read_raw(key)
        if raw is None:
            return None
        modified = info.get("LastModified")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else time.time()
        return Version(raw, info.get("ETag"), mtime)

    def replace(self, slide_id: str, data: bytes, tag: Any) -> Any | None:
        key = self._key(slide_id)
        if self.conditional:
            try:
                self.fs.pipe_file(key, data, IfMatch=tag)
            except (FileNotFoundError, FileExistsError):
                return None
            except OSError as exc:
                if _precondition_failed(exc):
                    return None
                raise
        else:
            if self._etag(key) != tag:
                return None
            self.fs.pipe_file(key, data)
        return self._etag(key)

    def remove(self, slide_id: str, tag: Any) -> bool:
        key = self._key(slide_id)
        if self._etag(key) != tag:
            return False
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            return False
        return True

    def ids(self) -> list[str]:
        return [name[: -len(".lock")] for name in _list_names(self.fs, f"{self.prefix}/{LOCKS_DIR}")
                if name.endswith(".lock")]


def protocol_of(fs: Any) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def _list_names(fs: Any, prefix: str) -> list[str]:
    """Base names directly under `prefix` (fresh listing, no cache); [] when absent."""
    try:
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(prefix, detail=False, refresh=True))
    except FileNotFoundError:
        return []


class ObjectBackend(Backend):
    """A store on object storage (s3://, gs://, az://; http(s):// read-only). There is no rename: a slide's
    arrays are written under slides/<id>/<attempt>/ and it becomes visible when commits/<id>.json, written
    last, names that attempt. Readers trust only slides with a commit marker."""

    def __init__(self, url: str) -> None:
        self.root = url
        self.fs, self.prefix = filesystem(url)
        self.prefix = self.prefix.rstrip("/")
        self.can_write = protocol(url) not in READ_ONLY_PROTOCOLS
        self._locks = ObjectLockFiles(self.fs, self.prefix)

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _url(self, key: str) -> str:
        return f"{protocol_of(self.fs)}://{key}" if "://" not in key else key

    def _zarr_store(self, key: str, read_only: bool) -> Any:
        try:
            return zarr.storage.FsspecStore.from_url(self._url(key), read_only=read_only)
        except Exception as exc:  # fsspec/zarr raise several types for a bad URL or missing package
            raise StoreError(f"Cannot open {self._url(key)} ({exc}); check the URL and credentials.") from None

    def _get_json(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self.fs.cat_file(key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def _put_json(self, key: str, value: dict[str, Any]) -> None:
        self.fs.pipe_file(key, json.dumps(value, indent=1).encode())

    def root_attrs(self) -> dict[str, Any] | None:
        try:
            meta = self._get_json(self._key("zarr.json"))
        except (OSError, PermissionError) as exc:
            raise StoreError(f"Cannot read store {self.root} ({exc}); check the URL and credentials.") from None
        if meta is None:
            return None
        if not isinstance(meta.get("attributes"), dict):
            raise StoreError(f"{self.root} has unreadable zarr metadata; restore it or use a new --store.")
        return meta["attributes"]

    def create_root(self, attrs: dict[str, Any]) -> None:
        if not self.can_write:
            raise StoreError(f"{self.root} is read-only (http); write stores to s3://, gs://, az:// or a path.")
        try:
            group = zarr.open_group(self._zarr_store(self.prefix, read_only=False), mode="w-", attributes=attrs)
            group.create_group(SLIDES_DIR)
        except (FileExistsError, zarr.errors.ContainsGroupError):
            return
        except OSError as exc:
            raise StoreError(f"Cannot create store {self.root} ({exc}); check the bucket and credentials.") from None

    def prepare(self) -> None:
        if not self.can_write:
            raise StoreError(f"{self.root} is read-only (http); write stores to s3://, gs://, az:// or a path.")

    def _marker(self, slide_id: str) -> dict[str, Any] | None:
        return self._get_json(self._key(COMMITS_DIR, f"{validate_slide_id(slide_id)}.json"))

    def committed_ids(self) -> list[str]:
        return [name[: -len(".json")] for name in _list_names(self.fs, self._key(COMMITS_DIR))
                if name.endswith(".json") and not name.startswith(".")]

    def committed_fingerprint(self, slide_id: str) -> tuple[bool, Any]:
        marker = self._marker(slide_id)
        return (marker is not None, None if marker is None else marker.get("fingerprint"))

    def slide_group(self, slide_id: str) -> tuple[Any, str] | None:
        marker = self._marker(slide_id)
        if not marker or not isinstance(marker.get("attempt"), str):
            return None
        key = self._key(SLIDES_DIR, slide_id, marker["attempt"])
        try:
            group = zarr.open_group(self._zarr_store(key, read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        return group, self._url(key)

    def slide_names(self) -> list[str]:
        return [name for name in _list_names(self.fs, self._key(SLIDES_DIR)) if name != "zarr.json"]

    def slide_defects(self, slide_id: str, identity: dict[str, Any], *, deep: bool = False) -> list[str]:
        try:
            found = self.slide_group(slide_id)
            if found is None:
                return ["its commit marker names no readable data"]
            group = found[0]
            attrs = dict(group.attrs)
        except StoreError as exc:
            return [str(exc)]
        except Exception as exc:  # zarr and fsspec raise many types for damaged metadata
            return [f"unreadable zarr metadata ({type(exc).__name__}: {exc})"]
        return group_defects(group, attrs, identity, deep=deep)

    def retract(self, slide_id: str) -> None:
        marker = self._marker(slide_id)
        with suppress(FileNotFoundError):
            self.fs.rm_file(self._key(COMMITS_DIR, f"{slide_id}.json"))  # readers stop trusting it first
        if marker and isinstance(marker.get("attempt"), str):
            self.discard(self._key(SLIDES_DIR, slide_id, marker["attempt"]))

    def new_attempt(self, slide_id: str) -> tuple[Any, str]:
        if not self.can_write:
            raise StoreError(f"{self.root} is read-only (http); write stores to s3://, gs://, az:// or a path.")
        key = self._key(SLIDES_DIR, validate_slide_id(slide_id), owner_tag())
        return self._zarr_store(key, read_only=False), self._url(key)

    def commit(self, slide_id: str, location: str, marker: dict[str, Any], still_held: StillHeld | None) -> str:
        if still_held is not None and not still_held():
            raise StoreError(f"Slide '{slide_id}' was not committed: this writer's lock expired and was taken over "
                             "(raise --lock-ttl); rerun extract to redo it.")
        attempt = location.rstrip("/").rsplit("/", 1)[-1]
        previous = self._marker(slide_id)
        self._put_json(self._key(COMMITS_DIR, f"{slide_id}.json"), {**marker, "slide_id": slide_id,
                                                                      "attempt": attempt})
        if previous and previous.get("attempt") not in (None, attempt):
            self.discard(self._url(self._key(SLIDES_DIR, slide_id, previous["attempt"])))
        return location

    def discard(self, location: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(location.split("://", 1)[-1], recursive=True)

    def touch(self, location: str) -> None:
        return None

    def put_failure(self, slide_id: str, record: dict[str, Any]) -> str:
        key = self._key(FAILURES_DIR, f"{validate_slide_id(slide_id)}.json")
        self._put_json(key, record)
        return self._url(key)

    def clear_failure(self, slide_id: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm_file(self._key(FAILURES_DIR, f"{slide_id}.json"))

    def failures(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in _list_names(self.fs, self._key(FAILURES_DIR)):
            if name.endswith(".json") and not name.startswith("."):
                key = self._key(FAILURES_DIR, name)
                try:
                    out[name[:-5]] = failure_from(name[:-5], self.fs.cat_file(key), self._url(key))
                except FileNotFoundError:
                    continue
        return out

    def lock_files(self) -> ObjectLockFiles:
        return self._locks

    def _attempts(self, slide_ids: list[str] | None) -> Iterator[tuple[str, str, float]]:
        """(slide id, attempt name, age in s) of every uncommitted attempt of `slide_ids` (or of all slides)."""
        ids = slide_ids if slide_ids is not None else _list_names(self.fs, self._key(SLIDES_DIR))
        for slide_id in ids:
            if slide_id == "zarr.json":
                continue
            committed = (self._marker(slide_id) or {}).get("attempt")
            for attempt in _list_names(self.fs, self._key(SLIDES_DIR, slide_id)):
                if attempt == committed:
                    continue
                try:
                    modified = self.fs.info(self._key(SLIDES_DIR, slide_id, attempt, "zarr.json")).get("LastModified")
                    age = time.time() - modified.timestamp() if hasattr(modified, "timestamp") else 0.0
                except FileNotFoundError:
                    age = float("inf")
                yield slide_id, attempt, age

    def _drop(self, slide_id: str, attempt: str) -> str:
        self.discard(self._key(SLIDES_DIR, slide_id, attempt))
        return f"{SLIDES_DIR}/{slide_id}/{attempt}"

    def clean_orphans(self, ttl_s: float, busy: Callable[[str], bool]) -> list[str]:
        return [self._drop(slide_id, attempt) for slide_id, attempt, age in list(self._attempts(None))
                if not busy(slide_id) and age > ATTEMPT_GRACE_S]

    def abandon_attempts(self, slide_id: str) -> list[str]:
        return [self._drop(slide_id, attempt) for _, attempt, _ in list(self._attempts([slide_id]))]

    def leftovers(self, ttl_s: float, busy: Callable[[str], bool]) -> list[tuple[str, bool]]:
        return [(f"{SLIDES_DIR}/{slide_id}/{attempt}", not busy(slide_id) and age > ATTEMPT_GRACE_S)
                for slide_id, attempt, age in self._attempts(None)]

    def stray_entries(self) -> list[str]:
        committed = set(self.committed_ids())
        return [f"{SLIDES_DIR}/{name}" for name in _list_names(self.fs, self._key(SLIDES_DIR))
                if name != "zarr.json" and name not in committed and not _list_names(self.fs, self._key(SLIDES_DIR,
                                                                                                         name))]
