"""Labelled tile lists: a CSV of tile paths (relative to a folder) and 0/1 labels, with copies counted once.

The path column is the one named `path`, else the first; the label column is the one named by `label_column`,
else the only other column. A tile is identified by the SHA-256 of its file's bytes: a byte-identical copy listed
again with the same label is the same tile (the first row is kept), and content listed with both labels is left
out, since its label is unknown. PatchCamelyon's parts hold such copies, so "each tile at most once" means each
distinct content at most once.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from mrantool.errors import ConfigError


@dataclass(frozen=True)
class Tile:
    """One distinct labelled tile."""

    path: Path  # the file
    source: str  # its path as the CSV gives it (relative to the tiles folder)
    label: int  # 0 or 1
    digest: str  # SHA-256 of the file's bytes


@dataclass(frozen=True)
class TileList:
    """The distinct tiles of a CSV, in CSV order, and what was dropped."""

    tiles: list[Tile]
    csv: Path
    n_rows: int
    n_copies: int  # rows repeating an earlier row's content and label
    n_conflicting: int  # rows whose content is listed with both labels

    def with_label(self, label: int) -> list[Tile]:
        return [t for t in self.tiles if t.label == label]


def _columns(path: Path, header: list[str], label_column: str | None) -> tuple[str, str]:
    """(path column, label column) of a tile CSV's header."""
    path_column = "path" if "path" in header else (header[0] if header else "")
    if label_column is not None:
        if label_column not in header:
            raise ConfigError(f"Tile list {path} has no column {label_column!r} (it has: {', '.join(header)}); "
                              "check --label-column.")
        return path_column, label_column
    others = [c for c in header if c != path_column]
    if len(others) != 1:
        raise ConfigError(f"Tile list {path} has columns {', '.join(header) or 'none'}: a tile list needs a path "
                          "column and one 0/1 label column; name the label column with --label-column.")
    return path_column, others[0]


def _label(path: Path, line: int, value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise ConfigError(f"Tile list {path} has the label {value!r} on line {line}; tile labels must be 0 or 1.")
    return int(number)


def read_tile_list(csv_path: str | Path, tiles_dir: str | Path, label_column: str | None = None) -> TileList:
    """Read a labelled tile list; every listed file must exist under `tiles_dir`."""
    path, folder = Path(csv_path), Path(tiles_dir)
    if not folder.is_dir():
        raise ConfigError(f"Tile folder {folder} does not exist or is not a folder; check --from-tiles.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    except FileNotFoundError:
        raise ConfigError(f"Tile list {path} does not exist; pass the CSV of tiles with --tile-labels.") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"Tile list {path} is not a readable UTF-8 CSV ({exc}); save it as CSV.") from None
    path_column, label_column = _columns(path, header, label_column)
    if not rows:
        raise ConfigError(f"Tile list {path} has no rows; list one tile per row.")
    entries = [((row[path_column] or "").strip(), _label(path, line, (row[label_column] or "").strip()), line)
               for line, row in rows]
    missing = [(source, line) for source, _, line in entries if not (folder / source).is_file()]
    if missing:
        shown = ", ".join(f"{s!r} (line {n})" for s, n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"Tile list {path} names {len(missing)} file(s) missing from {folder}: {shown}{more}; paths "
                          "are relative to the --from-tiles folder.")
    first: dict[str, Tile] = {}
    labels_of: dict[str, set[int]] = {}
    rows_of: dict[str, int] = {}
    for source, label, _ in entries:
        digest = hashlib.sha256((folder / source).read_bytes()).hexdigest()
        labels_of.setdefault(digest, set()).add(label)
        rows_of[digest] = rows_of.get(digest, 0) + 1
        first.setdefault(digest, Tile(folder / source, source, label, digest))
    conflicting = {d for d, labels in labels_of.items() if len(labels) > 1}
    tiles = [t for d, t in first.items() if d not in conflicting]
    n_conflicting = sum(rows_of[d] for d in conflicting)
    return TileList(tiles, path, len(entries), len(entries) - len(tiles) - n_conflicting, n_conflicting)
