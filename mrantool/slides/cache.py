"""A local cache for slides on object storage or HTTP: OpenSlide needs a local file.

A slide at a URL is copied once to `<cache>/<hash of the URL>/<file name>` through a temp file and a rename, with
a sidecar `<file name>.json` recording the remote size and ETag; a cached copy is reused only when both still
match. The cache stays under `max_bytes` by deleting the least recently used slides before a download (a slide
being read by another process keeps its open handle: unlinking does not disturb OpenSlide). Concurrent
processes on one machine download a slide once (a lock file per slide), and temp files of dead downloads are
deleted. A slide larger than the whole budget is refused with a sentence naming `--cache-gb`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from mrantool.errors import SlideError
from mrantool.urls import filesystem, is_remote

DEFAULT_CACHE_GB = 50.0
TEMP_PREFIX = ".part-"


def default_cache_dir() -> Path:
    """$MRANTOOL_CACHE, else $XDG_CACHE_HOME/mrantool/slides, else ~/.cache/mrantool/slides."""
    if os.environ.get("MRANTOOL_CACHE"):
        return Path(os.environ["MRANTOOL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mrantool" / "slides"


def remote_fingerprint(url: str) -> dict[str, Any]:
    """{size, etag} of a remote slide (one HEAD request); SlideError naming the URL when it cannot be read."""
    try:
        fs, path = filesystem(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise SlideError(f"{url} does not exist; check the slide URL.") from None
    except Exception as exc:  # fsspec backends raise many types for credentials and network errors
        raise SlideError(f"Cannot read {url} ({type(exc).__name__}: {exc}); check the URL and credentials.") from None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified")
    return {"size": info.get("size"), "etag": str(etag) if etag is not None else None}


class SlideCache:
    """Local copies of remote slides, bounded in size, least recently used evicted first."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, max_gb: float = DEFAULT_CACHE_GB) -> None:
        if not max_gb > 0:
            raise SlideError(f"--cache-gb must be a positive size in GB, got {max_gb}.")
        self.folder = Path(folder) if folder else default_cache_dir()
        self.max_bytes = int(max_gb * 1e9)

    def path_for(self, source: str | os.PathLike[str]) -> Path:
        """Where `source` is read from: itself when local, else its (deterministic) place in the cache."""
        if not is_remote(source):
            return Path(source)
        url = os.fspath(source)
        return self.folder / hashlib.sha1(url.encode()).hexdigest()[:16] / PurePosixPath(url.split("?")[0]).name

    def fetch(self, source: str | os.PathLike[str], fingerprint: dict[str, Any] | None = None) -> Path:
        """A local file for `source`: the path itself, or a cached copy that matches the remote size and ETag."""
        target = self.path_for(source)
        if not is_remote(source):
            return target
        url = os.fspath(source)
        fingerprint = fingerprint or remote_fingerprint(url)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.parent / ".lock", "w") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)  # one download per slide across the processes of a machine
                if self._valid(target, fingerprint):
                    os.utime(target)  # most recently used
                    return target
                self._make_room(int(fingerprint.get("size") or 0), keep=target.parent)
                self._download(url, target, fingerprint)
        except OSError as exc:
            raise SlideError(f"Cannot cache {url} in {self.folder} ({exc.strerror or exc}); free disk space or pass "
                             "another --cache-dir.") from None
        return target

    def _valid(self, target: Path, fingerprint: dict[str, Any]) -> bool:
        sidecar = target.with_name(target.name + ".json")
        try:
            recorded = json.loads(sidecar.read_text())
            return recorded == fingerprint and target.stat().st_size == fingerprint.get("size")
        except (OSError, ValueError):
            return False

    def _download(self, url: str, target: Path, fingerprint: dict[str, Any]) -> None:
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
        os.close(fd)
        try:
            fs, path = filesystem(url)
            fs.get_file(path, temp)
            size = os.path.getsize(temp)
            if fingerprint.get("size") is not None and size != fingerprint["size"]:
                raise SlideError(f"{url} changed while it was copied ({size} of {fingerprint['size']} bytes); "
                                 "run extract again.")
            os.replace(temp, target)
            target.with_name(target.name + ".json").write_text(json.dumps(fingerprint))
        except (SlideError, OSError):
            raise
        except Exception as exc:  # fsspec backends raise many types for network errors
            raise SlideError(f"Cannot copy {url} ({type(exc).__name__}: {exc}); check the URL and credentials.") \
                from None
        finally:
            Path(temp).unlink(missing_ok=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of each cached slide."""
        out = []
        if not self.folder.is_dir():
            return out
        for entry in self.folder.iterdir():
            files = [f for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")] if entry.is_dir() else []
            if files:
                out.append((max(f.stat().st_mtime for f in files), sum(f.stat().st_size for f in files), entry))
        return out

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _make_room(self, incoming: int, keep: Path) -> None:
        if incoming > self.max_bytes:
            raise SlideError(f"A slide of {incoming / 1e9:.1f} GB does not fit in a slide cache of "
                             f"{self.max_bytes / 1e9:.1f} GB; raise --cache-gb.")
        entries = sorted(e for e in self.entries() if e[2] != keep)
        total = sum(size for _, size, _ in entries)
        for _, size, folder in entries:
            if total + incoming <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size

    def clean(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files of downloads that died more than `older_than_s` ago; return how many."""
        removed = 0
        if not self.folder.is_dir():
            return 0
        for temp in self.folder.glob(f"*/{TEMP_PREFIX}*"):
            try:
                if time.time() - temp.stat().st_mtime > older_than_s:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
