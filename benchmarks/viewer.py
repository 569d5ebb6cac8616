"""Viewer tile benchmark: Deep Zoom tiles through mrantool's reader vs OpenSlide's DeepZoomGenerator, cold and cached.

    python benchmarks/viewer.py                              # a generated 8192 px slide, 3 rounds (the reported run)
    python benchmarks/viewer.py --size 4096 --rounds 1 --out /tmp/viewer-bench   # a smoke run

Per round, every tile of the `--levels` highest Deep Zoom levels (256 px, no overlap) is produced cold (a fresh
slide handle, empty cache) by (a) mrantool's path (`web.tiles.read_tile` via `Slide.read_region_mpp`, then JPEG)
and (b) `openslide.deepzoom.DeepZoomGenerator(tile_size=256, overlap=0).get_tile`, then JPEG with the same quality;
then (c) the same tiles again from mrantool's tile cache, and (d) end to end through the web app (Starlette test
client: routing, id check, cache) cold and warm. Methods run in rotated order; ratios are taken within a round and
the median over rounds is reported. Writes viewer.json and viewer.md into `--out`.
"""

from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mrantool.slides.reader import open_slide
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.web.tiles import JPEG_QUALITY, BytesCache, DeepZoomLayout, encode_jpeg, read_tile

try:
    from benchmarks.common import hardware, load_average, markdown_table, median, write_results
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import hardware, load_average, markdown_table, median, write_results

TABLES = {"methods": ["method", "ms per tile", "tiles/s"]}  # columns of viewer.md


def make_slide(path: Path, size: int, seed: int) -> Path:
    """A pyramidal JPEG TIFF at 0.5 mpp with smooth pink 'tissue' and noise (JPEG sees realistic content)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 256 + 1, size // 256 + 1))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
    tissue = field > 110
    rgb = np.full((size, size, 3), 240, np.uint8)
    noise = rng.integers(-25, 25, (size, size), dtype=np.int16)
    for channel, base in enumerate((205, 120, 170)):
        rgb[..., channel] = np.where(tissue, np.clip(base + noise, 0, 255), 240).astype(np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5)


def tiles_of(layout: DeepZoomLayout, levels: int) -> list[tuple[int, int, int]]:
    out = []
    for level in range(layout.max_level - levels + 1, layout.max_level + 1):
        cols, rows = layout.tile_count(level)
        out += [(level, c, r) for r in range(rows) for c in range(cols)]
    return out


def ours(path: Path, tiles: list[tuple[int, int, int]]) -> float:
    start = time.perf_counter()
    with open_slide(path) as slide:
        layout = DeepZoomLayout(*slide.dimensions)
        for level, col, row in tiles:
            encode_jpeg(read_tile(slide, layout, level, layout.tile_box(level, col, row)))
    return time.perf_counter() - start


def openslide_dz(path: Path, tiles: list[tuple[int, int, int]]) -> float:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    start = time.perf_counter()
    with openslide.OpenSlide(str(path)) as osr:
        dz = DeepZoomGenerator(osr, tile_size=256, overlap=0, limit_bounds=False)
        for level, col, row in tiles:
            dz.get_tile(level, (col, row)).convert("RGB").save(io.BytesIO(), format="JPEG", quality=JPEG_QUALITY)
    return time.perf_counter() - start


def cached(path: Path, tiles: list[tuple[int, int, int]]) -> float:
    cache = BytesCache(capacity=len(tiles) + 1)
    with open_slide(path) as slide:
        layout = DeepZoomLayout(*slide.dimensions)
        for level, col, row in tiles:
            cache.get_or_make((level, col, row), lambda lv=level, c=col, r=row: encode_jpeg(
                read_tile(slide, layout, lv, layout.tile_box(lv, c, r))))
    start = time.perf_counter()
    for key in tiles:
        cache.get_or_make(key, lambda: b"")
    return time.perf_counter() - start


def http(store: Path, tiles: list[tuple[int, int, int]], slide_id: str) -> tuple[float, float]:
    """(cold, warm) seconds for all tiles through the web app."""
    from starlette.testclient import TestClient

    from mrantool.web.app import create_app
    from mrantool.web.server import build_viewer

    with TestClient(create_app(build_viewer(store))) as client:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            for level, col, row in tiles:
                response = client.get(f"/api/slides/{slide_id}/tiles/{level}/{col}_{row}.jpeg")
                if response.status_code != 200:
                    raise SystemExit(f"tile {level}/{col}_{row}: HTTP {response.status_code} {response.text}")
            times.append(time.perf_counter() - start)
    return times[0], times[1]


def tiny_store(slide: Path, root: Path) -> Path:
    """A store holding the slide (tiny preset), so the web app serves it."""
    from mrantool.config import ExtractConfig
    from mrantool.extract.api import extract

    store = root / "s.zarr"
    report = extract(ExtractConfig(slides=[str(slide)], store=str(store), preset="tiny", workers=0, device="cpu"))
    if report.failed:
        raise SystemExit(report.failed[0].message)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="Level-0 side of the generated slide (px).")
    parser.add_argument("--slide", type=Path, help="Use this slide instead of a generated one.")
    parser.add_argument("--levels", type=int, default=3, help="Deep Zoom levels from the top to request.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    load_start = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide or make_slide(Path(tmp) / "bench.tif", args.size, args.seed)
        with open_slide(slide) as s:
            layout = DeepZoomLayout(*s.dimensions)
        tiles = tiles_of(layout, args.levels)
        store = tiny_store(slide, Path(tmp))
        methods = {"a_ours": lambda: ours(slide, tiles), "b_openslide_dz": lambda: openslide_dz(slide, tiles),
                   "c_cached": lambda: cached(slide, tiles)}
        rounds = []
        for r in range(args.rounds):
            names = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
            row = {name: methods[name]() for name in names}
            row["d_http_cold"], row["d_http_warm"] = http(store, tiles, Path(slide).stem)
            row["load"] = load_average()
            rounds.append(row)
    n = len(tiles)
    per_tile = {k: median([row[k] for row in rounds]) / n * 1000 for k in rounds[0] if k != "load"}
    ratio = median([row["b_openslide_dz"] / row["a_ours"] for row in rounds])
    report = {"hardware": hardware(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip(),
              "load_start": load_start, "load_end": load_average(), "seconds": time.perf_counter() - started,
              "slide": str(args.slide or f"generated {args.size} px, 0.5 mpp, seed {args.seed}"),
              "size": list(layout.level_size(layout.max_level)), "levels": args.levels, "tiles": n,
              "rounds": rounds, "ms_per_tile": per_tile, "openslide_over_ours": ratio}
    hw = report["hardware"]
    rows = [[name, f"{ms:.2f}", f"{1000 / ms:.0f}" if ms > 0 else "-"] for name, ms in per_tile.items()]
    markdown = "\n".join([
        "# Viewer tile benchmark", "",
        f"{hw['date']}. {hw['cpu']}, {hw['cores']} usable cores; Python {hw['python']}; niceness {hw['niceness']}. "
        f"Load average {report['load_start']} at the start, {report['load_end']} at the end. "
        f"Git {report['git_commit']}.",
        f"Command: `{report['command']}`. Slide: {report['slide']}; {n} tiles of the top {args.levels} Deep Zoom "
        f"levels per method and round; {args.rounds} rounds, medians.", "",
        markdown_table(TABLES["methods"], rows, [False, True, True]), "",
        f"OpenSlide DeepZoomGenerator time / ours (within rounds, median): {ratio:.2f} (above 1: ours is faster).", "",
        "a = mrantool's read_tile (Slide.read_region_mpp at the level's resolution) + JPEG; b = OpenSlide's "
        "DeepZoomGenerator.get_tile + the same JPEG encoding; c = the same tiles from the tile cache; d = GET through "
        "the web app (test client), cold then warm.", ""])
    json_path, md_path = write_results(args.out, "viewer", report, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
