"""Mosaic cohorts from labelled tiles: sparse-signal slides made of real tissue, with the truth of every tile.

Each slide is `tiles_per_slide` tiles on a regular grid with no gaps (`ceil(sqrt(M))` columns, filled row by row;
unfilled places of the last row are glass), inside an optional glass margin. Half the slides (`n_slides // 2`) are
positive: `positives` label-1 tiles at random places among label-0 tiles; negative slides hold label-0 tiles only.
Each distinct tile (see `tiles.read_tile_list`: byte-identical copies are one tile) is used at most once per
cohort. Slides are lossless pyramidal TIFFs at the tiles' mpp, so their pixels are the tiles' decoded pixels;
`tiles.csv` records where each tile went (slide_id, level-0 x, y, w, h, label, source) and `labels.csv`
(slide_id,label), written last, marks the cohort complete. Everything is drawn from one seed.

Without gaps there is no glass between tiles for tissue detection to cut out, and a bag or patch spanning a seam
sees two tiles side by side, as tissue borders do; the seams are straight lines a model could use only as a
position cue, the same on positive and negative slides.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mrantool.cohorts.tiles import Tile, TileList, read_tile_list
from mrantool.errors import ConfigError
from mrantool.files import atomic_path, output_folder
from mrantool.slides.writer import write_pyramid_tiff

GLASS = (242, 240, 244)  # the colour of empty glass, as on the generated slides


@dataclass(frozen=True)
class MosaicCohort:
    """What was written: labels.csv, tiles.csv and the slides' layout."""

    labels: Path
    placements: Path
    n_slides: int
    n_positive: int
    grid: tuple[int, int]  # (columns, rows) of tiles
    tile_size: tuple[int, int]  # (w, h) px
    slide_size: tuple[int, int]  # (w, h) level-0 px, margins included
    tiles: TileList


def plan_cohort(tiles: TileList, n_slides: int, tiles_per_slide: int, positives: int,
                seed: int) -> list[tuple[int, list[Tile]]]:
    """(slide label, its tiles in grid order) per slide; a ConfigError when there are too few distinct tiles."""
    n_pos = n_slides // 2
    n_neg = n_slides - n_pos
    need = {0: n_neg * tiles_per_slide + n_pos * (tiles_per_slide - positives), 1: n_pos * positives}
    pools = {label: tiles.with_label(label) for label in (0, 1)}
    if any(len(pools[k]) < need[k] for k in (0, 1)):
        raise ConfigError(
            f"{n_slides} slides of {tiles_per_slide} tiles with {positives} positive tile(s) on each of {n_pos} "
            f"positive slides need {need[0]} label-0 and {need[1]} label-1 distinct tiles, but {tiles.csv} has "
            f"{len(pools[0])} and {len(pools[1])} ({tiles.n_copies} byte-identical copies counted once"
            f"{f', {tiles.n_conflicting} rows with conflicting labels left out' if tiles.n_conflicting else ''}); "
            "lower --slides, --tiles-per-slide or --positives."
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    slide_labels = rng.permutation([1] * n_pos + [0] * n_neg)
    drawn = {k: iter([pools[k][i] for i in rng.permutation(len(pools[k]))[: need[k]]]) for k in (0, 1)}
    plan = []
    for label in slide_labels:
        hot = set(rng.choice(tiles_per_slide, positives, replace=False).tolist()) if label else set()
        plan.append((int(label), [next(drawn[1 if i in hot else 0]) for i in range(tiles_per_slide)]))
    return plan


def _read_tile(tile: Tile, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(tile.path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"Tile {tile.path} cannot be read as an image ({exc}); remove it from the tile list or "
                          "replace the file.") from None
    if size is not None and (rgb.shape[1], rgb.shape[0]) != size:
        raise ConfigError(f"Tile {tile.path} is {rgb.shape[1]}x{rgb.shape[0]} px but the others are "
                          f"{size[0]}x{size[1]}; a mosaic needs tiles of one size: resize or leave it out.")
    return rgb


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[object]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_mosaic_cohort(
    out_dir: str | Path,
    tiles_dir: str | Path,
    tile_labels: str | Path | None = None,
    *,
    tile_mpp: float,
    n_slides: int = 12,
    tiles_per_slide: int = 64,
    positives: int = 4,
    seed: int = 0,
    label_column: str | None = None,
    margin: int = 0,
) -> MosaicCohort:
    """Write `mosaic-NNN.tiff` slides, `tiles.csv` and, last, `labels.csv` into `out_dir` (see the module doc).

    `tile_labels` defaults to `tiles_dir/labels.csv`; `margin` is the glass border in level-0 px.
    """
    problems = [msg for bad, msg in (
        (n_slides < 2, f"--slides {n_slides} (a cohort needs at least 2)"),
        (tiles_per_slide < 1, f"--tiles-per-slide {tiles_per_slide} (use 1 or more)"),
        (not 1 <= positives <= tiles_per_slide, f"--positives {positives} (use 1 to --tiles-per-slide)"),
        (not tile_mpp > 0, f"--tile-mpp {tile_mpp} (the tiles' microns per pixel, e.g. 0.97 for PCam)"),
        (margin < 0, f"--margin {margin} (use 0 or more px)"),
        (seed < 0, f"--seed {seed} (use 0 or more)"),
    ) if bad]
    if problems:
        raise ConfigError(f"Invalid mosaic settings: {'; '.join(problems)}; fix them and run again.")
    tiles = read_tile_list(tile_labels or Path(tiles_dir) / "labels.csv", tiles_dir, label_column)
    plan = plan_cohort(tiles, n_slides, tiles_per_slide, positives, seed)
    first = _read_tile(plan[0][1][0], None)
    tw, th = first.shape[1], first.shape[0]
    cols = math.ceil(math.sqrt(tiles_per_slide))
    rows = math.ceil(tiles_per_slide / cols)
    size = (cols * tw + 2 * margin, rows * th + 2 * margin)
    out = output_folder(out_dir, "The cohort folder")
    placements, labels = [], []
    for index, (label, members) in enumerate(plan):
        slide_id = f"mosaic-{index:03d}"
        canvas = np.empty((size[1], size[0], 3), np.uint8)
        canvas[:] = GLASS
        for place, tile in enumerate(members):
            x, y = margin + (place % cols) * tw, margin + (place // cols) * th
            canvas[y : y + th, x : x + tw] = _read_tile(tile, (tw, th))
            placements.append((slide_id, x, y, tw, th, tile.label, tile.source))
        write_pyramid_tiff(out / f"{slide_id}.tiff", canvas, mpp=tile_mpp, jpeg=False)
        labels.append((slide_id, label))
    placements_csv = out / "tiles.csv"
    _write_csv(placements_csv, ("slide_id", "x", "y", "w", "h", "label", "source"), placements)
    labels_csv = out / "labels.csv"
    _write_csv(labels_csv, ("slide_id", "label"), labels)
    return MosaicCohort(labels_csv, placements_csv, n_slides, n_slides // 2, (cols, rows), (tw, th), size, tiles)
