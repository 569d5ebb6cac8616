"""labels.csv: `slide_id,label[,patient_id][,fold]`, validated against the slides a store holds.

Datasets ship their own headers (CRCHistoPhenotypes: `image,...,mil_label_has_epithelial`): `id_column` and
`label_column` name the id and label columns; other columns are ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrantool.errors import LabelsError

REQUIRED = ("slide_id", "label")
HEADER = "slide_id,label[,patient_id][,fold]"
# What spreadsheets and pandas write for a missing value: never a class name.
MISSING_MARKERS = {"nan", "na", "n/a", "#n/a", "<na>", "null", "none"}


@dataclass(frozen=True)
class Labels:
    """One row per labelled slide: `y` indexes `classes` (sorted); `folds` is None without a fold column."""

    slide_ids: list[str]
    y: np.ndarray
    classes: list[str]
    patients: list[str]
    folds: np.ndarray | None = None
    source: str = "labels"
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        """class -> number of slides."""
        return {name: int((self.y == k).sum()) for k, name in enumerate(self.classes)}


def sort_classes(values: Iterable[str]) -> list[str]:
    """Distinct class names, numerically sorted when all are numbers, else alphabetically."""
    names = set(values)
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _few(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def make_labels(slide_ids: Sequence[str], labels: Sequence[str], patients: Sequence[str] | None = None,
                folds: Sequence[int] | None = None, *, source: str = "labels",
                notes: Sequence[str] = ()) -> Labels:
    """Build `Labels` from in-memory columns (checks duplicates and the number of classes)."""
    slide_ids = [str(s) for s in slide_ids]
    labels = [str(v) for v in labels]
    seen: set[str] = set()
    dupes = sorted({s for s in slide_ids if s in seen or seen.add(s)})
    if dupes:
        raise LabelsError(f"Labels file {source} lists {len(dupes)} slide id(s) more than once "
                          f"({_few(dupes)}); keep one row per slide.")
    classes = sort_classes(labels)
    if len(classes) < 2:
        only = repr(classes[0]) if classes else "none"
        raise LabelsError(f"Labels file {source} has only one class ({only}) among its slides in the store; "
                          "a classifier needs slides of at least two classes.")
    index = {name: k for k, name in enumerate(classes)}
    return Labels(
        slide_ids=slide_ids,
        y=np.array([index[v] for v in labels], dtype=np.int64),
        classes=classes,
        patients=list(slide_ids) if patients is None else [str(p) for p in patients],
        folds=None if folds is None else np.asarray(folds, dtype=np.int64),
        source=source,
        notes=list(notes),
    )


def read_labels(path: str | Path, store_ids: Iterable[str] | None = None, *, id_column: str = "slide_id",
                label_column: str = "label") -> Labels:
    """Read and validate `path`; with `store_ids`, every labelled slide must be in the store.

    Slide ids come from `id_column` and labels from `label_column` (the CLI's --id-column / --label-column).
    Store slides without a label are ignored (a note says how many); a missing `patient_id` makes each
    slide its own patient.
    """
    path = Path(path)
    rows, columns = _read_rows(path)
    if id_column == label_column:
        raise LabelsError(f"--id-column and --label-column both name {id_column!r} in {path}; name two different "
                          "columns.")
    missing = [c for c in (id_column, label_column) if c not in columns]
    if missing:
        fix = (f"use the header {HEADER}" if (id_column, label_column) == REQUIRED else
               "check the names given to --id-column / --label-column")
        raise LabelsError(f"Labels file {path} lacks column(s) {', '.join(missing)} (it has: "
                          f"{', '.join(columns) or 'no header'}); {fix}, or name its columns with --id-column and "
                          "--label-column.")
    if not rows:
        raise LabelsError(f"Labels file {path} has a header but no rows; add one row per slide.")
    has_patient, has_fold = "patient_id" in columns, "fold" in columns
    for column in (id_column, label_column, *(["fold"] if has_fold else [])):
        empty = [line for line, row in rows if not row[column]]
        if empty:
            lines = _few([str(n) for n in empty])
            raise LabelsError(f"Labels file {path} has an empty {column} on line(s) {lines}; fill it in or "
                              "remove those rows.")
    missing_label = [line for line, row in rows if row[label_column].casefold() in MISSING_MARKERS]
    if missing_label:
        marker = next(row[label_column] for line, row in rows if line == missing_label[0])
        lines = ", ".join(map(str, missing_label[:5])) + (" ..." if len(missing_label) > 5 else "")
        raise LabelsError(f"Labels file {path} has the label {marker!r} on line(s) {lines}: a missing-value marker, "
                          "not a class; fill in the real label or remove those rows.")
    notes = []
    ids = [row[id_column] for _, row in rows]
    if store_ids is not None:
        store = set(store_ids)
        unknown = [s for s in ids if s not in store]
        if unknown:
            raise LabelsError(f"Labels file {path} names {len(unknown)} slide id(s) that are not in the "
                              f"store ({_few(unknown)}); remove those rows or extract those slides first.")
        unlabelled = sorted(store - set(ids))
        if unlabelled:
            notes.append(f"{len(unlabelled)} slide(s) in the store have no row in {path} and are ignored "
                         f"({_few(unlabelled)}).")
    folds = [_fold(path, line, row["fold"]) for line, row in rows] if has_fold else None
    patients = [row["patient_id"] or row[id_column] for _, row in rows] if has_patient else None
    return make_labels(ids, [row[label_column] for _, row in rows], patients, folds, source=str(path), notes=notes)


def _read_rows(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line number, stripped row) pairs and the stripped header."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = []
            for raw in reader:
                row = {(k or "").strip(): v.strip() if isinstance(v, str) else "" for k, v in raw.items()}
                if any(row.values()):
                    rows.append((reader.line_num, row))
    except FileNotFoundError:
        raise LabelsError(f"Labels file {path} does not exist; check the --labels path.") from None
    except IsADirectoryError:
        raise LabelsError(f"Labels file {path} is a folder; pass the CSV file itself to --labels.") from None
    except OSError as exc:
        raise LabelsError(f"Labels file {path} cannot be read ({exc.strerror}); check the --labels path.") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"Labels file {path} is not a readable UTF-8 CSV ({exc}); save it as CSV with the "
                          f"header {HEADER}.") from None
    return rows, columns


def read_label_map(path: str | Path) -> dict[str, str]:
    """slide_id -> label of a labels file (for display), read and checked like `read_labels` reads it."""
    path = Path(path)
    rows, columns = _read_rows(path)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise LabelsError(f"Labels file {path} lacks column(s) {', '.join(missing)} (it has: "
                          f"{', '.join(columns) or 'no header'}); use the header {HEADER}.")
    return {row["slide_id"]: row["label"] for _, row in rows}


def _fold(path: Path, line: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LabelsError(f"Labels file {path} has fold {value!r} on line {line}; folds must be integers "
                          "(the test fold each slide belongs to).") from None
