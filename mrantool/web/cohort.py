"""What the viewer serves: a store's committed slides, their files, labels and predictions, and nothing else.

Path safety: the browser only ever sends slide ids. An id is served when it is one of the store's committed slides
whose folder really lies inside the store (a symlink under slides/ pointing elsewhere is not served); its file is
the one given with `--slides` or recorded in the store at extraction, never a path from the browser.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from mrantool.errors import ConfigError, MrantoolError, SlideError
from mrantool.extract.inputs import collect_slides
from mrantool.store import FeatureStore
from mrantool.training.outputs import SlidePrediction, read_predictions
from mrantool.viz.heatmap import check_identity, read_run_config


class UnknownSlide(MrantoolError):
    """The browser asked for a slide the viewer does not serve."""


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def read_labels(path: str | Path) -> dict[str, str]:
    """slide_id -> label from a labels.csv (slide_id,label[,...])."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise ConfigError(f"Labels file {path} does not exist; check the --labels path.") from None
    if rows and not {"slide_id", "label"} <= set(rows[0]):
        raise ConfigError(f"{path} needs the columns slide_id,label; pass the labels.csv used by `mrantool fit`.")
    return {row["slide_id"]: row["label"] for row in rows}


class Cohort:
    """The store, optional run and labels, and the one mapping from slide id to slide file."""

    def __init__(self, store_path: str | Path, *, run_dir: str | Path | None = None,
                 labels: str | Path | None = None, slides: list[str] | None = None) -> None:
        self.store = FeatureStore.open(store_path)
        self.run_dir = Path(run_dir) if run_dir else None
        self.head: str | None = None
        if self.run_dir is not None:
            run = read_run_config(self.run_dir)
            check_identity(run, self.store, self.run_dir, self.store.path)
            self.head = str(run.get("model", "unknown"))
        self.predictions: dict[str, SlidePrediction] = read_predictions(self.run_dir) if self.run_dir else {}
        self.labels = read_labels(labels) if labels else {}
        self.files = {s.slide_id: s.path for s in collect_slides(slides)} if slides else {}
        self._ids: frozenset[str] = frozenset()
        self._resolved: dict[str, tuple[Path, float | None]] = {}
        self.refresh()

    def refresh(self) -> list[str]:
        """Re-list the committed slides whose folders lie inside the store (newly extracted slides appear)."""
        layout = self.store.layout
        ids = [sid for sid in self.store.slide_ids() if _inside(layout.slide(sid), self.store.path)]
        self._ids = frozenset(ids)
        return ids

    def slide_ids(self) -> list[str]:
        return sorted(self._ids)

    def require(self, slide_id: str) -> str:
        """`slide_id` if the viewer serves it, else UnknownSlide (the id is compared, never used as a path first)."""
        if slide_id not in self._ids:
            raise UnknownSlide(f"No slide '{slide_id}' in this viewer's store.")
        return slide_id

    def label(self, slide_id: str) -> str:
        pred = self.predictions.get(slide_id)
        return pred.label if pred and pred.label else self.labels.get(slide_id, "")

    def slide_file(self, slide_id: str) -> tuple[Path, float | None]:
        """(slide file, level-0 mpp used at extraction) of a served slide (looked up once)."""
        if slide_id not in self._resolved:
            self._resolved[slide_id] = self._find_file(slide_id)
        return self._resolved[slide_id]

    def _find_file(self, slide_id: str) -> tuple[Path, float | None]:
        provenance = self.store.provenance(self.require(slide_id))
        path = self.files.get(slide_id)
        if path is None:
            source = provenance.get("source")
            if not source or provenance.get("format"):
                raise SlideError(f"The store records no slide file for '{slide_id}' (imported features); start the "
                                 "viewer with --slides FOLDER holding the slides.")
            path = Path(source)
        if not path.is_file():
            raise SlideError(f"Slide file {path} of '{slide_id}' does not exist (moved?); start the viewer with "
                             "--slides FOLDER where the slides are now.")
        return path, provenance.get("slide_mpp")

    def rows(self) -> list[dict[str, Any]]:
        """One row per served slide for the slide table (re-listing the store first)."""
        out = []
        for slide_id in self.refresh():
            pred = self.predictions.get(slide_id)
            out.append({"slide_id": slide_id, "label": self.label(slide_id),
                        "predicted": pred.predicted if pred else "",
                        "probability": round(pred.confidence, 4) if pred else None,
                        "n_bags": self.store.provenance(slide_id).get("n_bags")})
        return out
