"""`export_qupath`: a run's attention as QuPath GeoJSON, one FeatureCollection per slide (level-0 pixels).

Follows the GeoJSON QuPath (0.4 and later) reads with File > Object data... > Import objects: every Feature has a
UUID `id`, a Polygon `geometry` in full-resolution pixel coordinates (origin top-left), and `properties` with
`objectType` ("detection" or "annotation"), `name`, `classification` {name, color [r, g, b]} and
`measurements` as a name -> number object. Each patch (or cell) becomes a detection whose measurements are its
attention, so QuPath's measurement maps colour the slide by attention; the top-K items become annotations.
See docs/qupath.md.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import ConfigError, MrantoolError
from mrantool.files import atomic_path
from mrantool.store import FeatureStore
from mrantool.training.outputs import read_predictions
from mrantool.viz.slide_attention import SlideAttention, load_slide_attention, percentile_ranks

LEVELS = ("patch", "cell")
TILE_CLASS = {"name": "mrantool attention", "color": [255, 200, 0]}
TOP_CLASS = {"name": "Attention top-K", "color": [220, 30, 30]}
_NAMESPACE = uuid.UUID("6f1f2a8e-6b58-4b8e-9d0a-6d7e0c1b2a30")  # stable ids: the same export gives the same file
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class SlideGeoJSON:
    """One slide's export: status done | failed, the file, counts, or the one-sentence reason."""

    slide_id: str
    status: str
    path: Path | None = None
    n_detections: int = 0
    n_annotations: int = 0
    message: str = ""


@dataclass
class QuPathReport:
    out: Path
    results: list[SlideGeoJSON] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SlideGeoJSON]:
        return [r for r in self.results if r.status == "failed"]


def _square(x: float, y: float, side: float) -> dict[str, Any]:
    """A closed GeoJSON Polygon ring (clockwise in image coordinates) for a level-0 square."""
    x0, y0, x1, y1 = (round(float(v), 2) for v in (x, y, x + side, y + side))
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _feature(key: str, object_type: str, name: str, geometry: dict[str, Any], classification: dict[str, Any],
             measurements: dict[str, float]) -> dict[str, Any]:
    return {"type": "Feature", "id": str(uuid.uuid5(_NAMESPACE, key)), "geometry": geometry,
            "properties": {"objectType": object_type, "name": name, "classification": classification,
                           "measurements": {k: round(float(v), 8) for k, v in measurements.items()}}}


def slide_features(att: SlideAttention, level: str, top: int) -> tuple[list[dict[str, Any]], int]:
    """The slide's detections (one per defined patch or cell) then its top-K annotations; and the detection count."""
    if level not in att.levels:
        raise MrantoolError(f"Head '{att.head}' has no {level} attention, only {', '.join(att.levels)}; use --level "
                            f"{' or --level '.join(lv for lv in LEVELS if lv in att.levels)}.")
    weights, defined, boxes = att.weights[level], att.defined[level], att.boxes(level)
    side = att.item_side(level)
    percentile = np.full(weights.shape, np.nan)
    percentile[defined] = percentile_ranks(weights[defined])
    features: list[dict[str, Any]] = []
    items = list(zip(*np.nonzero(defined), strict=True))
    for index in items:
        bag, patch = int(index[0]), int(index[1])
        cell = int(index[2]) if level == "cell" else None
        measurements = {f"Attention {level}": weights[index], f"Attention {level} percentile": percentile[index],
                        "Attention patch": att.weights["patch"][bag, patch], "Attention bag": att.weights["bag"][bag],
                        "Tissue fraction": att.tissue[bag, patch], "Bag": bag, "Patch": patch}
        if cell is not None:
            measurements["Cell"] = cell
        name = f"bag {bag} patch {patch}" + (f" cell {cell}" if cell is not None else "")
        x, y = boxes[index]
        features.append(_feature(f"{att.slide_id}:{level}:{bag}:{patch}:{cell}", "detection", name,
                                 _square(x, y, side), TILE_CLASS, measurements))
    order = sorted(items, key=lambda i: (-weights[i], i))[:top]
    for rank, index in enumerate(order, start=1):
        x, y = boxes[index]
        where = ", ".join(f"{part} {int(v)}" for part, v in zip(("bag", "patch", "cell"), index, strict=False))
        features.append(_feature(f"{att.slide_id}:{level}:top:{where}", "annotation", f"attention #{rank} ({where})",
                                 _square(x, y, side), TOP_CLASS, {f"Attention {level}": weights[index], "Rank": rank}))
    return features, len(items)


def export_qupath(run_dir: str | Path, store_path: str | Path, out: str | Path, *,
                  slides: Sequence[str] | None = None, level: str = "patch", top: int = 10,
                  progress: Progress | None = None) -> QuPathReport:
    """Write OUT/<slide_id>.geojson for `slides` (default: every slide with attention in the run)."""
    if level not in LEVELS:
        raise ConfigError(f"Unknown --level {level!r} for QuPath export; use --level patch or --level cell.")
    if top < 0:
        raise ConfigError(f"--top must be 0 or more, got {top}.")
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    store = FeatureStore.open(store_path)
    if slides is None:
        folder = run_dir / "attention"
        slides = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        if not slides:
            raise MrantoolError(f"Run {run_dir} saved no attention; re-run `mrantool fit` with save_attention = true.")
    predictions = read_predictions(run_dir)
    report = QuPathReport(out)
    emit = progress or (lambda event, info: None)
    for slide_id in slides:
        result = SlideGeoJSON(slide_id, "failed")
        try:
            att = load_slide_attention(run_dir, store, slide_id)
            features, result.n_detections = slide_features(att, level, top)
            result.n_annotations = len(features) - result.n_detections
            pred = predictions.get(slide_id)
            collection = {"type": "FeatureCollection", "features": features,
                          "mrantool": {"slide_id": slide_id, "head": att.head, "level": level, "run": str(run_dir),
                                       "label": pred.label if pred else None,
                                       "predicted": pred.predicted if pred else None,
                                       "probabilities": pred.probs if pred else None}}
            result.path = out / f"{slide_id}.geojson"
            with atomic_path(result.path) as temp:
                temp.write_text(json.dumps(collection, separators=(",", ":")))
            result.status = "done"
        except MrantoolError as exc:
            result.message = str(exc)
        except OSError as exc:
            result.message = f"Writing {slide_id}.geojson under {out} failed ({exc.strerror or exc}); choose a " \
                             "writable --out."
        report.results.append(result)
        emit("slide_end", {"result": result})
    report.seconds = time.perf_counter() - started
    return report
