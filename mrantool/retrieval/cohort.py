"""Build or grow a FAISS index over a store's patch (or cell) embeddings, keeping the store's provenance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import ConfigError, MrantoolError
from mrantool.retrieval.index import EmbeddingIndex, check_compatible
from mrantool.store import FeatureStore
from mrantool.store.health import read_provenance

LEVELS = ("patch", "cell")
CENTRE_FILE = "centre.npy"  # the cohort's mean embedding, subtracted from indexed and query vectors


def load_centre(index_dir: str | Path) -> np.ndarray | None:
    """The mean embedding an index was centred on (None for an uncentred index)."""
    path = Path(index_dir) / CENTRE_FILE
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _slide_vectors(store: FeatureStore, slide_id: str, level: str, min_tissue: float) -> tuple[np.ndarray, dict]:
    """Embeddings of one slide's tissue patches (or their cells) and their (bag, patch[, cell]) ids."""
    s = store.slide(slide_id)
    bags, patches = np.nonzero(s.patch_tissue[:] >= min_tissue)
    if level == "patch":
        return s.read_patches()[bags, patches], {"bag": bags, "patch": patches}
    if s.cell_emb is None:
        raise ConfigError(f"Store {store.path} has no cell embeddings; build the index with --level patch.")
    cells = s.cell_emb
    vectors = np.concatenate([cells[b][p] for b, p in zip(bags, patches, strict=True)]) if len(bags) else \
        np.zeros((0, s.dim), np.float16)
    c = s.n_cells
    ids = {"bag": np.repeat(bags, c), "patch": np.repeat(patches, c), "cell": np.tile(np.arange(c), len(bags))}
    return vectors, ids


def _gather(store: FeatureStore, slide_ids: list[str], level: str, min_tissue: float,
            progress: Callable[[str, dict[str, Any]], None]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    vectors, columns = [], {"slide": [], "bag": [], "patch": []} | ({"cell": []} if level == "cell" else {})
    for code, slide_id in enumerate(slide_ids):
        v, ids = _slide_vectors(store, slide_id, level, min_tissue)
        vectors.append(v)
        columns["slide"].append(np.full(len(v), code, np.int64))
        for name, values in ids.items():
            columns[name].append(values.astype(np.int64))
        progress("slide", {"index": code + 1, "n_slides": len(slide_ids), "slide_id": slide_id})
    dim = store.dims.dim
    x = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return x, {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in columns.items()}


def slide_versions(store: FeatureStore, slide_ids: list[str]) -> dict[str, str | None]:
    """slide_id -> the time it was committed: which extraction of each slide an index holds."""
    return {sid: read_provenance(store.layout.slide(sid)).get("extracted_at") for sid in slide_ids}


def recorded_store(index_dir: str | Path) -> Path:
    """The store an index was built from, as recorded in its index.json."""
    index = EmbeddingIndex.load(index_dir)
    return Path(index.provenance["store"])


def check_same_store(index_dir: str | Path, provenance: dict[str, Any], store: FeatureStore) -> None:
    """MrantoolError unless `store` holds the very slides (same extraction) that the index was built from.

    A store of the same preset with the same slide names but other features would answer with wrong coordinates.
    Indexes from before slide versions were recorded are compared by store path.
    """
    built_from = provenance.get("store")
    versions = provenance.get("slides")
    fix = (f"pass --store {built_from} (the store it was built from), or rebuild the index with `mrantool index "
           f"build --store {store.path} --out {index_dir}`")
    if versions is None:
        if built_from and Path(built_from) != Path(store.path).resolve():
            raise MrantoolError(f"Index {index_dir} was built from store {built_from}, not {store.path}; {fix}.")
        return
    present = set(store.slide_ids())
    missing = [sid for sid in versions if sid not in present]
    changed = [sid for sid in versions if sid in present
               and read_provenance(store.layout.slide(sid)).get("extracted_at") != versions[sid]]
    if missing or changed:
        what = (f"lacks {len(missing)} of its slides ({', '.join(missing[:3])})" if missing else
                f"holds other extractions of {len(changed)} of its slides ({', '.join(changed[:3])})")
        raise MrantoolError(f"Index {index_dir} was built from store {built_from}, but store {store.path} {what}, "
                            f"so its hits would point at the wrong patches; {fix}.")


def build_index(store_path: str | Path, out_dir: str | Path, *, level: str = "patch", kind: str = "hnsw",
                min_tissue: float = 0.25, centre: bool = True,
                progress: Callable[[str, dict[str, Any]], None] | None = None, **params: Any) -> EmbeddingIndex:
    """Index every tissue patch (or cell) of every complete slide of the store and save it to `out_dir`.

    With `centre`, the cohort's mean embedding is subtracted first: features of one encoder share a large common
    component (post-ReLU CNN features all have cosine ~0.99), and centring makes cosine similarity discriminative.
    """
    if level not in LEVELS:
        raise ConfigError(f"--level must be one of {', '.join(LEVELS)}, got '{level}'.")
    store = FeatureStore.open(store_path)
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise MrantoolError(f"Store {store_path} has no complete slide to index; run `mrantool extract` first.")
    x, columns = _gather(store, slide_ids, level, min_tissue, progress or (lambda e, i: None))
    provenance = {"encoder": store.identity, "store": str(Path(store_path).resolve()), "level": level,
                  "min_tissue": min_tissue, "centred": centre, "slides": slide_versions(store, slide_ids)}
    mean = x.mean(axis=0) if centre else None
    index = EmbeddingIndex.build(x - mean if centre else x, columns, kind=kind, provenance=provenance,
                                 slide_names=slide_ids, **params)
    index.save(out_dir)
    if centre:
        np.save(Path(out_dir) / CENTRE_FILE, mean.astype(np.float32), allow_pickle=False)
    return index


def add_new_slides(index_dir: str | Path, store_path: str | Path,
                   progress: Callable[[str, dict[str, Any]], None] | None = None) -> list[str]:
    """Append the store's slides that the index does not hold yet (no rebuild); returns their ids."""
    index = EmbeddingIndex.load(index_dir)
    store = FeatureStore.open(store_path)
    check_compatible(index.provenance, store.identity)
    check_same_store(index_dir, index.provenance, store)
    new = [s for s in store.slide_ids() if s not in set(index.slide_names)]
    if new:
        index.provenance.setdefault("slides", {}).update(slide_versions(store, new))
        level, min_tissue = index.provenance["level"], index.provenance["min_tissue"]
        x, columns = _gather(store, new, level, min_tissue, progress or (lambda e, i: None))
        mean = load_centre(index_dir)
        index.add(x if mean is None else x - mean, columns, new)
        index.save(index_dir)
        if mean is not None:
            np.save(Path(index_dir) / CENTRE_FILE, mean, allow_pickle=False)
    return new
