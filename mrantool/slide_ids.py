"""The one rule for slide ids, used by extract, import, the store, runs and heatmaps.

A slide id names files and folders in a store (`slides/<id>/`, `locks/<id>.lock`) and in a run
(`attention/<id>.npz`), so it must be a safe file name on every file system: non-empty, at most 200 bytes of
UTF-8, no path separator, no control character, not starting with a dot (so never `.` or `..`). Any other
character (letters of any script, spaces, brackets, `+`, `#`...) is fine. Two ids of one store may not differ only
in case: on case-insensitive file systems (macOS, Windows shares) they would be one folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from mrantool.errors import StoreError

MAX_ID_BYTES = 200
FIX = "rename the file or give a `slide_id` column in a slide list CSV"


def slide_id_problem(slide_id: object) -> str | None:
    """Why `slide_id` cannot name a slide, or None when it can."""
    if not isinstance(slide_id, str) or not slide_id:
        return "it is empty"
    if "/" in slide_id or "\\" in slide_id or (os.altsep and os.altsep in slide_id):
        return "it contains a path separator"
    if slide_id.startswith("."):
        return "it starts with a dot"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in slide_id):
        return "it contains a control character"
    if len(slide_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"it is longer than {MAX_ID_BYTES} bytes"
    return None


def validate_slide_id(slide_id: str, fix: str = FIX) -> str:
    """Return `slide_id` if it can name a slide, else raise StoreError saying why and what to do (`fix`)."""
    problem = slide_id_problem(slide_id)
    if problem:
        raise StoreError(f"Invalid slide id {slide_id!r}: {problem}; {fix}.")
    return slide_id


def case_twin(slide_id: str, others: Iterable[str]) -> str | None:
    """Another id among `others` that equals `slide_id` except for case (None when there is none)."""
    key = slide_id.casefold()
    return next((other for other in others if other != slide_id and other.casefold() == key), None)
