"""Extraction into the store: shapes, provenance, resume after kill -9, concurrent extractors, bad files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import ExtractConfig
from mrantool.extract.api import extract
from mrantool.store import FeatureStore, check_store
from tests.conftest import shared_file, tissue_image

TINY = {"preset": "tiny", "workers": 0, "batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Three small generated slides (tissue discs) at 0.5 mpp."""
    from mrantool.slides.writer import write_pyramid_tiff

    folder = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        write_pyramid_tiff(folder / f"slide-{i}.tif", tissue_image(2048, seed=i), mpp=0.5)
    return folder


def run(slide_paths, store: Path, **kw):
    return extract(ExtractConfig(slides=[str(p) for p in slide_paths], store=str(store), **{**TINY, **kw}))


def arrays(store: Path, slide_id: str) -> dict[str, np.ndarray]:
    s = FeatureStore.open(store).slide(slide_id)
    return {"coords": s.coords[:], "patch": s.patch_emb[:], "cells": s.cell_emb[:], "tissue": s.patch_tissue[:]}


def test_generated_slides_shapes_coords_provenance(slides, tmp_path):
    report = run([slides], tmp_path / "s.zarr")
    assert [r.status for r in report.results] == ["done"] * 3
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.slide_ids() == ["slide-0", "slide-1", "slide-2"]
    s = store.slide("slide-0")
    # tiny preset: 256 px bags at 2 mpp = 1024 level-0 px; 4x4 patches of 2x2 cells, 128-d.
    assert s.patch_emb.shape == (s.n_bags, 16, 128) and s.cell_emb.shape == (s.n_bags, 16, 4, 128)
    assert s.patch_emb.dtype == np.float16
    assert 1 <= s.n_bags <= 4
    assert set(map(tuple, s.coords[:].tolist())) <= {(0, 0), (1024, 0), (0, 1024), (1024, 1024)}
    p = s.provenance
    assert p["mpp"] == 2.0 and p["slide_mpp"] == pytest.approx(0.5) and p["level0_size"] == [2048, 2048]
    assert p["bag_size_l0"] == pytest.approx(1024) and p["fingerprint"]["size"] > 0
    assert p["identity"]["encoder"] == "resnet18" and p["identity"]["weights"] == "random-init"
    assert check_store(tmp_path / "s.zarr") == []
    # Cells were pooled from the same map as the patch embedding: their mean is the patch embedding.
    np.testing.assert_allclose(s.cell_emb[:].astype(np.float32).mean(2), s.patch_emb[:].astype(np.float32), atol=2e-2)
    # Each cell's tissue fraction: a disc's edge runs through some patches, so their cells differ; a patch's
    # fraction is the mean of its cells'.
    cell_tissue = s.cell_tissue[:].astype(np.float32)
    assert cell_tissue.shape == (s.n_bags, 16, 4) and cell_tissue.min() >= 0 and cell_tissue.max() <= 1
    np.testing.assert_allclose(cell_tissue.mean(2), s.patch_tissue[:].astype(np.float32), atol=0.05)
    assert (np.ptp(cell_tissue, axis=2) > 0.5).any()


def test_a_glass_hole_inside_tissue_is_no_tissue_for_its_cell(tmp_path):
    """The thumbnail mask fills holes in tissue (a lumen, a tear), so it calls a cell of glass inside tissue
    tissue; the store's cell fraction is refined on the cell's own pixels. Tiny preset: 1024 level-0 px bags of
    4 x 4 patches of 2 x 2 cells, so level-0 x, y 896..1024 is bag (0, 0), patch 15, cell 3."""
    from mrantool.slides.reader import open_slide
    from mrantool.slides.writer import write_pyramid_tiff
    from mrantool.tiling.presets import get_preset
    from mrantool.tiling.slide_plan import plan_slide

    image = tissue_image(2048, seed=3)
    image[896:1024, 896:1024] = 245  # glass, surrounded by the tissue disc
    write_pyramid_tiff(tmp_path / "holed.tif", image, mpp=0.5)
    run([tmp_path / "holed.tif"], tmp_path / "s.zarr")
    s = FeatureStore.open(tmp_path / "s.zarr").slide("holed")
    bag = s.coords[:].tolist().index([0, 0])
    with open_slide(tmp_path / "holed.tif") as slide:
        thumbnail = plan_slide(slide, get_preset("tiny").geometry).plan
    stored = s.cell_tissue[:].astype(np.float32)
    assert thumbnail.cell_tissue[bag, 15, 3] > 0.9  # the hole was filled in the thumbnail mask
    assert stored[bag, 15, 3] < 0.05
    assert stored[bag, 15, :3].min() > 0.9  # its neighbours are tissue
    assert np.all(stored <= thumbnail.cell_tissue + 1e-3)  # pixels only ever lower a fraction


def test_features_match_the_plain_encoder(slides, tmp_path):
    """The pipeline (channels_last, batched, fp16 storage) agrees with the fp32 model on the same pixels."""
    import torch

    from mrantool.encoders.registry import create_encoder
    from mrantool.encoders.transforms import to_tensor_batch
    from mrantool.extract.dataset import cut_patches
    from mrantool.slides.reader import open_slide
    from mrantool.tiling.presets import get_preset

    run([slides / "slide-0.tif"], tmp_path / "s.zarr")
    s = FeatureStore.open(tmp_path / "s.zarr").slide("slide-0")
    preset = get_preset("tiny")
    enc = create_encoder(preset).eval()
    x0, y0 = s.coords[0].tolist()
    with open_slide(slides / "slide-0.tif") as slide:
        region = slide.read_region_mpp(x0, y0, preset.geometry.bag_px, preset.geometry.mpp)
    with torch.no_grad():
        patch, cells = enc(to_tensor_batch(cut_patches(region, preset.geometry.grid), preset))
    np.testing.assert_allclose(s.patch_emb[0].astype(np.float32), patch.numpy(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(s.cell_emb[0].astype(np.float32), cells.numpy(), rtol=1e-2, atol=1e-2)


def test_resume_skips_complete_and_redoes_changed(slides, tmp_path):
    from mrantool.slides.writer import write_pyramid_tiff

    folder = tmp_path / "in"
    shutil.copytree(slides, folder)
    store = tmp_path / "s.zarr"
    run([folder], store)
    again = run([folder], store)
    assert [r.status for r in again.results] == ["skipped"] * 3
    before = arrays(store, "slide-1")
    write_pyramid_tiff(folder / "slide-1.tif", tissue_image(2048, seed=99), mpp=0.5)  # the file changed
    third = run([folder], store)
    assert sorted(r.status for r in third.results) == ["done", "skipped", "skipped"]
    after = arrays(store, "slide-1")
    assert not np.array_equal(before["patch"], after["patch"])
    assert check_store(store) == []


def test_bad_files_are_recorded_and_the_others_finish(slides, tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    white = tmp_path / "white.tif"
    from mrantool.slides.writer import write_pyramid_tiff

    write_pyramid_tiff(white, np.full((1024, 1024, 3), 250, np.uint8), mpp=0.5)
    store = tmp_path / "s.zarr"
    report = run([slides / "slide-0.tif", bad, white], store)
    status = {r.slide_id: r.status for r in report.results}
    assert status == {"slide-0": "done", "broken": "failed", "white": "failed"}
    failures = FeatureStore.open(store).failures()
    assert "broken.svs" in failures["broken"]["message"] and "tissue" in failures["white"]["message"]
    assert FeatureStore.open(store).slide_ids() == ["slide-0"]


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mrantool.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _bags_in_staging(staging: Path) -> bool:
    """Whether a slide in `staging` has some bags written (chunk files) but is not yet moved into the store.
    A running extractor may move a folder away while it is being listed: that reads as "not yet"."""
    try:
        return staging.is_dir() and any(staging.glob("*/patch_emb/c/*/*/*"))
    except FileNotFoundError:
        return False


def test_kill_9_mid_slide_then_resume_equals_uninterrupted(tmp_path):
    from mrantool.slides.writer import write_pyramid_tiff

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        write_pyramid_tiff(folder / f"big-{i}.tif", tissue_image(4096, seed=i), mpp=0.5)
    store = tmp_path / "killed.zarr"
    proc = _cli("extract", str(folder), "--store", str(store), "--preset", "tiny", "--workers", "0",
                "--batch-size", "16", "--device", "cpu", "--quiet", cwd=tmp_path)
    staging = store / "staging"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if _bags_in_staging(staging):
            proc.send_signal(signal.SIGSTOP)  # freeze it, then make sure the slide is still half written
            if _bags_in_staging(staging):
                break
            proc.send_signal(signal.SIGCONT)  # it finished that slide in between; catch the next one
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _bags_in_staging(staging), "the extractor finished before it could be killed mid-slide"
    assert check_store(store) == []  # no half slide is visible
    assert len(FeatureStore.open(store).slide_ids()) < 2
    run([folder], store)  # resume: clears the dead writer's staging and stale lock
    run([folder], tmp_path / "clean.zarr")
    for slide_id in ["big-0", "big-1"]:
        a, b = arrays(store, slide_id), arrays(tmp_path / "clean.zarr", slide_id)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert check_store(store) == []


def test_two_concurrent_extractors_share_a_store(slides, tmp_path):
    store = tmp_path / "shared.zarr"
    args = ("extract", str(slides), "--store", str(store), "--preset", "tiny", "--workers", "0", "--device", "cpu",
            "--quiet", "--wait")  # without --wait, the one that finds a slide busy exits 3
    procs = [_cli(*args, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done = sum(line.split(":", 1)[1].split()[0] == "done" for out in outs for line in out.splitlines()
               if line.startswith("slide-"))
    assert done == 3  # every slide extracted exactly once across the two processes
    assert FeatureStore.open(store).slide_ids() == ["slide-0", "slide-1", "slide-2"]
    assert check_store(store) == []


def test_cli_real_slides_and_refused_files(tmp_path):
    """The issue's acceptance run: real slides done, a plain TIFF without --mpp and a lone DICOM instance recorded
    as failed, exit 1, no traceback."""
    cmu = shared_file("slides/CMU-1-Small-Region.svs")
    bad = [shared_file("not-slides/histolab_kidney-48-5_IHC.tif"),
           shared_file("not-slides/DICOM-WSI_TCGA-XK-AAJU_single-instance.dcm")]
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(cmu), *map(str, bad), "--store", str(store),
                                      "--preset", "tiny", "--workers", "0", "--quiet"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "1 done" in result.output and "2 failed" in result.output
    assert FeatureStore.open(store).slide_ids() == ["CMU-1-Small-Region"]
    failures = FeatureStore.open(store).failures()
    assert set(failures) == {"histolab_kidney-48-5_IHC", "DICOM-WSI_TCGA-XK-AAJU_single-instance"}
    assert "pass --mpp" in failures["histolab_kidney-48-5_IHC"]["message"]
    check = CliRunner().invoke(app, ["check", str(store)])
    assert check.exit_code == 0, check.output


def test_shards_partition_the_slides(slides):
    from mrantool.extract.inputs import collect_slides, shard

    items = collect_slides([slides])
    parts = [shard(items, i, 2) for i in range(2)]
    assert sorted(s.slide_id for p in parts for s in p) == ["slide-0", "slide-1", "slide-2"]
    assert [s.slide_id for s in parts[0]] == ["slide-0", "slide-2"]
