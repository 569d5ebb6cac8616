"""Where a store or slide lives: a local path (or file:// URL) or an fsspec URL (s3://, gs://, az://, http(s)://).

Remote locations use fsspec's usual configuration: credentials and endpoints come from the environment of each
process (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL for S3-compatible servers), never from mrantool options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mrantool.errors import StoreError

WRITABLE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
READ_ONLY_PROTOCOLS = ("http", "https")


def protocol(location: str | os.PathLike[str]) -> str:
    """'s3' for s3://bucket/x, 'file' for a plain path or file:// URL."""
    text = os.fspath(location)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is an fsspec URL other than file://."""
    return protocol(location) != "file"


def local_path(location: str | os.PathLike[str]) -> Path:
    """The filesystem path of a local location (file:// prefix removed)."""
    text = os.fspath(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for URLs (no normalisation of the scheme's double slash)."""
    return "/".join([base.rstrip("/"), *parts])


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a remote URL; StoreError naming the extra to install."""
    proto = protocol(url)
    if proto not in WRITABLE_PROTOCOLS + READ_ONLY_PROTOCOLS:
        raise StoreError(f"{url}: the {proto}:// scheme is not supported; use a local path or s3://, gs://, az:// "
                         "or http(s)://.")
    try:
        import fsspec.core

        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise StoreError(f"{url} needs the {exc.name or proto} package; install it with "
                         "`pip install 'mrantool[cloud]'`.") from None
