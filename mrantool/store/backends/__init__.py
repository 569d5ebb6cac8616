"""Where a store's bytes go: a POSIX directory (commit by rename) or object storage through fsspec (commit marker).

Both backends give the store the same operations: root metadata, committed slide ids, a zarr store for a new
attempt at a slide, commit / discard, the failures manifest, lock files (`LockFiles`) and the clean-up of what
dead writers left. `open_backend(location)` picks one from the location. See docs/store-format.md.
"""

from __future__ import annotations

import os

from mrantool.store.backends.base import Backend
from mrantool.store.backends.objects import ObjectBackend
from mrantool.store.backends.posix import PosixBackend
from mrantool.urls import is_remote, local_path

__all__ = ["Backend", "ObjectBackend", "PosixBackend", "open_backend"]


def open_backend(location: str | os.PathLike[str]) -> Backend:
    """The backend for a local path / file:// URL, or for an fsspec URL."""
    if is_remote(location):
        return ObjectBackend(os.fspath(location).rstrip("/"))
    return PosixBackend(local_path(location))
