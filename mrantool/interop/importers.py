"""`import_h5`: per-slide h5 feature bags (CLAM, TRIDENT, STAMP) into a patch-level store (no cells).

A store keeps a fixed P = bag_grid² patches per bag, so instances are grouped spatially: the coordinate
lattice (step = the most common distance between neighbours in a row or column, else the patch size in the
file's attributes) is cut into bag_grid x bag_grid blocks; each block is a bag, its missing patches get zero
features and tissue 0 (masked), present ones tissue 1. Instances that share a lattice cell (overlapping
patches, contours on another lattice offset) go to an extra bag of the same block, so every instance is
stored exactly once. Files without coordinates are packed P instances per bag in file order. Features are
read a few thousand rows at a time; a file is never held whole in RAM. See docs/import.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mrantool.errors import ConfigError, LockedError, MrantoolError, StoreError
from mrantool.store.fingerprint import file_fingerprint
from mrantool.store.reader import FeatureStore
from mrantool.store.schema import identity_differences, make_identity, validate_slide_id

FORMATS = ("clam", "trident", "stamp")
FEATURE_DATASET = {"clam": "features", "trident": "features", "stamp": "feats"}
IMPORTED_WEIGHTS = "imported"
READ_ROWS = 8192  # instances per write batch (bounds RAM: READ_ROWS x D float32 twice)
MAX_GAP = 256  # rows skipped inside one contiguous h5 read rather than starting a new read
FP16_MAX = 65504.0
TOL = 1e-3  # coordinate tolerance, in lattice steps (float µm coordinates are not exact)

Progress = Callable[[str, dict[str, Any]], None]


class ImportFailure(MrantoolError):
    """One file cannot be imported; the message is one sentence naming the file and the fix."""


@dataclass
class FileResult:
    """What happened to one file: status done | skipped (already complete) | busy (locked) | failed."""

    slide_id: str
    path: Path
    status: str
    format: str | None = None
    n_instances: int = 0
    n_bags: int = 0
    seconds: float = 0.0
    message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """Per-file results of one `import_h5` run, the store identity, and run-level notes."""

    store: Path
    results: list[FileResult] = field(default_factory=list)
    identity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_instances(self) -> int:
        return sum(r.n_instances for r in self.results if r.status == "done")


@dataclass
class H5Bag:
    """What a feature file holds, read from its metadata and coordinates (not its features)."""

    format: str
    dataset: str
    n: int
    dim: int
    encoder: str
    coords: np.ndarray | None  # (n, 2) float64 in `coords_unit`, or None
    coords_unit: str  # level0_px | um | none
    step_attr: float | None  # patch step in `coords_unit` from the attributes
    mpp: float | None
    level0_size: list[int] | None
    attrs: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BagGrouping:
    """Instances arranged into bags: `table (n_bags, P)` instance index (-1 = empty patch), bag top-left
    `coords (n_bags, 2)` in the file's coordinate unit, and how the lattice was found."""

    table: np.ndarray
    coords: np.ndarray
    step: float | None
    step_source: str  # patch_size | coords | attrs | single | none
    origin: tuple[float, float] | None
    n_stacked: int  # instances that shared a lattice cell with another and went to an extra bag


# --- reading one file's layout ---

def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """h5 attributes as JSON-friendly values (long arrays summarised)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        value = _text(value)
        if isinstance(value, np.ndarray):
            value = value.tolist() if value.size <= 64 else f"<array {value.dtype} {list(value.shape)}>"
            value = [_text(v) for v in value] if isinstance(value, list) else value
        elif isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool, list)):
            value = repr(value)  # references, compound types: kept readable, never unserialisable
        out[str(key)] = value
    return out


def _whole(value: float | None) -> float | int | None:
    """`value` as an int when it is a whole number (steps and bag sizes in pixels read better)."""
    return int(value) if value is not None and float(value).is_integer() else value


def _number(value: Any) -> float | None:
    try:
        array = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return float(array[0]) if array.size and np.isfinite(array[0]) and array[0] > 0 else None


def detect_format(h5: h5py.File) -> str | None:
    """'stamp' (a `feats` dataset), 'trident' (`features` + TRIDENT attributes), 'clam' (`features`), or None."""
    if "features" in h5:
        coords = h5.get("coords")
        coord_attrs = coords.attrs if isinstance(coords, h5py.Dataset) else {}
        trident_keys = ("patch_size_level0", "level0_magnification", "target_magnification")
        if any(k in coord_attrs for k in trident_keys) or any(k in h5["features"].attrs for k in ("savetodir",
                                                                                                    "encoder")):
            return "trident"
        return "clam"
    return "stamp" if "feats" in h5 else None


def _step_and_unit(fmt: str, root: dict[str, Any], coord_attrs: dict[str, Any],
                   notes: list[str]) -> tuple[str, float | None, list[int] | None]:
    """(coordinate unit, patch step from the attributes, level-0 size) as each format records them."""
    if fmt == "stamp":
        if root.get("unit") == "um" or "tile_size_um" in root:
            return "um", _number(root.get("tile_size_um", root.get("tile_size"))), None
        notes.append("the file records no coordinate unit; coordinates were read as level-0 pixels")
        return "level0_px", None, None
    if fmt == "trident":
        step = _number(coord_attrs.get("patch_size_level0"))
        size, overlap = _number(coord_attrs.get("patch_size")), _number(coord_attrs.get("overlap"))
        if step and size and overlap:
            step *= (size - overlap) / size
        return "level0_px", step, None
    size, level = _number(coord_attrs.get("patch_size")), coord_attrs.get("patch_level")
    downsample = _number(coord_attrs.get("downsample"))
    level0 = downsample == 1.0 or (downsample is None and level is not None and int(np.ravel(level)[0]) == 0)
    step = size * downsample if size and downsample else size if size and level0 else None
    dims = coord_attrs.get("level_dim")
    level0_size = [int(v) for v in np.ravel(dims)[:2]] if level0 and dims is not None else None
    return "level0_px", step, level0_size


def read_layout(h5: h5py.File, path: Path, fmt: str = "auto", *, mpp: float | None = None,
                encoder: str | None = None) -> H5Bag:
    """Validate a feature file's datasets and read its coordinates and metadata (features are not read)."""
    detected = detect_format(h5)
    if fmt == "auto":
        if detected is None:
            found = ", ".join(sorted(h5.keys())) or "nothing"
            raise ImportFailure(f"{path} has no `features` (CLAM/TRIDENT) or `feats` (STAMP) dataset (found: "
                                f"{found}); pass per-slide feature h5 files.")
        fmt = detected
    name = FEATURE_DATASET[fmt]
    feats = h5.get(name)
    if not isinstance(feats, h5py.Dataset):
        raise ImportFailure(f"{path} has no `{name}` dataset, which --format {fmt} needs; use --format auto or "
                            "the format that wrote the file.")
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0 or feats.dtype.kind not in "fiu":
        raise ImportFailure(f"{path}: `{name}` is {feats.dtype} of shape {feats.shape}, expected numbers of "
                            "shape (instances, dim) with at least one instance; re-export the features.")
    n, dim = (int(v) for v in feats.shape)
    root, feat_attrs = _plain_attrs(h5.attrs), _plain_attrs(feats.attrs)
    coords_ds = h5.get("coords")
    coord_attrs = _plain_attrs(coords_ds.attrs) if isinstance(coords_ds, h5py.Dataset) else {}
    notes: list[str] = []
    coords = None
    unit, step, level0_size = "none", None, None
    if coords_ds is None:
        notes.append("no coordinates: instances were packed in file order, so bags have no position "
                     "(no spatial bags, no heatmaps)")
    elif not isinstance(coords_ds, h5py.Dataset):
        raise ImportFailure(f"{path}: `coords` is a group, not a dataset; re-export the features with an "
                            "(instances, 2) coords dataset.")
    else:
        if coords_ds.shape != (n, 2) or coords_ds.dtype.kind not in "fiu":
            raise ImportFailure(f"{path}: `coords` is {coords_ds.dtype} of shape {coords_ds.shape} but "
                                f"`{name}` has {n} rows; coords must be numbers of shape ({n}, 2).")
        coords = np.asarray(coords_ds[:], dtype=np.float64)
        if not np.isfinite(coords).all():
            raise ImportFailure(f"{path}: `coords` holds NaN or inf; re-export the features.")
        unit, step, level0_size = _step_and_unit(fmt, root, coord_attrs, notes)
    name_attr = next((_text(a.get(k)) for a in (feat_attrs, root) for k in ("encoder", "extractor")
                      if a.get(k) not in (None, "", "None")), None)
    return H5Bag(fmt, name, n, dim, encoder or (str(name_attr) if name_attr else f"imported:{fmt}"), coords, unit,
                 step, mpp, level0_size, {"file": root, name: feat_attrs, "coords": coord_attrs}, notes)


# --- grouping instances into bags ---

def _mode(values: np.ndarray) -> float:
    uniq, counts = np.unique(values, return_counts=True)
    return float(uniq[counts.argmax()])  # ties -> the smallest


def infer_step(coords: np.ndarray) -> float | None:
    """The most common distance between neighbouring instances in a row (same y) or column (same x)."""
    rounded = np.round(coords, 3)
    diffs = []
    for axis in (0, 1):
        other = 1 - axis
        c = rounded[np.lexsort((rounded[:, axis], rounded[:, other]))]
        same_line = c[1:, other] == c[:-1, other]
        d = np.diff(c[:, axis])[same_line]
        diffs.append(d[d > 0])
    d = np.round(np.concatenate(diffs), 3)
    return _mode(d) if d.size else None


def group_by_lattice(coords: np.ndarray, grid: int, step: float, step_source: str) -> BagGrouping:
    """Bags = grid x grid blocks of the coordinate lattice; collisions go to extra bags of the same block."""
    n = len(coords)
    origin = np.array([_mode(np.round(c - step * np.floor(c / step + TOL), 3)) for c in coords.T])
    cell = np.floor((coords - origin) / step + TOL).astype(np.int64)
    block = np.floor_divide(cell, grid)
    pos = cell - block * grid
    patch = pos[:, 1] * grid + pos[:, 0]
    index = np.arange(n)
    order = np.lexsort((index, patch, block[:, 0], block[:, 1]))
    key = np.stack([block[order, 1], block[order, 0], patch[order]], axis=1)
    new_run = np.ones(n, bool)
    new_run[1:] = (key[1:] != key[:-1]).any(axis=1)
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    layer = np.arange(n) - run_start
    bag_keys, bag_of = np.unique(np.stack([key[:, 0], key[:, 1], layer], axis=1), axis=0, return_inverse=True)
    table = np.full((len(bag_keys), grid * grid), -1, dtype=np.int64)
    table[bag_of.ravel(), key[:, 2]] = order
    bag_xy = origin + bag_keys[:, [1, 0]] * step * grid
    return BagGrouping(table, bag_xy, step, step_source, (float(origin[0]), float(origin[1])),
                       int((layer > 0).sum()))


def group_in_order(n: int, grid: int) -> BagGrouping:
    """Consecutive chunks of P = grid² instances per bag; the last bag is padded with empty patches."""
    p = grid * grid
    n_bags = -(-n // p)
    table = np.full(n_bags * p, -1, dtype=np.int64)
    table[:n] = np.arange(n)
    return BagGrouping(table.reshape(n_bags, p), np.zeros((n_bags, 2)), None, "none", None, 0)


def group_instances(bag: H5Bag, grid: int, patch_size: float | None = None) -> BagGrouping:
    """Spatial bags when the file has coordinates, else bags in file order."""
    if bag.coords is None:
        return group_in_order(bag.n, grid)
    inferred = infer_step(bag.coords)
    for step, source in ((patch_size, "patch_size"), (inferred, "coords"), (bag.step_attr, "attrs")):
        if step:
            if source == "coords" and bag.step_attr and not np.isclose(step, bag.step_attr, rtol=TOL):
                bag.notes.append(f"coordinate step {step:g} differs from the patch size {bag.step_attr:g} in "
                                 "the attributes (overlapping or spaced patches); the coordinate step was used")
            return group_by_lattice(bag.coords, grid, float(step), source)
    return group_by_lattice(bag.coords, grid, 1.0, "single")


# --- writing ---

def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """float32 rows `rows` (sorted, unique) of a 2-d dataset, read as a few contiguous slices."""
    out = np.empty((len(rows), dataset.shape[1]), dtype=np.float32)
    breaks = np.flatnonzero(np.diff(rows) > MAX_GAP) + 1
    for part in np.split(np.arange(len(rows)), breaks):
        lo, hi = int(rows[part[0]]), int(rows[part[-1]]) + 1
        out[part] = dataset[lo:hi][rows[part] - lo]
    return out


def _slide_coords(bag: H5Bag, grouping: BagGrouping) -> tuple[np.ndarray, str, float | None]:
    """Bag coordinates for the store (int64), their unit, and the step in that unit."""
    coords, step, unit = grouping.coords, grouping.step, bag.coords_unit
    if unit == "um" and bag.mpp:
        coords, step, unit = coords / bag.mpp, (step / bag.mpp if step else None), "level0_px"
    elif unit == "um":
        bag.notes.append("coordinates are in micrometres and were stored as such; pass --mpp (level-0 microns "
                         "per pixel) to store level-0 pixels")
    return np.round(coords).astype(np.int64), unit, step


def _provenance(path: Path, fingerprint: dict[str, Any], bag: H5Bag, grouping: BagGrouping,
                grid: int) -> tuple[dict[str, Any], np.ndarray]:
    """The slide's provenance and its bag coordinates as stored."""
    coords, unit, step = _slide_coords(bag, grouping)
    if grouping.n_stacked:
        bag.notes.append(f"{grouping.n_stacked} instances shared a lattice cell with another and went to extra "
                         "bags at the same position")
    return {
        "source": str(path.resolve()), "fingerprint": fingerprint, "mpp": bag.mpp, "level0_size": bag.level0_size,
        "bag_size_l0": _whole(step * grid) if unit == "level0_px" and step else None,
        "format": bag.format, "feature_dataset": bag.dataset, "n_instances": bag.n, "coords_unit": unit,
        "step": _whole(step), "step_source": grouping.step_source, "grid_origin": grouping.origin,
        "n_stacked": grouping.n_stacked, "h5_attrs": bag.attrs, "import_notes": bag.notes,
    }, coords


def _write(store: FeatureStore, slide_id: str, h5: h5py.File, bag: H5Bag, grouping: BagGrouping,
           provenance: dict[str, Any], coords: np.ndarray, path: Path, emit: Progress) -> None:
    """Stream the bags into the store and commit; any problem aborts the slide (nothing partial is visible)."""
    started = time.perf_counter()
    table = grouping.table
    n_bags, p = table.shape
    per_batch = max(1, READ_ROWS // p)
    dataset = h5[bag.dataset]
    emit("slide_start", {"slide_id": slide_id, "n_bags": n_bags})
    with store.begin_slide(slide_id, n_bags, provenance) as writer:
        for start in range(0, n_bags, per_batch):
            rows = table[start:start + per_batch]
            present = rows >= 0
            wanted = np.unique(rows[present])
            values = _read_rows(dataset, wanted)
            if not np.isfinite(values).all():
                raise ImportFailure(f"{path}: `{bag.dataset}` holds NaN or inf values; re-export the features.")
            if np.abs(values).max(initial=0.0) > FP16_MAX:
                raise ImportFailure(f"{path}: `{bag.dataset}` has values beyond ±{FP16_MAX:g}, which float16 "
                                    "cannot store; rescale the features before importing.")
            patch_emb = np.zeros((*rows.shape, bag.dim), dtype=np.float32)
            patch_emb[present] = values[np.searchsorted(wanted, rows[present])]
            writer.write(start, coords[start:start + len(rows)], present.astype(np.float32), patch_emb)
            emit("bags", {"n": len(rows), "patches": int(present.sum())})
        writer.commit(timings={"import_s": round(time.perf_counter() - started, 3)})


def import_identity(bag: H5Bag, grid: int) -> dict[str, Any]:
    """The store identity of imported features: encoder name, dim and the bag grid (cells unknown: 1)."""
    return make_identity(encoder=bag.encoder, weights=IMPORTED_WEIGHTS, transforms={}, embed_dim=bag.dim,
                         geometry={"bag_px": None, "mpp": None, "grid": grid, "cells": 1}, preset=None,
                         has_cells=False)


def _open_store(store_path: Path, grid: int) -> FeatureStore | None:
    """The existing store (checked to be an import store with this grid), or None when there is none yet."""
    if not (store_path / "zarr.json").is_file():
        return None
    store = FeatureStore.open(store_path, writable=True)
    ident = store.identity
    if ident.get("has_cells") or ident.get("weights") != IMPORTED_WEIGHTS:
        raise StoreError(f"Store {store_path} holds features extracted by mrantool (encoder "
                         f"{ident.get('encoder')!r}), not imported ones; import h5 files into a new --store.")
    if ident["geometry"]["grid"] != grid:
        raise StoreError(f"Store {store_path} was imported with --bag-grid {ident['geometry']['grid']}, not "
                         f"{grid}; pass --bag-grid {ident['geometry']['grid']} or use a new --store.")
    return store


def _import_one(path: Path, slide_id: str, store: FeatureStore | None, store_path: Path, *, fmt: str,
                grid: int, patch_size: float | None, mpp: float | None, encoder: str | None,
                emit: Progress) -> tuple[FileResult, FeatureStore | None]:
    """Import one file (creating the store from the first good file); failures become results, not raises."""
    started = time.perf_counter()
    result = FileResult(slide_id, path, "failed")
    try:
        fingerprint = file_fingerprint(path)
        if store is not None and store.is_complete(slide_id, fingerprint):
            result.status, result.message = "skipped", "already complete"
            return result, store
        try:
            h5 = h5py.File(path, "r")
        except OSError:
            raise ImportFailure(f"{path} is not a readable HDF5 file; pass per-slide feature .h5 files.") from None
        with h5:
            bag = read_layout(h5, path, fmt, mpp=mpp, encoder=encoder)
            result.format, result.n_instances = bag.format, bag.n
            identity = import_identity(bag, grid)
            if store is None:
                store = FeatureStore.create(store_path, identity)
            diffs = identity_differences(store.identity, identity)
            if diffs:
                raise ImportFailure(f"{path} holds {bag.dim}-d features of encoder {bag.encoder!r} but store "
                                    f"{store_path} holds {store.identity['embed_dim']}-d features of encoder "
                                    f"{store.identity['encoder']!r} ({'; '.join(diffs)}); import files of one "
                                    "encoder into one store, or use a new --store.")
            grouping = group_instances(bag, grid, patch_size)
            provenance, coords = _provenance(path, fingerprint, bag, grouping, grid)
            lock = store.try_lock(slide_id)
            if lock is None:
                result.status, result.message = "busy", "another importer holds its lock"
                return result, store
            with lock:
                _write(store, slide_id, h5, bag, grouping, provenance, coords, path, emit)
        result.status, result.n_bags, result.notes = "done", len(grouping.table), bag.notes
    except LockedError:
        result.status, result.message = "busy", "another importer holds its lock"
    except MrantoolError as exc:
        result.message = str(exc)
    except Exception as exc:  # one unreadable file must not stop the run
        result.message = f"{path} could not be imported ({type(exc).__name__}: {exc}); check or re-export it."
    finally:
        result.seconds = time.perf_counter() - started
    return result, store


def collect_h5(files: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; a folder stands for the `*.h5` files directly inside it (sorted)."""
    paths: list[Path] = []
    for file in [files] if isinstance(files, (str, os.PathLike)) else files:
        path = Path(file)
        paths.extend(sorted(path.glob("*.h5")) if path.is_dir() else [path])
    return paths


def import_h5(files: Sequence[str | os.PathLike[str]], store_path: str | os.PathLike[str], *, fmt: str = "auto",
              bag_grid: int = 4, patch_size: float | None = None, mpp: float | None = None,
              encoder: str | None = None, progress: Progress | None = None) -> ImportReport:
    """Import per-slide h5 feature files into the store at `store_path` (created from the first good file).

    `fmt`: auto | clam | trident | stamp. `bag_grid`: patches per bag side (P = bag_grid²). `patch_size`:
    lattice step in the files' coordinate unit (default: inferred). `mpp`: level-0 microns per pixel (recorded,
    and converts micrometre coordinates to level-0 pixels). `encoder`: the name recorded in the store identity
    (default: the files' `encoder`/`extractor` attribute, else `imported:<format>`). A bad file becomes a
    failed result (and a failure record in the store); a file already imported with the same fingerprint is
    skipped. Raises only for problems of the whole run (bad options, a store of another kind).
    """
    if fmt not in ("auto", *FORMATS):
        raise ConfigError(f"Unknown import format {fmt!r}; use auto, {', '.join(FORMATS)}.")
    if not isinstance(bag_grid, int) or bag_grid < 1:
        raise ConfigError(f"bag_grid must be a positive integer, got {bag_grid!r}; pass e.g. --bag-grid 4.")
    for name, value in (("patch_size", patch_size), ("mpp", mpp)):
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value!r}; fix --{name.replace('_', '-')}.")
    started = time.perf_counter()
    emit = progress or (lambda event, info: None)
    store_path = Path(store_path)
    store = _open_store(store_path, bag_grid)
    report = ImportReport(store_path)
    pending_failures: list[FileResult] = []
    seen: dict[str, Path] = {}
    paths = collect_h5(files)
    emit("run_start", {"n_slides": len(paths)})
    for path in paths:
        slide_id = path.stem
        try:
            validate_slide_id(slide_id)
        except StoreError as exc:
            result = FileResult(slide_id, path, "failed", message=f"{path}: {exc}")
        else:
            if slide_id in seen:
                result = FileResult(slide_id, path, "failed", message=f"{path} has the same slide id "
                                    f"{slide_id!r} as {seen[slide_id]}; rename one of the files.")
            else:
                seen[slide_id] = path
                result, store = _import_one(path, slide_id, store, store_path, fmt=fmt, grid=bag_grid,
                                            patch_size=patch_size, mpp=mpp, encoder=encoder, emit=emit)
                if result.status == "failed":
                    pending_failures.append(result)
        if store is not None:
            for failed in pending_failures:
                store.record_failure(failed.slide_id, str(failed.path), failed.message)
            pending_failures.clear()
        report.results.append(result)
        emit("slide_end", {"result": result})
    if store is None:
        report.notes.append(f"No file could be read, so store {store_path} was not created and the failures "
                            "are only in this report.")
    report.identity = store.identity if store is not None else None
    report.seconds = time.perf_counter() - started
    return report
