"""`mrantool demo-data`: the generated cohort, or with `--from-tiles` a mosaic cohort of real labelled tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrantool.cohorts.mosaic import MosaicCohort, make_mosaic_cohort
from mrantool.cohorts.synthetic import DEFAULT_SIZE, make_cohort
from mrantool.errors import ConfigError


def demo_data(out: str | Path, *, n_slides: int, seed: int, size: int | None = None,
              from_tiles: str | Path | None = None, **mosaic: Any) -> Path | MosaicCohort:
    """The generated cohort's labels.csv (slides `size` px square, default 6144), or with `from_tiles` the mosaic
    cohort built with the `mosaic` settings of `make_mosaic_cohort` that are not None (tile_labels, tile_mpp,
    tiles_per_slide, positives, label_column, margin)."""
    given = {k: v for k, v in mosaic.items() if v is not None}
    if from_tiles is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"Options {flags} are for mosaic cohorts: add --from-tiles DIR or drop them.")
        return make_cohort(out, n_slides=n_slides, seed=seed, size=(size, size) if size else DEFAULT_SIZE)
    if size is not None:
        raise ConfigError("--size is for the generated cohort: a mosaic slide's size follows from --tiles-per-slide "
                          "and the tiles' size; drop --size.")
    if "tile_mpp" not in given:
        raise ConfigError("--from-tiles needs --tile-mpp, the tiles' microns per pixel (e.g. 0.97 for "
                          "PatchCamelyon).")
    return make_mosaic_cohort(out, from_tiles, n_slides=n_slides, seed=seed, **given)
