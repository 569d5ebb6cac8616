"""`export_h5`: a store's patch features as per-slide h5 files that CLAM and TRIDENT / Patho-Bench read.

Every patch of every bag (or those with at least `min_tissue`) becomes one row: `features` (N, D) float32 (the
stored float16 values, exactly) and `coords` (N, 2) int64, the patch's level-0 top-left corner.

- trident: `OUT/<slide>.h5`, attributes as TRIDENT writes them (`coords`: patch_size, patch_size_level0,
  level0_magnification, target_magnification, overlap, name, savetodir; `features`: name, savetodir, encoder)
  plus `mpp` (level-0 microns per pixel) and `target_mpp` on `coords`.
- clam: `OUT/h5_files/<slide>.h5` (features + coords; coords attrs patch_size in level-0 px, patch_level 0,
  level_dim) and `OUT/pt_files/<slide>.pt` (the features as a torch tensor, what CLAM trains from).

Cell embeddings are not exported (neither format has them). See docs/interop.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mrantool.errors import ConfigError, MrantoolError
from mrantool.files import atomic_path
from mrantool.store import FeatureStore
from mrantool.store.geometry import bag_side_l0, patch_corners

FORMATS = ("clam", "trident")
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class SlideExport:
    """One slide's export: status done | failed, rows written, files, or the one-sentence reason."""

    slide_id: str
    status: str
    n_patches: int = 0
    files: list[Path] = field(default_factory=list)
    message: str = ""


@dataclass
class ExportReport:
    """Per-slide results of one export run."""

    out: Path
    format: str
    results: list[SlideExport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SlideExport]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results)


@dataclass(frozen=True)
class SlideScale:
    """Resolutions of one slide's features: level-0 mpp, target mpp, patch side at target and at level 0."""

    level0_mpp: float | None
    target_mpp: float | None
    patch_px: int
    patch_l0: float


def slide_scale(store: FeatureStore, provenance: dict[str, Any], slide_id: str) -> SlideScale:
    """The resolutions recorded for one slide (extracted stores know both mpps; imported ones only level 0)."""
    geometry = store.identity["geometry"]
    patch_l0 = bag_side_l0(provenance, slide_id) / geometry["grid"]
    if geometry.get("bag_px"):
        return SlideScale(provenance.get("slide_mpp"), geometry["mpp"], geometry["bag_px"] // geometry["grid"],
                          patch_l0)
    level0 = provenance.get("mpp")  # an import records the level-0 mpp it was given
    return SlideScale(level0, level0, round(patch_l0), patch_l0)


def _number(value: float | None) -> float | int | None:
    if value is None:
        return None
    value = round(float(value), 4)
    return int(value) if value.is_integer() else value


def slide_rows(store: FeatureStore, slide_id: str, min_tissue: float) -> tuple[np.ndarray, np.ndarray, SlideScale]:
    """(features (N, D) float32, level-0 corners (N, 2) int64, scale) of a slide's patches with enough tissue."""
    slide = store.slide(slide_id)
    scale = slide_scale(store, slide.provenance, slide_id)
    tissue = np.asarray(slide.patch_tissue[:], np.float32)
    bags, patches = np.nonzero(tissue >= min_tissue) if min_tissue > 0 else np.nonzero(np.ones_like(tissue, bool))
    corners = patch_corners(slide.coords[:], scale.patch_l0 * store.identity["geometry"]["grid"],
                            store.identity["geometry"]["grid"])
    features = slide.read_patches()[bags, patches].astype(np.float32)
    return features, np.round(corners[bags, patches]).astype(np.int64), scale


def _write_trident(path: Path, slide_id: str, features: np.ndarray, coords: np.ndarray, scale: SlideScale,
                   encoder: str, out: Path) -> None:
    coord_attrs = {
        "patch_size": scale.patch_px, "patch_size_level0": round(scale.patch_l0), "overlap": 0,
        "level0_magnification": _number(10.0 / scale.level0_mpp) if scale.level0_mpp else None,
        "target_magnification": _number(10.0 / scale.target_mpp) if scale.target_mpp else None,
        "mpp": _number(scale.level0_mpp), "target_mpp": _number(scale.target_mpp), "name": slide_id,
        "savetodir": str(out),
    }
    with atomic_path(path) as temp, h5py.File(temp, "w") as h5:
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords)
        h5["features"].attrs.update({"name": slide_id, "savetodir": str(out), "encoder": encoder})
        h5["coords"].attrs.update({k: v for k, v in coord_attrs.items() if v is not None})


def _write_clam(out: Path, slide_id: str, features: np.ndarray, coords: np.ndarray, scale: SlideScale,
                level0_size: Sequence[int] | None) -> list[Path]:
    import torch

    h5_path, pt_path = out / "h5_files" / f"{slide_id}.h5", out / "pt_files" / f"{slide_id}.pt"
    with atomic_path(h5_path) as temp, h5py.File(temp, "w") as h5:
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords)
        attrs: dict[str, Any] = {"patch_size": round(scale.patch_l0), "patch_level": 0, "downsample": [1.0, 1.0],
                                 "name": slide_id}
        if level0_size:
            attrs["level_dim"] = list(level0_size)
        h5["coords"].attrs.update(attrs)
    with atomic_path(pt_path) as temp:
        torch.save(torch.from_numpy(features), temp)
    return [h5_path, pt_path]


def export_h5(store_path: str | Path, out: str | Path, *, fmt: str = "trident", slides: Sequence[str] | None = None,
              min_tissue: float = 0.0, progress: Progress | None = None) -> ExportReport:
    """Write one h5 file per slide of the store in `fmt` (clam | trident); a bad slide fails alone."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; use --format {' or --format '.join(FORMATS)}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be between 0 and 1, got {min_tissue}.")
    started = time.perf_counter()
    store = FeatureStore.open(store_path)
    ids = list(slides) if slides else store.slide_ids()
    if not ids:
        raise MrantoolError(f"Store {store_path} has no complete slide to export; run `mrantool extract` first.")
    out = Path(out)
    report = ExportReport(out, fmt)
    emit = progress or (lambda event, info: None)
    encoder = str(store.identity["encoder"])
    for slide_id in ids:
        result = SlideExport(slide_id, "failed")
        try:
            features, coords, scale = slide_rows(store, slide_id, min_tissue)
            if fmt == "trident":
                path = out / f"{slide_id}.h5"
                _write_trident(path, slide_id, features, coords, scale, encoder, out)
                result.files = [path]
            else:
                result.files = _write_clam(out, slide_id, features, coords, scale,
                                           store.provenance(slide_id).get("level0_size"))
            result.status, result.n_patches = "done", len(features)
        except MrantoolError as exc:
            result.message = str(exc)
        except OSError as exc:
            result.message = f"Writing {slide_id} under {out} failed ({exc.strerror or exc}); free space or choose " \
                             "another --out."
        report.results.append(result)
        emit("slide_end", {"result": result})
    report.seconds = time.perf_counter() - started
    return report
