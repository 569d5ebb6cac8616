"""Tile an open slide: thumbnail -> tissue mask -> bag plan, the step shared by preview and extract."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mrantool.errors import SlideError
from mrantool.slides.reader import Slide
from mrantool.slides.tissue import TILE_SATURATION, tissue_mask
from mrantool.tiling.geometry import BagPlan, plan_bags, thumbnail_size_for
from mrantool.tiling.presets import Geometry


@dataclass(frozen=True)
class SlidePlan:
    """A slide's bag plan with the thumbnail and mask it was measured on."""

    plan: BagPlan
    thumbnail: np.ndarray
    mask: np.ndarray
    downsample: float  # level-0 pixels per thumbnail pixel
    read_level: int  # the pyramid level bags are read from


def plan_slide(slide: Slide, geometry: Geometry, min_tissue: float = 0.1, *, require_tissue: bool = True) -> SlidePlan:
    """Find tissue on the slide's thumbnail and place bags where there is enough of it."""
    thumb, ds = slide.thumbnail(thumbnail_size_for(slide.dimensions, geometry, slide.mpp))
    # A plain image (tile, ROI, TMA core) may be all tissue, leaving Otsu no background to separate: use the fixed
    # tile threshold there, as for tiles.
    mask = tissue_mask(thumb, sat_threshold=TILE_SATURATION if slide.backend == "image" else None)
    plan = plan_bags(slide.dimensions, slide.mpp, geometry, mask, ds, min_tissue=min_tissue)
    if require_tissue and plan.n_bags == 0:
        raise SlideError(
            f"No bag of {slide.path} has at least {min_tissue:.0%} tissue (found {mask.mean():.1%} tissue overall); "
            "check the slide, or lower --min-tissue."
        )
    return SlidePlan(plan, thumb, mask, ds, slide.best_level(geometry.mpp))
