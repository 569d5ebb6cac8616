"""Draw the tissue mask and the bag/patch grid on a slide's thumbnail, before spending GPU hours on extraction."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mrantool.errors import ConfigError
from mrantool.files import output_file
from mrantool.slides.mpp_table import MppTable
from mrantool.slides.reader import open_slide, slide_id_from_path
from mrantool.tiling.presets import Preset
from mrantool.tiling.slide_plan import plan_slide


@dataclass(frozen=True)
class PreviewSummary:
    """What the preview shows, in numbers."""

    slide: str
    slide_mpp: float
    target_mpp: float
    read_level: int
    read_downsample: float
    n_bags: int
    n_candidates: int
    n_patches_tissue: int
    n_patches: int
    tissue_fraction: float
    out: Path

    def line(self) -> str:
        return (
            f"{self.slide}: {self.target_mpp:g} mpp from level {self.read_level} "
            f"(downsample {self.read_downsample:g}, slide {self.slide_mpp:.4g} mpp); "
            f"{self.n_bags} of {self.n_candidates} bags kept, {self.n_patches_tissue} of {self.n_patches} patches "
            f"with tissue; {self.tissue_fraction:.1%} of the slide is tissue"
        )


def draw_preview(
    slide_path: str | Path,
    preset: Preset,
    out: str | Path,
    *,
    mpp: float | None = None,
    mpp_table: MppTable | None = None,
    min_tissue: float = 0.1,
    patch_min_tissue: float = 0.25,
) -> PreviewSummary:
    """Write a PNG of the thumbnail with the tissue outline (green), kept bags (blue) and patches with tissue.

    The slide's row in `mpp_table` wins over `mpp`, which wins over the slide's metadata.
    """
    geometry = preset.geometry
    if not 0 <= min_tissue <= 1:
        raise ConfigError(f"--min-tissue {min_tissue} is not a tissue fraction; use a value from 0 to 1.")
    out = output_file(out, "--out")
    slide_id = slide_id_from_path(slide_path)
    if mpp_table is not None:
        mpp = mpp_table.lookup(slide_id, slide_path) or mpp
    explain = mpp_table.explain_missing(slide_id, slide_path) if mpp_table else nullcontext()
    with explain, open_slide(slide_path, mpp=mpp) as slide:
        sp = plan_slide(slide, geometry, min_tissue, require_tissue=False)
        summary = PreviewSummary(
            slide=slide.slide_id,
            slide_mpp=slide.mpp,
            target_mpp=geometry.mpp,
            read_level=sp.read_level,
            read_downsample=slide.level_downsamples[sp.read_level],
            n_bags=sp.plan.n_bags,
            n_candidates=sp.plan.n_candidates,
            n_patches_tissue=int((sp.plan.patch_tissue >= patch_min_tissue).sum()),
            n_patches=int(sp.plan.patch_tissue.size),
            tissue_fraction=float(sp.mask.mean()),
            out=Path(out),
        )
    image = Image.fromarray(sp.thumbnail).convert("RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    scale = 1.0 / sp.downsample
    bag = sp.plan.bag_size_l0 * scale
    step = bag / geometry.grid
    for (x, y), tissue in zip(sp.plan.coords * scale, sp.plan.patch_tissue, strict=True):
        for p, frac in enumerate(tissue):
            r, c = divmod(p, geometry.grid)
            box = (x + c * step, y + r * step, x + (c + 1) * step, y + (r + 1) * step)
            if frac >= patch_min_tissue:
                draw.rectangle(box, fill=(255, 200, 0, 40), outline=(90, 90, 90, 110))
        draw.rectangle((x, y, x + bag, y + bag), outline=(0, 70, 255, 255), width=max(2, round(bag / 150)))
    outline = sp.mask ^ ndimage.binary_erosion(sp.mask, iterations=2)
    pixels = np.array(image)
    pixels[outline] = (0, 170, 0)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out)
    return summary
