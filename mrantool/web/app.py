"""The viewer's web app (Starlette): the page, its static files, and a JSON/image API over one cohort.

Routes (slide ids are compared with the store's committed ids before anything is read; see cohort.py):
  GET /                                       the page (static/index.html)
  GET /static/...                             viewer.js, viewer.css, OpenSeadragon (shipped in the package)
  GET /api/cohort                             slides with label, prediction, probability; run/index present
  GET /api/slides/{id}                        size, mpp, Deep Zoom descriptor, attention levels, prediction
  GET /api/slides/{id}/tiles/{level}/{col}_{row}.jpeg   Deep Zoom tiles (LRU-cached)
  GET /api/slides/{id}/attention/{level}.png?scale=     attention overlay (percentile or linear colour scale)
  GET /api/slides/{id}/attention/{level}.json?scale=    its legend and the level-0 extent it covers
  GET /api/slides/{id}/tissue.svg             tissue outline
  GET /api/slides/{id}/similar?x=&y=&k=&other=          the patch under level-0 (x, y) and its nearest patches
  GET /api/slides/{id}/patches/{bag}/{patch}.jpeg       a stored patch read from the slide (at most 256 px)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mrantool.errors import MrantoolError
from mrantool.viz.slide_attention import SlideAttention, load_slide_attention
from mrantool.web.cohort import Cohort, UnknownSlide
from mrantool.web.overlays import SCALES, Overlay, attention_overlay, tissue_outline_svg
from mrantool.web.similar import MAX_K, SimilarPatches
from mrantool.web.tiles import BytesCache, DeepZoomLayout, SlideHandles, encode_jpeg, read_tile

STATIC = Path(__file__).parent / "static"
PATCH_IMAGE_PX = 256
CACHE_HEADERS = {"Cache-Control": "max-age=3600"}


class NotFound(MrantoolError):
    """A tile, level or patch that does not exist."""


class Viewer:
    """Everything the routes share: the cohort, open slides, caches and the similar-patch index."""

    def __init__(self, cohort: Cohort, similar: SimilarPatches | None = None) -> None:
        self.cohort = cohort
        self.similar = similar
        self.handles = SlideHandles()
        self.tiles = BytesCache()
        self._small: OrderedDict[tuple, Any] = OrderedDict()  # overlays, outlines, attention: a few per slide
        self._lock = threading.Lock()

    def _memo(self, key: tuple, make: Any) -> Any:
        with self._lock:
            if key in self._small:
                self._small.move_to_end(key)
                return self._small[key]
        value = make()
        with self._lock:
            self._small[key] = value
            while len(self._small) > 64:
                self._small.popitem(last=False)
        return value

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        path, mpp = self.cohort.slide_file(slide_id)
        with self.handles.use(path, mpp) as slide:
            width, height = slide.dimensions
            slide_mpp = slide.mpp
        recorded = self.cohort.store.provenance(slide_id).get("level0_size")
        if recorded and [width, height] != list(recorded):
            raise MrantoolError(f"Slide file {path} is {width}x{height} px but '{slide_id}' was extracted from a "
                                f"{recorded[0]}x{recorded[1]} px file; start the viewer with --slides pointing at the "
                                "original slides.")
        pred = self.cohort.predictions.get(slide_id)
        geometry = self.cohort.store.identity["geometry"]
        levels = self.attention(slide_id).levels if self.cohort.run_dir and self._has_attention(slide_id) else []
        return {"slide_id": slide_id, "width": width, "height": height, "mpp": slide_mpp,
                "dzi": DeepZoomLayout(width, height).dzi(f"/api/slides/{slide_id}/tiles/"),
                "attention_levels": levels, "head": self.cohort.head, "label": self.cohort.label(slide_id),
                "predicted": pred.predicted if pred else None,
                "probability": round(pred.confidence, 4) if pred else None,
                "grid": geometry["grid"], "cells": geometry["cells"], "similar": self.similar is not None}

    def _has_attention(self, slide_id: str) -> bool:
        return self.cohort.run_dir is not None and (self.cohort.run_dir / "attention" / f"{slide_id}.npz").is_file()

    def attention(self, slide_id: str) -> SlideAttention:
        if self.cohort.run_dir is None:
            raise NotFound("The viewer was started without --run, so there is no attention to show.")
        return self._memo(("attention", slide_id),
                          lambda: load_slide_attention(self.cohort.run_dir, self.cohort.store, slide_id))

    def overlay(self, slide_id: str, level: str, scale: str) -> Overlay:
        size = tuple(self.cohort.store.provenance(slide_id)["level0_size"])
        return self._memo(("overlay", slide_id, level, scale),
                          lambda: attention_overlay(self.attention(slide_id), level, scale, size))

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        def make() -> bytes:
            with self.handles.use(*self.cohort.slide_file(slide_id)) as slide:
                layout = DeepZoomLayout(*slide.dimensions)
                box = layout.tile_box(level, col, row)
                if box is None:
                    raise NotFound(f"Tile {level}/{col}_{row} does not exist for slide '{slide_id}'.")
                return encode_jpeg(read_tile(slide, layout, level, box))

        return self.tiles.get_or_make((slide_id, level, col, row), make)

    def outline(self, slide_id: str) -> str:
        path, mpp = self.cohort.slide_file(slide_id)

        def make() -> str:
            with self.handles.use(path, mpp) as slide:
                return tissue_outline_svg(slide)

        return self._memo(("outline", slide_id), make)

    def patch_image(self, slide_id: str, bag: int, patch: int) -> bytes:
        similar = self._require_similar()

        def make() -> bytes:
            features = self.cohort.store.slide(slide_id)
            if not (0 <= bag < features.n_bags and 0 <= patch < features.n_patches):
                raise NotFound(f"Slide '{slide_id}' has no bag {bag} patch {patch}.")
            box = similar.patch_box(slide_id, bag, patch)
            with self.handles.use(*self.cohort.slide_file(slide_id)) as slide:
                size = max(16, min(PATCH_IMAGE_PX, round(box["side"])))
                rgb = slide.read_region_mpp(round(box["x"]), round(box["y"]), size, slide.mpp * box["side"] / size)
            return encode_jpeg(rgb, quality=90)

        return self.tiles.get_or_make(("patch", slide_id, bag, patch), make)

    def _require_similar(self) -> SimilarPatches:
        if self.similar is None:
            raise NotFound("The viewer was started without --index; build one with `mrantool index build` and "
                           "pass --index.")
        return self.similar

    def find_similar(self, slide_id: str, x: float, y: float, k: int, other_slides: bool) -> dict[str, Any]:
        similar = self._require_similar()
        where = similar.at_point(slide_id, x, y)
        if where is None:
            return {"query": None, "hits": [], "message": "No extracted patch here: click on a tissue patch."}
        bag, patch = where
        hits = similar.query(slide_id, bag, patch, k, other_slides)
        for hit in hits:
            hit["label"] = self.cohort.label(hit["slide_id"])
            hit["image"] = f"/api/slides/{hit['slide_id']}/patches/{hit['bag']}/{hit['patch']}.jpeg"
        query = {"slide_id": slide_id, "bag": bag, "patch": patch, **similar.patch_box(slide_id, bag, patch),
                 "label": self.cohort.label(slide_id), "image": f"/api/slides/{slide_id}/patches/{bag}/{patch}.jpeg"}
        return {"query": query, "hits": hits}


def _error(exc: Exception) -> JSONResponse:
    status = 404 if isinstance(exc, (UnknownSlide, NotFound)) else 422
    return JSONResponse({"error": str(exc)}, status_code=status)


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NotFound(f"Query parameter {name} must be an integer.") from None


def _float(request: Request, name: str) -> float:
    try:
        value = float(request.query_params[name])
    except (KeyError, ValueError):
        raise NotFound(f"Query parameter {name} must be a number.") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise NotFound(f"Query parameter {name} must be a finite number.")
    return value


def create_app(viewer: Viewer) -> Starlette:
    """The Starlette app serving `viewer`."""

    def guarded(handler: Any) -> Any:
        def endpoint(request: Request) -> Response:
            try:
                params = dict(request.path_params)
                if "slide_id" in params:
                    params["slide_id"] = viewer.cohort.require(params["slide_id"])
                return handler(request, **params)
            except MrantoolError as exc:
                return _error(exc)

        return endpoint

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def cohort(request: Request) -> Response:
        return JSONResponse({"slides": viewer.cohort.rows(), "run": str(viewer.cohort.run_dir or ""),
                             "head": viewer.cohort.head, "index": viewer.similar is not None,
                             "store": str(viewer.cohort.store.path)})

    def slide(request: Request, slide_id: str) -> Response:
        return JSONResponse(viewer.slide_info(slide_id))

    def tile(request: Request, slide_id: str, level: int, col: int, row: int) -> Response:
        return Response(viewer.tile(slide_id, level, col, row), media_type="image/jpeg", headers=CACHE_HEADERS)

    def _overlay(request: Request, slide_id: str, level: str) -> Overlay:
        scale = request.query_params.get("scale", SCALES[0])
        if level not in ("bag", "patch", "cell") or scale not in SCALES:
            raise NotFound(f"Unknown attention level {level!r} or scale {scale!r}.")
        return viewer.overlay(slide_id, level, scale)

    def overlay_png(request: Request, slide_id: str, level: str) -> Response:
        return Response(_overlay(request, slide_id, level).png, media_type="image/png", headers=CACHE_HEADERS)

    def overlay_json(request: Request, slide_id: str, level: str) -> Response:
        ov = _overlay(request, slide_id, level)
        return JSONResponse({**ov.legend, "width_l0": ov.width_l0, "height_l0": ov.height_l0})

    def outline(request: Request, slide_id: str) -> Response:
        return Response(viewer.outline(slide_id), media_type="image/svg+xml", headers=CACHE_HEADERS)

    def similar(request: Request, slide_id: str) -> Response:
        k = _int(request, "k", 8)
        if not 1 <= k <= MAX_K:
            raise NotFound(f"k must be between 1 and {MAX_K}.")
        other = request.query_params.get("other", "1") not in ("0", "false")
        return JSONResponse(viewer.find_similar(slide_id, _float(request, "x"), _float(request, "y"), k, other))

    def patch(request: Request, slide_id: str, bag: int, patch: int) -> Response:
        return Response(viewer.patch_image(slide_id, bag, patch), media_type="image/jpeg", headers=CACHE_HEADERS)

    routes = [
        Route("/", index),
        Route("/api/cohort", guarded(cohort)),
        Route("/api/slides/{slide_id}", guarded(slide)),
        Route("/api/slides/{slide_id}/tiles/{level:int}/{col:int}_{row:int}.jpeg", guarded(tile)),
        Route("/api/slides/{slide_id}/attention/{level}.png", guarded(overlay_png)),
        Route("/api/slides/{slide_id}/attention/{level}.json", guarded(overlay_json)),
        Route("/api/slides/{slide_id}/tissue.svg", guarded(outline)),
        Route("/api/slides/{slide_id}/similar", guarded(similar)),
        Route("/api/slides/{slide_id}/patches/{bag:int}/{patch:int}.jpeg", guarded(patch)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.viewer = viewer
    return app
