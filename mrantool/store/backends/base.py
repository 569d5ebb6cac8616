"""The interface every store backend implements; see posix.py and objects.py."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

StillHeld = Callable[[], bool]


class Backend(ABC):
    """The operations a FeatureStore needs from the place its bytes live."""

    root: str  # the store's path or URL, for messages
    can_write: bool

    @abstractmethod
    def root_attrs(self) -> dict[str, Any] | None:
        """The root group's attributes, None when there is no store here; StoreError when unreadable."""

    @abstractmethod
    def create_root(self, attrs: dict[str, Any]) -> None:
        """Create the root group (racing creators are fine)."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the folders writers need."""

    @abstractmethod
    def committed_ids(self) -> list[str]:
        """Sorted ids of committed slides."""

    @abstractmethod
    def committed_fingerprint(self, slide_id: str) -> tuple[bool, Any]:
        """(committed?, the fingerprint recorded at commit)."""

    @abstractmethod
    def slide_group(self, slide_id: str) -> tuple[Any, str] | None:
        """(read-only zarr group, its location) of a committed slide, None when not committed."""

    @abstractmethod
    def slide_names(self) -> list[str]:
        """Names under slides/ (committed or not), from one listing: for the case-twin rule."""

    @abstractmethod
    def slide_defects(self, slide_id: str, identity: dict[str, Any], *, deep: bool = False) -> list[str]:
        """Every defect of the committed slide (see store/health.py; empty = whole); never raises for damaged
        data."""

    @abstractmethod
    def retract(self, slide_id: str) -> None:
        """Take a committed slide out of the store (`check --repair`), so that the next extract redoes it."""

    @abstractmethod
    def new_attempt(self, slide_id: str) -> tuple[Any, str]:
        """(zarr store, location) where a writer streams a new version of the slide."""

    @abstractmethod
    def commit(self, slide_id: str, location: str, marker: dict[str, Any], still_held: StillHeld | None) -> str:
        """Make the attempt at `location` the slide's committed version; return where it now lives."""

    @abstractmethod
    def discard(self, location: str) -> None:
        """Delete an attempt that will not be committed."""

    @abstractmethod
    def touch(self, location: str) -> None:
        """Record a writer's activity on an attempt (POSIX: its directory's mtime; object stores: nothing)."""

    @abstractmethod
    def put_failure(self, slide_id: str, record: dict[str, Any]) -> str: ...

    @abstractmethod
    def clear_failure(self, slide_id: str) -> None: ...

    @abstractmethod
    def failures(self) -> dict[str, dict[str, Any]]:
        """slide_id -> failure record; an unreadable record becomes {'message': 'unreadable failure record ...'}."""

    @abstractmethod
    def lock_files(self) -> Any:
        """The `LockFiles` of this store."""

    @abstractmethod
    def clean_orphans(self, ttl_s: float, busy: Callable[[str], bool]) -> list[str]:
        """Delete attempts and temp files no live writer owns; return what went (relative names)."""

    @abstractmethod
    def abandon_attempts(self, slide_id: str) -> list[str]:
        """Delete every uncommitted attempt at `slide_id` (the caller has just taken its lock, so their writers
        lost theirs); return what went."""

    @abstractmethod
    def leftovers(self, ttl_s: float, busy: Callable[[str], bool]) -> list[tuple[str, bool]]:
        """(name relative to the root, abandoned?) of every uncommitted attempt present."""

    @abstractmethod
    def stray_entries(self) -> list[str]:
        """Entries under slides/ that are neither committed slides nor attempts."""


def failure_from(slide_id: str, raw: bytes | str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError(f"it holds {str(record)[:40]!r}, not a JSON object")
        return record
    except ValueError as exc:
        return {"slide_id": slide_id, "message": f"unreadable failure record {where}: {exc}"}


