"""Write an output file atomically: to a hidden temp file beside it, renamed into place only when complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mrantool.errors import MrantoolError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on failure it is removed (`path` untouched)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MrantoolError(f"Cannot create folder {path.parent} ({exc.strerror}); choose a writable --out.") from None
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
