"""Click-to-find-similar: the stored patch under a level-0 point, and its nearest patches in a FAISS index."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import MrantoolError
from mrantool.retrieval.cohort import check_same_store, load_centre
from mrantool.retrieval.index import EmbeddingIndex, check_compatible
from mrantool.retrieval.query import search_rows
from mrantool.store import FeatureStore
from mrantool.store.geometry import bag_side_l0, locate_patch

MAX_K = 50


class SimilarPatches:
    """An index of the store's patches loaded once; queries are serialised (a FAISS index is not re-entrant)."""

    def __init__(self, index_dir: str | Path, store: FeatureStore) -> None:
        self.index = EmbeddingIndex.load(index_dir)
        check_compatible(self.index.provenance, store.identity)
        check_same_store(index_dir, self.index.provenance, store)  # same slides, not just the same encoder
        if self.index.provenance.get("level", "patch") != "patch":
            raise MrantoolError(f"Index {index_dir} holds cell embeddings; the viewer needs a patch index: build one "
                                "with `mrantool index build --level patch`.")
        self.centre = load_centre(index_dir)
        self.store = store
        self._lock = threading.Lock()

    def patch_box(self, slide_id: str, bag: int, patch: int) -> dict[str, Any]:
        """Where a stored patch is: level-0 x, y and side."""
        slide = self.store.slide(slide_id)
        grid = self.store.identity["geometry"]["grid"]
        side = bag_side_l0(slide.provenance, slide_id) / grid
        x0, y0 = (float(v) for v in slide.coords[bag])
        row, col = divmod(patch, grid)
        return {"x": round(x0 + col * side, 1), "y": round(y0 + row * side, 1), "side": round(side, 1)}

    def at_point(self, slide_id: str, x: float, y: float) -> tuple[int, int] | None:
        """(bag, patch) under level-0 (x, y) of a slide, or None outside every bag."""
        slide = self.store.slide(slide_id)
        grid = self.store.identity["geometry"]["grid"]
        return locate_patch(slide.coords[:], bag_side_l0(slide.provenance, slide_id), grid, x, y)

    def query(self, slide_id: str, bag: int, patch: int, k: int, other_slides: bool) -> list[dict[str, Any]]:
        """The k nearest patches (cosine similarity) of a stored patch, best first."""
        vector = np.asarray(self.store.slide(slide_id).patch_emb[bag, patch], np.float32)[None]
        if self.centre is not None:
            vector = vector - self.centre
        with self._lock:
            rows = search_rows(self.index, vector, min(max(1, k), MAX_K), query_slides=[slide_id],
                               exclude_same_slide=other_slides)
        return [{"slide_id": r["slide"], "bag": r["bag"], "patch": r["patch"],
                 "similarity": round(r["similarity"], 4), **self.patch_box(r["slide"], r["bag"], r["patch"])}
                for r in rows]
