"""A per-slide resolution table (`--mpp-csv FILE`, columns slide,mpp) for scanners that omit the mpp.

A row names a slide by its id (the file name without extension) or its file name. Its mpp wins over `--mpp`,
which wins over the file's metadata. Every problem is one sentence naming the table, the line and the fix.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mrantool.errors import ConfigError, MissingMppError, SlideError


@dataclass(frozen=True)
class MppTable:
    """slide name -> level-0 microns per pixel, read from `path`."""

    path: Path
    rows: dict[str, float]

    def lookup(self, slide_id: str, path: str | Path | None = None) -> float | None:
        """The row for a slide, by id or by file name; None when the table has none."""
        if slide_id in self.rows:
            return self.rows[slide_id]
        return self.rows.get(Path(path).name) if path is not None else None

    def check_covers(self, slides: Iterable[tuple[str, Path]]) -> None:
        """Every row must name one of `slides` ((id, path) pairs): a row for no slide is a typo, not a no-op."""
        names = {name for slide_id, path in slides for name in (slide_id, Path(path).name)}
        unknown = sorted(set(self.rows) - names)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ConfigError(f"mpp table {self.path} has rows for slides that are not among the SLIDES ({shown}); "
                              "name each slide by its id (the file name without extension) or its file name.")

    def missing(self, slide_id: str, path: str | Path) -> SlideError:
        """The error for a slide with neither metadata nor a row."""
        return SlideError(f"{path} has no microns-per-pixel metadata and no row in mpp table {self.path}; add the "
                          f"line '{slide_id},0.25' with its scan resolution.")

    @contextmanager
    def explain_missing(self, slide_id: str, path: str | Path) -> Iterator[None]:
        """Turn the reader's generic missing-mpp error into one that names this table."""
        try:
            yield
        except MissingMppError:
            raise self.missing(slide_id, path) from None


def read_mpp_table(path: str | Path) -> MppTable:
    """Read and validate a slide,mpp CSV."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            if "slide" not in header or "mpp" not in header:
                raise ConfigError(f"mpp table {path} needs the columns slide,mpp (found: {', '.join(header) or 'none'}"
                                  "); write a header line 'slide,mpp'.")
            rows: dict[str, float] = {}
            first_line: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                name, raw = (row.get("slide") or "").strip(), (row.get("mpp") or "").strip()
                if not name and not raw:
                    continue
                if not name:
                    raise ConfigError(f"mpp table {path} line {line} has no slide name; fill the slide column or "
                                      "delete the line.")
                try:
                    value = float(raw)
                except ValueError:
                    value = math.nan
                if not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"mpp table {path} line {line}: mpp {raw!r} for slide '{name}' is not a "
                                      "positive number; write microns per pixel, e.g. 0.25.")
                if name in rows:
                    raise ConfigError(f"mpp table {path} lists slide '{name}' twice (lines {first_line[name]} and "
                                      f"{line}); keep one row per slide.")
                rows[name], first_line[name] = value, line
    except FileNotFoundError:
        raise ConfigError(f"mpp table {path} does not exist; check the --mpp-csv path.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"mpp table {path} cannot be read ({exc}); save it as a UTF-8 CSV.") from None
    if not rows:
        raise ConfigError(f"mpp table {path} has no rows; add one 'slide,mpp' line per slide.")
    return MppTable(path, rows)
