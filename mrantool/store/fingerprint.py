"""A cheap file fingerprint (size, mtime, hash of the first MiB) that tells whether a slide changed since extraction."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mrantool.errors import SlideError

HASH_BYTES = 1 << 20


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{size, mtime_ns, sha256_first_mib} of the file at `path`."""
    path = Path(path)
    try:
        stat = path.stat()
        with open(path, "rb") as fh:
            head = fh.read(HASH_BYTES)
    except OSError as exc:
        raise SlideError(f"Cannot read {path} to fingerprint it ({exc.strerror}); check that the file exists "
                         "and is readable.") from None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_first_mib": hashlib.sha256(head).hexdigest()}
