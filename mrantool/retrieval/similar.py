"""Similar-patch queries from a store patch, a run's most attended patches, or an image; results with a gallery."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrantool.errors import ConfigError, MrantoolError
from mrantool.files import output_file
from mrantool.retrieval.cohort import check_same_store, load_centre, recorded_store
from mrantool.retrieval.index import EmbeddingIndex, check_compatible
from mrantool.retrieval.query import search_rows
from mrantool.store import FeatureStore
from mrantool.training.labels import read_label_map
from mrantool.viz.gallery import patch_gallery, read_patches

GALLERY_HITS = 16  # neighbours per query drawn in the gallery (the table lists all k)
MAX_IMAGE_PIXELS = 4096 * 4096  # a query tile is about one patch; anything this large is a mistake


@dataclass
class Query:
    """Query vectors and where each came from (slide, bag, patch) when it came from a store."""

    vectors: np.ndarray
    labels: list[str]
    origins: list[tuple[str, int, int] | None]


@dataclass
class QueryResult:
    """Hits per query (rows of `search_rows` plus level-0 coordinates and slide labels) and the gallery."""

    rows: list[dict[str, Any]]
    gallery: Path | None = None
    queries: list[str] = field(default_factory=list)


def open_store(index_dir: str | Path, store_path: str | Path | None = None) -> FeatureStore:
    """The store to query with: `store_path`, or the one the index records (index.json) when it is None."""
    if store_path is not None:
        return FeatureStore.open(store_path)
    recorded = recorded_store(index_dir)
    if not recorded.exists():
        raise ConfigError(f"Index {index_dir} was built from store {recorded}, which no longer exists there; pass "
                          "its new location with --store.")
    return FeatureStore.open(recorded)


def patch_location(store: FeatureStore, slide_id: str, bag: int, patch: int) -> tuple[int, int]:
    """Level-0 top-left of a patch."""
    s = store.slide(slide_id)
    g = store.identity["geometry"]["grid"]
    step = s.provenance["bag_size_l0"] / g
    x0, y0 = s.coords[bag].tolist()
    row, col = divmod(patch, g)
    return round(x0 + col * step), round(y0 + row * step)


def from_patch_spec(store: FeatureStore, spec: str) -> Query:
    """`SLIDE:BAG:PATCH` -> that patch's embedding."""
    match = re.fullmatch(r"(.+):(\d+):(\d+)", spec)
    if not match:
        raise ConfigError(f"--patch must look like SLIDE:BAG:PATCH (e.g. synth-003:2:17), got '{spec}'.")
    slide_id, bag, patch = match[1], int(match[2]), int(match[3])
    s = store.slide(slide_id)
    if not (0 <= bag < s.n_bags and 0 <= patch < s.n_patches):
        raise ConfigError(f"{spec}: slide {slide_id} has bags 0..{s.n_bags - 1} and patches 0..{s.n_patches - 1}.")
    return Query(s.patch_emb[bag, patch][None].astype(np.float32), [spec], [(slide_id, bag, patch)])


def from_top_attended(store: FeatureStore, run_dir: str | Path, slide_id: str, k: int) -> Query:
    """The slide's K most attended patches in a fit run as queries."""
    from mrantool.viz.heatmap import load_attention

    attention = load_attention(run_dir, slide_id)
    if "patch" not in attention:
        raise MrantoolError(f"The run in {run_dir} saved no patch attention for {slide_id}; use --patch instead.")
    weights = attention["patch"]
    order = np.argsort(weights, axis=None)[::-1][:k]
    bags, patches = np.unravel_index(order, weights.shape)
    s = store.slide(slide_id)
    vectors = np.stack([s.patch_emb[b, p] for b, p in zip(bags, patches, strict=True)]).astype(np.float32)
    specs = [f"{slide_id}:{b}:{p}" for b, p in zip(bags, patches, strict=True)]
    return Query(vectors, specs, [(slide_id, int(b), int(p)) for b, p in zip(bags, patches, strict=True)])


def from_image(store: FeatureStore, image_path: str | Path, weights: str | Path | None = None) -> Query:
    """Encode an image tile with the store's own encoder and transforms (tile taken to be at the store's mpp)."""
    import torch
    from PIL import Image

    from mrantool.encoders.rebuild import rebuild_encoder
    from mrantool.encoders.transforms import to_tensor_batch
    from mrantool.tiling.presets import get_preset

    geometry = store.identity["geometry"]
    patch_px = geometry["bag_px"] // geometry["grid"]
    try:
        with Image.open(image_path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ConfigError(f"--image {image_path} is {width}x{height} px, far more than one patch "
                                  f"({patch_px} px at {geometry['mpp']} mpp for this store); crop one patch-sized "
                                  "tile from it and query with that.")
            rgb = np.array(image.convert("RGB"))
    except Image.DecompressionBombError:
        raise ConfigError(f"--image {image_path} has more pixels than it is safe to decode, far more than one patch "
                          f"({patch_px} px at {geometry['mpp']} mpp for this store); crop one patch-sized tile from "
                          "it and query with that.") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read the image {image_path} ({exc}); give a PNG, JPEG or TIFF tile.") from None
    encoder = rebuild_encoder(store.identity, weights).eval()
    preset = get_preset(store.identity["preset"])
    t = store.identity["transforms"]
    preset = preset.__class__(**{**preset.to_dict(), "input_px": t["input_px"], "mean": tuple(t["mean"]),
                                 "std": tuple(t["std"])})
    with torch.inference_mode():
        patch, _ = encoder(to_tensor_batch(rgb[None], preset))
    return Query(patch.numpy().astype(np.float32), [Path(image_path).name], [None])


def _slide_labels(labels_csv: str | Path | None, run_dir: str | Path | None) -> dict[str, str]:
    """slide_id -> label from a labels.csv (read like `fit` reads it), or from a run's predictions.csv."""
    if labels_csv:
        return read_label_map(labels_csv)
    predictions = Path(run_dir) / "predictions.csv" if run_dir else None
    return read_label_map(predictions) if predictions is not None and predictions.is_file() else {}


def run_query(index_dir: str | Path, store_path: str | Path, query: Query, *, k: int = 8,
              exclude_same_slide: bool = False, gallery: str | Path | None = None,
              labels_csv: str | Path | None = None, run_dir: str | Path | None = None) -> QueryResult:
    """Search the index; rows gain level-0 coordinates and slide labels; optionally a gallery of each query row."""
    index = EmbeddingIndex.load(index_dir)
    store = FeatureStore.open(store_path)
    check_compatible(index.provenance, store.identity)
    check_same_store(index_dir, index.provenance, store)
    labels = _slide_labels(labels_csv, run_dir)
    slides = [o[0] if o else "" for o in query.origins]
    mean = load_centre(index_dir)
    vectors = query.vectors if mean is None else query.vectors - mean
    k = min(k, index.count)  # more neighbours than the index holds would only be padding
    rows = search_rows(index, vectors, k, query_slides=slides, exclude_same_slide=exclude_same_slide)
    for row in rows:
        row["x"], row["y"] = patch_location(store, row["slide"], row["bag"], row["patch"])
        row["label"] = labels.get(row["slide"], "")
        row["query_name"] = query.labels[row["query"]]
    result = QueryResult(rows, queries=query.labels)
    if gallery:
        shown = [row for row in rows if row["rank"] <= GALLERY_HITS]
        result.gallery = _draw_gallery(store, query, shown, min(k, GALLERY_HITS), output_file(gallery, "--gallery"))
    return result


def _draw_gallery(store: FeatureStore, query: Query, rows: list[dict[str, Any]], k: int, out: Path) -> Path:
    """One row per query: the query patch, then its neighbours read from their slides at the store's mpp."""
    geometry = store.identity["geometry"]
    size, mpp = geometry["bag_px"] // geometry["grid"], geometry["mpp"]
    images, captions = [], []
    for q, origin in enumerate(query.origins):
        hits = [r for r in rows if r["query"] == q]
        if origin is not None:
            images += _read(store, origin[0], [patch_location(store, *origin)], size, mpp)
        else:
            images.append(np.full((size, size, 3), 255, np.uint8))
        captions.append(f"query {query.labels[q]}")
        for hit in hits:
            images += _read(store, hit["slide"], [(hit["x"], hit["y"])], size, mpp)
            label = f" ({hit['label']})" if hit["label"] else ""
            captions.append(f"{hit['slide']}{label} sim {hit['similarity']:.3f}")
        missing = k - len(hits)
        images += [np.full((size, size, 3), 255, np.uint8)] * missing
        captions += [""] * missing
    return patch_gallery(images, captions, out, cols=k + 1, tile_px=200, title="query (left) and its nearest patches")


def _read(store: FeatureStore, slide_id: str, coords: list[tuple[int, int]], size: int, mpp: float) -> list:
    prov = store.slide(slide_id).provenance
    source = Path(prov["source"])
    if not source.is_file():
        return [np.full((size, size, 3), 230, np.uint8)]  # slide moved: a grey tile, the table still has the hit
    return read_patches(source, coords, size, mpp, slide_mpp=prov.get("slide_mpp"))
