"""The generated cohort: pyramidal TIFFs that OpenSlide opens at 0.5 mpp, labels, determinism, and a class signal
that lives at the cell scale while patch-scale colour stays matched."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage as ndi

from mrantool.cohorts import synthetic
from mrantool.cohorts.synthetic import cohort_design, make_cohort, read_foci, render_slide
from mrantool.errors import ConfigError, SlideError
from mrantool.slides.writer import write_pyramid_tiff

PATCH = 256  # level-0 px: a 128 px patch at 1 mpp


def _level0(path: Path) -> np.ndarray:
    slide = openslide.OpenSlide(path)
    try:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    finally:
        slide.close()
    return rgba[..., :3]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out, n_slides=4, seed=0, size=(2048, 2048), workers=1)


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("jpeg", [True, False])
def test_write_pyramid_tiff_opens_with_levels_and_mpp(tmp_path: Path, jpeg: bool) -> None:
    rgb = _gradient(800, 1100)
    path = write_pyramid_tiff(tmp_path / "s.tiff", rgb, mpp=0.5, tile=256, jpeg=jpeg)
    assert [p.name for p in tmp_path.iterdir()] == ["s.tiff"]  # the temporary file is gone
    slide = openslide.OpenSlide(path)
    try:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert slide.level_dimensions == ((1100, 800), (550, 400), (275, 200))
        for level, (w, h) in enumerate(slide.level_dimensions):
            region = np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3].astype(int)
            expected = rgb[:: 2**level, :: 2**level][:h, :w].astype(int)
            assert np.abs(region - expected).mean() < (3 if jpeg else 1), level
        level0 = np.asarray(slide.read_region((0, 0), 0, (1100, 800)))[..., :3]
        assert jpeg or np.array_equal(level0, rgb)
    finally:
        slide.close()


def test_write_pyramid_tiff_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="uint8"):
        write_pyramid_tiff(tmp_path / "a.tiff", np.zeros((64, 64), np.uint8))
    with pytest.raises(SlideError, match="multiple of 16"):
        write_pyramid_tiff(tmp_path / "b.tiff", np.zeros((64, 64, 3), np.uint8), tile=100)
    assert list(tmp_path.iterdir()) == []


def test_cohort_files_and_labels(cohort: Path) -> None:
    out = cohort.parent
    rows = _rows(cohort)
    assert list(rows[0]) == ["slide_id", "label", "patient_id"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["labels.csv", "foci.csv"] + [f"{r['slide_id']}.tiff" for r in rows]
    )
    assert all(p.stat().st_mtime_ns <= cohort.stat().st_mtime_ns for p in out.iterdir())  # labels written last
    foci = _rows(out / "foci.csv")
    tumour = {r["slide_id"] for r in rows if r["label"] == "tumor"}
    assert {f["slide_id"] for f in foci} == tumour
    discs = read_foci(out)
    assert set(discs) == tumour and sum(len(d) for d in discs.values()) == len(foci)
    first = foci[0]
    assert discs[first["slide_id"]][0].tolist() == [int(first["x"]), int(first["y"]), int(first["radius"])]


def test_openslide_opens_every_slide_at_half_micron(cohort: Path) -> None:
    for row in _rows(cohort):
        slide = openslide.OpenSlide(cohort.parent / f"{row['slide_id']}.tiff")
        try:
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert slide.level_count >= 3
            assert slide.dimensions == (2048, 2048)
            for level in range(slide.level_count):
                w, h = slide.level_dimensions[level]
                region = np.asarray(slide.read_region((0, 0), level, (min(w, 512), min(h, 512))))
                assert region.shape[2] == 4 and (region[..., 3] == 255).all()
            thumb = np.asarray(slide.read_region((0, 0), slide.level_count - 1, slide.level_dimensions[-1]))
            assert (thumb[..., :3].min(axis=2) < 200).mean() > 0.2  # tissue is there
            assert (thumb[..., :3].min(axis=2) > 230).mean() > 0.1  # and so is glass
        finally:
            slide.close()


def test_cohort_design_is_balanced_with_two_slide_patients() -> None:
    design = cohort_design(12, seed=0)
    labels = [label for _, label, _ in design]
    assert labels.count("tumor") == labels.count("normal") == 6
    by_patient: dict[str, list[str]] = {}
    for _, label, patient in design:
        by_patient.setdefault(patient, []).append(label)
    sizes = sorted(len(v) for v in by_patient.values())
    assert sizes.count(2) >= 2 and set(sizes) <= {1, 2}
    assert all(len(set(v)) == 1 for v in by_patient.values())  # a patient's slides share the label
    assert len({sid for sid, _, _ in design}) == 12


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(_level0(p).tobytes()).hexdigest() for p in sorted(out.glob("*.tiff"))}


def test_same_seed_gives_identical_pixels(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", n_slides=2, seed=7, size=(1024, 768), workers=1).parent
    b = make_cohort(tmp_path / "b", n_slides=2, seed=7, size=(1024, 768), workers=2).parent
    c = make_cohort(tmp_path / "c", n_slides=2, seed=8, size=(1024, 768), workers=1).parent
    assert _digest(a) == _digest(b)
    for name in ["labels.csv", "foci.csv", "synth-000.tiff", "synth-001.tiff"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert set(_digest(a).values()).isdisjoint(_digest(c).values())


def _tissue_px(rgb: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) < 215


def _block_mean(plane: np.ndarray) -> np.ndarray:
    """Mean of a 2-D array over PATCH x PATCH blocks."""
    h, w = (s // PATCH for s in plane.shape)
    blocks = plane[: h * PATCH, : w * PATCH].reshape(h, PATCH, w, PATCH)
    return blocks.sum(axis=3, dtype=np.int64).sum(axis=1) / PATCH**2


def _patches(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch mean colour (n_rows, n_cols, 3) and tissue fraction on a PATCH grid."""
    return np.stack([_block_mean(rgb[..., c]) for c in range(3)], axis=2), _block_mean(_tissue_px(rgb))


def _big_dark_blobs_per_mpx(rgb: np.ndarray) -> float:
    """Hyperchromatic nuclei larger than ~7 um across, per million tissue pixels."""
    dark = rgb[..., 0].astype(np.int16) + rgb[..., 1] + rgb[..., 2] < 240
    labels, _ = ndi.label(dark)
    sizes = np.bincount(labels.ravel())[1:]
    return float((sizes >= 150).sum() / max(1, _tissue_px(rgb).sum()) * 1e6)


def test_class_signal_is_at_cell_scale_not_patch_colour(cohort: Path) -> None:
    means: dict[str, list[np.ndarray]] = {"tumor": [], "normal": []}
    blobs: dict[str, list[float]] = {"tumor": [], "normal": []}
    for row in _rows(cohort):
        rgb = _level0(cohort.parent / f"{row['slide_id']}.tiff")
        mean, tissue = _patches(rgb)
        means[row["label"]].append(mean[tissue > 0.95])
        blobs[row["label"]].append(_big_dark_blobs_per_mpx(rgb))
    diff = np.abs(np.concatenate(means["tumor"]).mean(0) - np.concatenate(means["normal"]).mean(0))
    assert diff.max() < 3.0, diff
    assert min(blobs["tumor"]) > 5.0, blobs
    assert max(blobs["normal"]) < 0.5, blobs


def test_tumour_focus_patches_match_normal_patches_in_colour_and_stained_area(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the left half of the tissue made tumour focus (enough patches to average), focus patches have the
    mean colour and nuclear (stained) area of normal patches, while big hyperchromatic nuclei appear only there."""
    layout = synthetic._layout

    def half_focus(rng: np.random.Generator, width: int, height: int, mpp: float, tumour: bool,
                   n_foci: int | None = None, focus_um: tuple[float, float] = (0, 0)) -> synthetic._Layout:
        lay = layout(rng, width, height, mpp, tumour=False)
        lay.focus[:, : lay.focus.shape[1] // 2] = True
        lay.focus &= lay.tissue
        return lay

    monkeypatch.setattr(synthetic, "_layout", half_focus)
    stats: dict[bool, list[np.ndarray]] = {True: [], False: []}
    blobs: dict[bool, list[float]] = {True: [], False: []}
    for seed in (0, 1):
        rgb, _ = render_slide(seed, (2048, 2048), tumour=True)
        mean, tissue = _patches(rgb)
        nuclear = _block_mean(rgb[..., 0] < 150)
        for left in (True, False):  # a patch column of margin: tumour nuclei near x = 1024 reach across
            cols = slice(0, 4) if left else slice(5, 8)
            sel = tissue[:, cols] > 0.95
            stats[left].append(np.column_stack([mean[:, cols][sel], nuclear[:, cols][sel]]))
            blobs[left].append(_big_dark_blobs_per_mpx(rgb[:, : 4 * PATCH] if left else rgb[:, 5 * PATCH :]))
    focus, normal = np.concatenate(stats[True]), np.concatenate(stats[False])
    assert len(focus) >= 10 and len(normal) >= 10
    colour_diff = np.abs(focus[:, :3].mean(0) - normal[:, :3].mean(0))
    assert colour_diff.max() < 4.0, colour_diff
    assert focus[:, 3].mean() == pytest.approx(normal[:, 3].mean(), rel=0.15)
    assert min(blobs[True]) > 50.0 and max(blobs[False]) < 1.0, blobs


def test_small_foci_are_a_few_tumour_nuclei_inside_tissue() -> None:
    """`focus_um` sets the focus radius: lobes of 0.5-0.8 x a radius drawn in it, holding big dark nuclei that
    the normal slide of the same seed lacks."""
    rgb, foci = render_slide(3, (2048, 2048), tumour=True, n_foci=3, focus_um=(25, 40))
    assert len(foci) == 9  # three lobes per focus
    discs = np.array(foci)
    assert discs[:, 2].min() * 0.5 >= 0.5 * 25 - 1 and discs[:, 2].max() * 0.5 <= 0.8 * 40 + 1, discs
    boxes = [rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in np.column_stack([discs[:, :2] - discs[:, 2:],
                                                                       discs[:, :2] + discs[:, 2:]])]
    normal, _ = render_slide(3, (2048, 2048), tumour=False)
    assert sum(_big_dark_blobs_per_mpx(box) > 0 for box in boxes) >= 5
    assert _big_dark_blobs_per_mpx(normal) < 1.0


def test_make_cohort_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        make_cohort(tmp_path, n_slides=1)
    with pytest.raises(ConfigError, match="256"):
        make_cohort(tmp_path, n_slides=2, size=(100, 100))
    with pytest.raises(ConfigError, match="focus radius"):
        make_cohort(tmp_path, n_slides=2, focus_um=(40, 20))
    assert list(tmp_path.iterdir()) == []


def test_read_foci_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"foci\.csv"):
        read_foci(tmp_path)
