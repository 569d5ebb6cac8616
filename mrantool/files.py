"""File-system helpers used everywhere: one atomic write (temp file + rename), OS errors as one sentence.

`atomic_path(path)` yields a temporary path beside `path` for any writer (text, numpy, safetensors, PNG...)
and renames it into place only when the block succeeds, so a crash or a full disk never leaves a half file
under the final name. `os_error(exc, action, path)` turns an OSError a user can cause (full disk, read-only or
unwritable folder, a file where a folder is needed...) into a `FileSystemError` naming the path and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mrantool.errors import FileSystemError

# errno -> (what happened, what to do)
_REASONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free space (or choose a location with room) and run the command again; "
                   "what was written before is kept"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota, then run the command again"),
    errno.EROFS: ("the file system is read-only", "choose a location on a writable file system"),
    errno.EACCES: ("permission denied", "fix its permissions or choose a location you can write to"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose a location you can write to"),
    errno.EISDIR: ("it is a folder", "pass a file path instead"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path whose parents are folders"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "use a shorter name"),
    errno.EEXIST: ("it already exists", "choose a new path or remove the old one"),
    errno.ENOTEMPTY: ("the folder is not empty", "choose a new path or empty it"),
}


def os_error_message(exc: OSError, action: str = "write", path: str | os.PathLike[str] | None = None) -> str:
    """One sentence: what could not be done to which path, why, and what to do about it."""
    target = path if path is not None else (exc.filename or "a file")
    reason, fix = _REASONS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, "check the path and try again"))
    blocker = _file_in_the_way(Path(target)) if exc.errno in (errno.EEXIST, errno.ENOTDIR) else None
    if blocker is not None:
        reason, fix = f"{blocker} is a file, not a folder", "choose a path whose parents are folders"
    return f"Cannot {action} {target}: {reason}; {fix}."


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of `path` when it is a file (why a folder cannot be made there)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def os_error(exc: OSError, action: str = "write", path: str | os.PathLike[str] | None = None) -> FileSystemError:
    """`exc` as a FileSystemError with `os_error_message` (raise it `from None`)."""
    return FileSystemError(os_error_message(exc, action, path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str], temp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder created); on success rename it to `path` (replacing a
    file), else delete it.

    `temp_name` names the temporary file (the store uses owner tags so that leftovers of dead writers can be
    cleaned); by default `.<name>.tmp-<pid>-<hex>`. An OSError becomes a FileSystemError naming `path`.
    """
    path = Path(path)
    temp = path.with_name(temp_name or f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder", path.parent) from None
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        _remove(temp)
        raise os_error(exc, "write", path) from None
    except BaseException:
        _remove(temp)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, temp_name: str | None = None) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; return `path`."""
    with atomic_path(path, temp_name) as temp:
        if isinstance(data, bytes):
            temp.write_bytes(data)
        else:
            temp.write_text(data, encoding="utf-8")
    return Path(path)


def output_folder(path: str | os.PathLike[str], option: str) -> Path:
    """`path` as a folder to write into (created): an existing file there is refused in one sentence."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileSystemError(f"{option} {path} is a file, but a folder is written there; pass a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder", path) from None
    return path


def output_file(path: str | os.PathLike[str], option: str) -> Path:
    """`path` as a file to write (its folder created): an existing folder there is refused in one sentence."""
    path = Path(path)
    if path.is_dir():
        raise FileSystemError(f"{option} {path} is a folder, but a file is written there; pass a file path such "
                              f"as {path / ('out' + (path.suffix or '.csv'))}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder", path.parent) from None
    return path


def input_file(path: str | os.PathLike[str], option: str) -> Path:
    """`path` as an existing file to read: a missing path or a folder is refused in one sentence."""
    path = Path(path)
    if path.is_dir():
        raise FileSystemError(f"{option} {path} is a folder; pass the file itself.")
    if not path.is_file():
        raise FileSystemError(f"{option} {path} does not exist; check the path.")
    return path
