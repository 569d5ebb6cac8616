"""Per-slide lock files with owner pid/host, stale-lock detection and atomic breaking.

A lock is `<store>/locks/<slide_id>.lock`, created with O_CREAT|O_EXCL and holding JSON {pid, host, started,
token}. It is stale when its host is this host and its pid is dead, or when it is older than `max_age_s`.
Stale locks are broken by renaming them to a unique name and checking that the renamed file is the one judged
stale, so two breakers never both win. Owner tags (`<host>.<pid>.<hex>`) name staging directories too.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from mrantool.errors import LockedError
from mrantool.store.schema import Layout, hostname, validate_slide_id

DEFAULT_MAX_AGE_S = 24 * 3600.0
UNREADABLE_GRACE_S = 60.0  # a lock whose JSON is not written yet is live for this long after creation


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


def owner_is_dead(name: str, mtime: float, max_age_s: float) -> bool:
    """Whether the process whose owner tag ends `name` is gone: dead pid on this host, or idle past `max_age_s`."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return time.time() - mtime > max_age_s
    host, pid = parts[1], int(parts[2])
    if host == hostname():
        return not pid_alive(pid)
    return time.time() - mtime > max_age_s


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner record plus `raw`, `ino`, `mtime` and `age_s`; None when the file does not exist."""
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except ValueError:
        record = {"unreadable": True}
    started = record.get("started")
    try:
        started_ts = datetime.fromisoformat(started).timestamp() if started else stat.st_mtime
    except (TypeError, ValueError):
        started_ts = stat.st_mtime
    return {**record, "raw": raw, "ino": stat.st_ino, "mtime_ns": stat.st_mtime_ns,
            "mtime": stat.st_mtime, "age_s": time.time() - started_ts}


def is_stale(info: dict[str, Any], max_age_s: float = DEFAULT_MAX_AGE_S) -> bool:
    """Dead owner on this host, older than `max_age_s`, or unreadable for longer than a grace period."""
    if info.get("unreadable"):
        return time.time() - info["mtime"] > UNREADABLE_GRACE_S
    if info.get("host") == hostname() and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return True
    return info["age_s"] > max_age_s


def break_lock(path: Path, info: dict[str, Any]) -> bool:
    """Remove the lock at `path` only if it is still the file described by `info`; True when this call broke it."""
    aside = path.parent / f".broken-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = read_lock(aside)
    if moved is not None and all(moved[key] == info[key] for key in ("raw", "ino", "mtime_ns")):
        aside.unlink(missing_ok=True)
        return True
    # Someone broke the stale lock and took a fresh one before our rename: put theirs back.
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # filesystems without hard links
        os.rename(aside, path)
        return False
    aside.unlink(missing_ok=True)
    return False


class SlideLock:
    """A held lock on one slide; release() (or leaving the `with` block) removes it if it is still ours."""

    def __init__(self, path: Path, slide_id: str, record: dict[str, Any]) -> None:
        self.path = path
        self.slide_id = slide_id
        self.record = record
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        info = read_lock(self.path)
        if info is not None and info.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _acquire(layout: Layout, slide_id: str, max_age_s: float) -> tuple[SlideLock | None, dict[str, Any] | None]:
    """(lock, None) when acquired, else (None, holder info)."""
    path = layout.lock(validate_slide_id(slide_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is not None and is_stale(holder, max_age_s):
                break_lock(path, holder)
            elif holder is not None:
                return None, holder
            continue
        record = {"pid": os.getpid(), "host": hostname(), "started": _now_iso(), "token": uuid.uuid4().hex}
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        return SlideLock(path, slide_id, record), None
    return None, holder


def try_lock(layout: Layout, slide_id: str, max_age_s: float = DEFAULT_MAX_AGE_S) -> SlideLock | None:
    """The lock on `slide_id`, or None when a live owner holds it."""
    return _acquire(layout, slide_id, max_age_s)[0]


def lock(layout: Layout, slide_id: str, max_age_s: float = DEFAULT_MAX_AGE_S) -> SlideLock:
    """The lock on `slide_id` (use as a context manager); LockedError when a live owner holds it."""
    held, holder = _acquire(layout, slide_id, max_age_s)
    if held is None:
        owner = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
                 if holder and "pid" in holder else "another process")
        raise LockedError(f"Slide '{slide_id}' in store {layout.root} is locked by {owner}; wait for that "
                          f"extractor to finish or, if it is gone, delete {layout.lock(slide_id)}.")
    return held


def list_locks(layout: Layout, max_age_s: float = DEFAULT_MAX_AGE_S) -> list[dict[str, Any]]:
    """One record per lock file: slide_id, pid, host, started, age_s, stale, path."""
    if not layout.locks.is_dir():
        return []
    records = []
    for path in sorted(layout.locks.glob("*.lock")):
        if path.name.startswith("."):
            continue
        info = read_lock(path)
        if info is None:
            continue
        records.append({"slide_id": path.name[: -len(".lock")], "pid": info.get("pid"), "host": info.get("host"),
                        "started": info.get("started"), "age_s": round(info["age_s"], 1),
                        "stale": is_stale(info, max_age_s), "path": str(path)})
    return records


def clear_locks(layout: Layout, force: bool = False, max_age_s: float = DEFAULT_MAX_AGE_S) -> list[str]:
    """Break stale locks (every lock with `force`); return the slide ids whose locks were removed."""
    cleared = []
    for record in list_locks(layout, max_age_s):
        path = Path(record["path"])
        info = read_lock(path)
        if info is not None and (force or is_stale(info, max_age_s)) and break_lock(path, info):
            cleared.append(record["slide_id"])
    return cleared
