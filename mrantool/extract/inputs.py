"""Turn SLIDES arguments (files, folders, CSVs with a slide_path column) into a validated, shardable slide list."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mrantool.errors import ConfigError
from mrantool.slide_ids import FIX, slide_id_problem
from mrantool.slides.plain import IMAGE_SUFFIXES
from mrantool.slides.reader import slide_id_from_path

#: Files a folder is listed for: whole-slide formats and plain images (PNG, JPEG, BMP: these need --mpp).
SLIDE_SUFFIXES = {
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm", *IMAGE_SUFFIXES,
}


@dataclass(frozen=True)
class SlideInput:
    """One slide to process: its id (unique in a store), file, and level-0 mpp when a table gives it."""

    slide_id: str
    path: Path
    mpp: float | None = None


def collect_slides(items: list[str | Path]) -> list[SlideInput]:
    """Files are taken as given, folders are listed for slide files, CSVs give `slide_path` (and `slide_id`)."""
    found: list[SlideInput] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += [
                SlideInput(slide_id_from_path(p), p)
                for p in sorted(path.iterdir())
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            ]
        elif path.suffix.lower() == ".csv":
            found += _from_csv(path)
        else:
            found.append(SlideInput(slide_id_from_path(path), path))
    if not found:
        shown = ", ".join(str(i) for i in items[:3]) or "nothing"
        raise ConfigError(f"No slide files found in {shown} (looked for {', '.join(sorted(SLIDE_SUFFIXES))}); pass "
                          "slide files, folders holding them, or a CSV with a slide_path column.")
    return validate_ids(found)


def _from_csv(path: Path) -> list[SlideInput]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ConfigError(f"Slide list {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"Slide list {path} cannot be read as a UTF-8 CSV ({exc}); save it as CSV with a "
                          "slide_path column.") from None
    if not rows or "slide_path" not in rows[0]:
        raise ConfigError(f"{path} has no 'slide_path' column; a slide list CSV needs slide_path[,slide_id].")
    out = []
    for row in rows:
        slide_path = Path(row["slide_path"])
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        out.append(SlideInput(row.get("slide_id") or slide_id_from_path(slide_path), slide_path))
    return out


def validate_ids(slides: list[SlideInput]) -> list[SlideInput]:
    """Ids must be unique, also ignoring case: two files with one id is an error, not an overwrite.

    An id that cannot name a slide (see mrantool.slide_ids) is kept: that slide fails alone, in the run's report.
    """
    seen: dict[str, SlideInput] = {}
    for s in slides:
        if slide_id_problem(s.slide_id):
            continue
        twin = seen.get(s.slide_id.casefold())
        if twin is not None and twin.path != s.path:
            same = "the slide id" if twin.slide_id == s.slide_id else "slide ids that differ only in case"
            raise ConfigError(f"Two files have {same} '{twin.slide_id}' / '{s.slide_id}': {twin.path} and {s.path}; "
                              f"{FIX} so that every id is unique.")
        seen[s.slide_id.casefold()] = s
    unique = {(s.slide_id, s.path): s for s in slides}
    return list(unique.values())


def id_problem(slide_id: str, twin_of: Callable[[str], str | None]) -> str | None:
    """Why a slide with this id cannot go into a store (None when it can); `twin_of` finds an id of the store
    that differs only in case (FeatureStore.case_twin)."""
    problem = slide_id_problem(slide_id)
    if problem:
        return f"Invalid slide id {slide_id!r}: {problem}; {FIX}."
    twin = twin_of(slide_id)
    if twin:
        return (f"Slide id '{slide_id}' differs only in case from '{twin}' already in the store (one folder on "
                f"case-insensitive file systems); {FIX}.")
    return None


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard must look like i/n with 0 <= i < n (e.g. 0/4), got '{text}'.")
    return int(match[1]), int(match[2])


def shard(slides: list[SlideInput], index: int, count: int) -> list[SlideInput]:
    """Deterministic split: slides sorted by id, every count-th one from position `index`."""
    ordered = sorted(slides, key=lambda s: s.slide_id)
    return ordered[index::count]
