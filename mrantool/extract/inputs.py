"""Turn SLIDES arguments (files, folders, CSVs with a slide_path column) into a validated, shardable slide list."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from mrantool.errors import ConfigError
from mrantool.slides.reader import slide_id_from_path

SLIDE_SUFFIXES = {
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
}
_VALID_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-+ ()\[\],]*$")


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
    return validate_ids(found)


def _from_csv(path: Path) -> list[SlideInput]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ConfigError(f"Slide list {path} does not exist; check the path.") from None
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
    """Ids must be safe names and unique: two files with one id is an error, not an overwrite."""
    seen: dict[str, Path] = {}
    for s in slides:
        if not _VALID_ID.match(s.slide_id) or s.slide_id in {".", ".."}:
            raise ConfigError(
                f"Slide id '{s.slide_id}' of {s.path} is not a valid name (letters, digits, ._-+ and no path "
                "separators); rename the file or give a slide_id column in a slide list CSV."
            )
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise ConfigError(
                f"Two files have the slide id '{s.slide_id}': {seen[s.slide_id]} and {s.path}; rename one or give "
                "unique slide_id values in a slide list CSV."
            )
        seen[s.slide_id] = s.path
    unique = {s.slide_id: s for s in slides}
    return list(unique.values())


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
