"""Per-slide locks as leases: an owner record with an expiry that a heartbeat keeps pushing forward.

A lock is `locks/<slide_id>.lock` holding JSON {pid, host, started, renewed, expires, ttl, token}. It is taken
by creating the file only if it does not exist (O_EXCL locally, a conditional PUT on object storage). It is
stale when its owner is this host and its pid is dead, when its lease has expired (`expires` passed: the owner
stopped renewing it, e.g. a dead process on another host), or when it is unreadable for longer than a grace
period. A stale lock is never deleted and re-created: it is *replaced* by the new owner's record only if it is
still the version judged stale (compare-and-swap), so two breakers never both win and a fresh lock is never
dropped. The backend (`LockFiles`) supplies create / read / replace-if-unchanged / remove-if-unchanged.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Protocol

from mrantool.errors import LockedError
from mrantool.store.schema import hostname

DEFAULT_TTL_S = 600.0  # a lease not renewed for this long is expired (`--lock-ttl`)
UNREADABLE_GRACE_S = 60.0  # a lock whose JSON is not written yet is live for this long after creation
RELEASE_MARGIN_S = 5.0  # an owner no longer deletes its lease this close to expiry (at most TTL/4; it may be taken)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def owner_tag() -> str:
    """A unique name part saying which process on which host made a file: `<host>.<pid>.<hex>`."""
    return f"{hostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def owner_is_dead(name: str, mtime: float, ttl_s: float) -> bool:
    """Whether the process whose owner tag ends `name` is gone: dead pid on this host, or idle past `ttl_s`."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return time.time() - mtime > ttl_s
    host, pid = parts[1], int(parts[2])
    if host == hostname():
        return not pid_alive(pid)
    return time.time() - mtime > ttl_s


@dataclass(frozen=True)
class Version:
    """One version of a lock file as read: its bytes, an opaque tag (inode+mtime, or ETag) and its mtime."""

    raw: bytes
    tag: Any
    mtime: float


class LockFiles(Protocol):
    """The primitives a backend offers for `locks/<id>.lock`."""

    def create(self, slide_id: str, data: bytes) -> Any | None:
        """Write the lock only if absent; its new tag, or None when it exists."""

    def read(self, slide_id: str) -> Version | None:
        """The current version, or None when there is no lock."""

    def replace(self, slide_id: str, data: bytes, tag: Any) -> Any | None:
        """Overwrite only if the lock is still version `tag`; the new tag, or None."""

    def remove(self, slide_id: str, tag: Any) -> bool:
        """Delete only if the lock is still version `tag`."""

    def ids(self) -> list[str]:
        """Slide ids that have a lock file."""

    def where(self, slide_id: str) -> str:
        """The lock's path or URL, for messages."""


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc).isoformat(timespec="seconds")


def new_record(ttl_s: float, token: str | None = None, started: str | None = None) -> dict[str, Any]:
    now = time.time()
    return {"pid": os.getpid(), "host": hostname(), "started": started or _now_iso(now), "renewed": _now_iso(now),
            "expires": round(now + ttl_s, 3), "ttl": ttl_s, "token": token or uuid.uuid4().hex}


def describe(version: Version) -> dict[str, Any]:
    """The owner record of a lock version plus `age_s` (since started); {'unreadable': True} for bad JSON."""
    try:
        record = json.loads(version.raw)
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except ValueError:
        record = {"unreadable": True}
    try:
        started = datetime.fromisoformat(record["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        started = version.mtime
    return {**record, "mtime": version.mtime, "age_s": time.time() - started}


def is_stale(info: dict[str, Any], ttl_s: float = DEFAULT_TTL_S) -> bool:
    """Dead owner on this host, lease expired (or, for records without one, older than `ttl_s`), or unreadable
    for longer than a grace period."""
    if info.get("unreadable"):
        return time.time() - info["mtime"] > UNREADABLE_GRACE_S
    if info.get("host") == hostname() and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return True
    expires = info.get("expires")
    if isinstance(expires, (int, float)):
        return time.time() > expires
    return info["age_s"] > ttl_s


class SlideLock:
    """A held lease on one slide. The store's heartbeat renews it; release() (or leaving `with`) gives it up."""

    def __init__(self, files: LockFiles, slide_id: str, record: dict[str, Any], tag: Any,
                 heartbeat: Heartbeat | None = None) -> None:
        self.files = files
        self.slide_id = slide_id
        self.record = record
        self.tag = tag
        self.lost = False
        self.released = False
        self._guard = threading.Lock()
        self._heartbeat = heartbeat
        if heartbeat is not None:
            heartbeat.add(self)

    @property
    def token(self) -> str:
        return self.record["token"]

    def renew(self) -> bool:
        """Push the expiry forward; False (and `lost`) when the lock is no longer ours."""
        with self._guard:
            if self.released or self.lost:
                return not self.lost
            record = new_record(self.record["ttl"], self.token, self.record["started"])
            tag = self.files.replace(self.slide_id, json.dumps(record).encode(), self.tag)
            if tag is None:
                self.lost = True
                return False
            self.record, self.tag = record, tag
            return True

    def held(self) -> bool:
        """Whether the lock file is still this lease and unexpired (one read; works in any process that was given
        the lease's record, e.g. a Ray actor writing for the driver that holds the lock)."""
        version = self.files.read(self.slide_id)
        if self.lost or version is None:
            return False
        info = describe(version)
        return info.get("token") == self.token and time.time() < info.get("expires", 0)

    def release(self) -> None:
        with self._guard:
            if self.released:
                return
            self.released = True
            if self._heartbeat is not None:
                self._heartbeat.discard(self)
            margin = min(RELEASE_MARGIN_S, self.record["ttl"] / 4)
            if not self.lost and time.time() < self.record["expires"] - margin:
                self.files.remove(self.slide_id, self.tag)

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class Heartbeat:
    """One daemon thread per store that renews every held lease a few times per TTL."""

    def __init__(self, ttl_s: float) -> None:
        self.interval = max(0.2, min(ttl_s / 4, 60.0))
        self._leases: set[SlideLock] = set()
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lease: SlideLock) -> None:
        with self._guard:
            self._leases.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, lease: SlideLock) -> None:
        with self._guard:
            self._leases.discard(lease)

    def _loop(self) -> None:
        while not self._wake.wait(self.interval):
            with self._guard:
                leases = list(self._leases)
            for lease in leases:
                try:
                    lease.renew()
                except Exception:  # a transient storage error: the next beat retries, the lease has slack
                    continue


def acquire(files: LockFiles, slide_id: str, ttl_s: float = DEFAULT_TTL_S,
            heartbeat: Heartbeat | None = None) -> tuple[SlideLock | None, dict[str, Any] | None]:
    """(lock, None) when acquired, else (None, the holder's record)."""
    holder = None
    for _ in range(5):
        record = new_record(ttl_s)
        data = json.dumps(record).encode()
        tag = files.create(slide_id, data)
        if tag is not None:
            return SlideLock(files, slide_id, record, tag, heartbeat), None
        version = files.read(slide_id)
        if version is None:
            continue
        holder = describe(version)
        if not is_stale(holder, ttl_s):
            return None, holder
        tag = files.replace(slide_id, data, version.tag)  # take over the stale lease only if it is unchanged
        if tag is not None:
            return SlideLock(files, slide_id, record, tag, heartbeat), None
    return None, holder


def locked_error(files: LockFiles, slide_id: str, holder: dict[str, Any] | None, store: str) -> LockedError:
    owner = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
             if holder and "pid" in holder else "another process")
    return LockedError(f"Slide '{slide_id}' in store {store} is locked by {owner}; wait for that extractor to "
                       f"finish (`mrantool extract ... --wait`) or, if it is gone, run `mrantool check {store} "
                       "--clear-stale-locks` once its lease has expired.")


def list_locks(files: LockFiles, ttl_s: float = DEFAULT_TTL_S) -> list[dict[str, Any]]:
    """One record per lock: slide_id, pid, host, started, expires, age_s, stale, path."""
    records = []
    for slide_id in files.ids():
        version = files.read(slide_id)
        if version is None:
            continue
        info = describe(version)
        records.append({"slide_id": slide_id, "pid": info.get("pid"), "host": info.get("host"),
                        "started": info.get("started"), "expires": info.get("expires"),
                        "age_s": round(info["age_s"], 1), "stale": is_stale(info, ttl_s),
                        "path": files.where(slide_id)})
    return records


def clear_locks(files: LockFiles, force: bool = False, ttl_s: float = DEFAULT_TTL_S) -> list[str]:
    """Remove stale locks (every lock with `force`), each only if unchanged since judged; return their ids."""
    cleared = []
    for slide_id in files.ids():
        version = files.read(slide_id)
        if version is not None and (force or is_stale(describe(version), ttl_s)) \
                and files.remove(slide_id, version.tag):
            cleared.append(slide_id)
    return cleared
