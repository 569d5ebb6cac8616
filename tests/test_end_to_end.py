"""End-to-end training from pixels (small-cnn preset) on a tiny generated cohort whose signal is cell-scale.

Each slide is 256 x 256 px at 0.5 mpp: one bag of 4 x 4 patches of 64 px, pink tissue with small dark nuclei;
in a positive slide two of the 16 patches hold three large nuclei instead of twelve small ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import ExtractConfig, FitConfig
from mrantool.encoders.registry import create_encoder
from mrantool.errors import ConfigError
from mrantool.extract.api import extract
from mrantool.models.registry import create_head
from mrantool.slides.writer import write_pyramid_tiff
from mrantool.sweep.runner import run_sweep
from mrantool.sweep.spec import load_spec
from mrantool.sweep.worker import group_tasks
from mrantool.tiling.presets import get_preset
from mrantool.training.api import predict
from mrantool.training.labels import read_labels
from mrantool.training.pixels.e2e import fit_end_to_end, load_end_to_end_models, predict_end_to_end
from mrantool.training.pixels.model import PixelMIL, dihedral
from mrantool.training.runs import read_splits
from mrantool.viz.heatmap import draw_heatmap

N_SLIDES, SIZE, PATCH = 24, 256, 64
NUCLEUS = (90, 50, 140)


def _disc(img: np.ndarray, cx: int, cy: int, r: int) -> None:
    yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = NUCLEUS


def slide_image(rng: np.random.Generator, positive: bool) -> np.ndarray:
    img = np.clip(np.array([225, 150, 190]) + rng.integers(-12, 12, (SIZE, SIZE, 1)), 0, 255).astype(np.uint8)
    n = SIZE // PATCH
    foci = set(rng.choice(n * n, 2, replace=False).tolist()) if positive else set()
    for p in range(n * n):
        py, px = divmod(p, n)
        count, (lo, hi) = (3, (9, 12)) if p in foci else (12, (4, 6))
        for _ in range(count):
            r = int(rng.integers(lo, hi + 1))
            _disc(img, px * PATCH + int(rng.integers(r, PATCH - r)), py * PATCH + int(rng.integers(r, PATCH - r)), r)
    return img


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SLIDES):
        write_pyramid_tiff(root / f"s{i:02d}.tif", slide_image(rng, i % 2 == 1), mpp=0.5)
        rows.append(f"s{i:02d},{i % 2}\n")
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(rows))
    store = root / "small.zarr"
    report = extract(ExtractConfig(slides=[str(p) for p in sorted(root.glob("*.tif"))], store=str(store),
                                   preset="small-cnn", bag_px=SIZE, grid=SIZE // PATCH, workers=0, device="cpu"))
    assert report.count("done") == N_SLIDES
    return {"root": root, "store": store, "labels": root / "labels.csv"}


def config(cohort: dict, out: str, **extra) -> FitConfig:
    settings = {"model": "abmil", "folds": 2, "epochs": 8, "lr": 1e-3, "threads": 1, "device": "cpu",
                "end_to_end": True, **extra}
    return FitConfig(store=str(cohort["store"]), labels=str(cohort["labels"]), out=str(cohort["root"] / out),
                     **settings)


@pytest.fixture(scope="module")
def run(cohort):
    events: list[tuple[str, dict]] = []
    report = fit_end_to_end(config(cohort, "run", val_fraction=0.0), keep_attention=True,
                            progress=lambda e, i: events.append((e, i)))
    return report, events


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_small_cnn_is_a_timm_model_pooled_to_cells():
    assert timm.is_model("mrantool_small_cnn")
    model = timm.create_model("mrantool_small_cnn", num_classes=0)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    with FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, 3, 64, 64))
    assert flops.get_total_flops() < 20e6  # per 64 px patch (ResNet-18 at 128 px: 1,184 M)
    encoder = create_encoder(get_preset("small-cnn"))
    patch, cells = encoder(torch.randn(2, 3, 64, 64))
    assert patch.shape == (2, 128) and cells.shape == (2, 16, 128)
    torch.testing.assert_close(cells.mean(1), patch)  # the 4x4 map pooled to cells, averaged back to the patch


def test_learns_the_cell_signal_on_held_out_slides(run):
    report, events = run
    assert report.mean["auc"] >= 0.9  # per test fold (pooling also mixes the folds' calibrations)
    tested = [row["slide_id"] for row in read_csv(report.out / "predictions.csv")]
    assert sorted(tested) == [f"s{i:02d}" for i in range(N_SLIDES)]  # every slide scored once, out of fold
    for fold in json.loads((report.out / "splits.json").read_text()):
        assert not set(fold["test"]) & set(fold["train"] + fold["val"])
    assert any(e == "pixels" for e, _ in events) and [e for e, _ in events].count("fold_end") == 2


def test_run_folder_matches_the_cached_layout_plus_encoders(run):
    report, _ = run
    out = report.out
    for name in ("config.json", "splits.json", "metrics.json", "predictions.csv", "curves.png", "roc.png",
                 "encoder.safetensors", "encoder.json", *[f"fold_{k}/{f}" for k in range(2) for f in (
                     "model.safetensors", "head.json", "encoder.safetensors", "encoder.json", "result.json")]):
        assert (out / name).is_file(), name
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".json", ".csv", ".png", ".npz", ".safetensors"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["end_to_end"]["encoder"] == "mrantool_small_cnn" and cfg["end_to_end"]["start"] == "random-init"
    head = json.loads((out / "fold_1/head.json").read_text())
    assert head["end_to_end"] and not head["standardize"]
    encoder = json.loads((out / "fold_1/encoder.json").read_text())
    assert encoder["fold"] == "fold_1" and encoder["extract"]["grid"] == 4
    split = json.loads((out / "splits.json").read_text())[0]
    for slide_id in split["test"]:
        with np.load(out / "attention" / f"{slide_id}.npz") as npz:
            np.testing.assert_allclose(npz["patch"], report.attention["fold_0"][slide_id]["patch"])
            assert npz["patch"].shape == (1, 16) and abs(npz["patch"].sum() - 1) < 1e-5
    # each fold's encoder is its own: trained from the same start, they differ
    a, b = (dict(m.encoder.named_parameters()) for _, m in load_end_to_end_models(out, ["fold_0", "fold_1"]))
    assert not torch.allclose(a["model.stem.0.weight"], b["model.stem.0.weight"])


def test_predict_re_encodes_with_each_fold_encoder(run, cohort, tmp_path):
    report, _ = run
    out = report.out
    fold_0 = json.loads((out / "splits.json").read_text())[0]["test"]
    rows = predict_end_to_end(out, cohort["store"], tmp_path / "p0.csv", slides=fold_0, folds=["fold_0"])
    saved = {r["slide_id"]: float(r["prob_1"]) for r in read_csv(out / "predictions.csv")}
    for row in rows:  # the fold's model in eval mode gives the run's own out-of-fold probabilities
        assert row["prob_1"] == pytest.approx(saved[row["slide_id"]], abs=1e-5)
    result = CliRunner().invoke(app, ["predict", "--run", str(out), "--store", str(cohort["store"]),
                                      "--out", str(tmp_path / "all.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(read_csv(tmp_path / "all.csv")) == N_SLIDES
    with pytest.raises(ConfigError, match="trained end to end"):
        predict(out, cohort["store"], tmp_path / "cached.csv")
    heat = draw_heatmap(out, cohort["store"], fold_0[0], tmp_path / "map.png", level="patch")
    assert heat.out.is_file() and heat.level == "patch"


def test_extract_with_the_runs_encoder_refuses_its_training_slides(run, cohort, tmp_path):
    report, _ = run
    fold_0 = json.loads((report.out / "splits.json").read_text())[0]
    geometry = {"preset": "small-cnn", "bag_px": SIZE, "grid": SIZE // PATCH, "workers": 0, "device": "cpu"}
    trained = [str(cohort["root"] / f"{fold_0['train'][0]}.tif")]
    with pytest.raises(ConfigError, match="trained or validated the encoder"):
        extract(ExtractConfig(slides=trained, store=str(tmp_path / "leak.zarr"), encoder_from=str(report.out),
                              **geometry))
    unseen = str(cohort["root"] / f"{fold_0['test'][0]}.tif")
    done = extract(ExtractConfig(slides=[unseen], store=str(tmp_path / "ok.zarr"), encoder_from=str(report.out),
                                 **geometry))
    assert done.count("done") == 1


def test_same_seed_same_run_and_resume_after_an_interruption(cohort):
    settings = {"model": "mran", "epochs": 1, "min_epochs": 1}
    first = fit_end_to_end(config(cohort, "det_a", **settings), keep_attention=True)
    assert first.attention["fold_0"][next(iter(first.attention["fold_0"]))]["cell"].shape == (1, 16, 16)
    second_cfg = config(cohort, "det_b", **settings)
    fit_end_to_end(second_cfg)
    a, b = cohort["root"] / "det_a", cohort["root"] / "det_b"
    for name in ("metrics.json", "predictions.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    (b / "metrics.json").unlink()  # as if the run had stopped during fold 1
    (b / "fold_1" / "result.json").unlink()
    notes: list[str] = []
    fit_end_to_end(second_cfg, progress=lambda e, i: notes.append(i["message"]) if e == "note" else None)
    assert any("1 of 2 folds were finished" in n for n in notes)
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()
    (b / "metrics.json").unlink()
    with pytest.raises(ConfigError, match=r"cannot be resumed \(settings epochs differ\)"):
        fit_end_to_end(config(cohort, "det_b", **{**settings, "epochs": 3}))


def test_cli_fit_end_to_end_and_its_errors(cohort, tmp_path):
    runner = CliRunner()
    base = ["fit", "--store", str(cohort["store"]), "--labels", str(cohort["labels"]), "--model", "abmil",
            "--folds", "2", "--epochs", "1", "--threads", "1", "--device", "cpu", "--quiet"]
    result = runner.invoke(app, [*base, "--end-to-end", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "fold_0: best epoch 1/1" in result.output and "wrote" in result.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["end_to_end"]["augment"] is True
    result = runner.invoke(app, [*base, "--weights", "w.safetensors", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "apply only with end_to_end = true" in result.output
    (tmp_path / "small.toml").write_text("[fit]\npixel_cache_gb = 0.0001\n")
    result = runner.invoke(app, [*base, "--end-to-end", "--config", str(tmp_path / "small.toml"),
                                 "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "raise pixel_cache_gb" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "y").exists()  # nothing written, so the same command with a larger budget starts afresh


def test_sweep_compares_frozen_cache_and_end_to_end_on_the_same_folds(cohort, tmp_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text(f"""baseline = "cache"
[base]
store = "{cohort['store']}"
labels = "{cohort['labels']}"
model = "abmil"
folds = 2
epochs = 1
threads = 1
device = "cpu"
[[variant]]
name = "cache"
[[variant]]
name = "e2e"
end_to_end = true
""")
    tasks = [(run, "") for run in load_spec(spec).runs() * 2]  # two end-to-end runs never share a group
    assert sorted(len(g) for g in group_tasks(tasks, workers=1)) == [1, 1, 2]
    result = run_sweep(spec, tmp_path / "out")
    assert result.count("ran") == 2 and not result.count("error")
    runs = {r.name: tmp_path / "out" / "runs" / r.hash for r in result.runs}
    assert (runs["e2e"] / "fold_0" / "encoder.safetensors").is_file()
    assert not (runs["cache"] / "fold_0" / "encoder.safetensors").exists()
    assert (runs["e2e"] / "splits.json").read_text() == (runs["cache"] / "splits.json").read_text()
    again = run_sweep(spec, tmp_path / "out")  # both finished with the current inputs: nothing is redone
    assert again.count("skipped") == 2, [(r.name, r.status) for r in again.runs]


def test_start_from_a_runs_encoders_only_on_the_same_folds(run, cohort):
    report, _ = run
    with pytest.raises(ConfigError, match="test slides of fold_0 here"):
        fit_end_to_end(config(cohort, "from_other_folds", val_fraction=0.0, seed=1, epochs=1,
                              encoder_from=str(report.out)))
    folds = read_splits(report.out, read_labels(cohort["labels"]))  # explicit folds: seed 7 would give others
    tuned = fit_end_to_end(config(cohort, "from_run", val_fraction=0.0, seed=7, epochs=1, encoder_lr=0.0,
                                  encoder_from=str(report.out)), splits=folds)
    assert (tuned.out / "splits.json").read_text() == (report.out / "splits.json").read_text()
    start = json.loads((tuned.out / "fold_1" / "encoder.json").read_text())["start"]
    assert start == f"run:{(report.out / 'fold_1').resolve()}"
    for fold in ("fold_0", "fold_1"):  # encoder_lr = 0: each fold keeps exactly the weights it started from
        (_, start_model), = load_end_to_end_models(report.out, [fold])
        (_, kept), = load_end_to_end_models(tuned.out, [fold])
        for name, weight in start_model.encoder.named_parameters():
            torch.testing.assert_close(dict(kept.encoder.named_parameters())[name], weight, rtol=0, atol=0)


def test_pixel_model_takes_a_padded_batch_of_slides_like_its_head():
    """MRAN (and every built-in head) takes padded slide batches, so the trainer hands PixelMIL a batch too."""
    torch.manual_seed(0)
    preset = get_preset("small-cnn")
    model = PixelMIL(create_encoder(preset), create_head("mran", 128, 2), preset).eval()
    pixels = torch.randint(0, 255, (2, 3, 4, 64, 64, 3), dtype=torch.uint8)  # 2 slides of 3 bags of 4 patches
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2] = False  # the second slide has two bags: its third is padding
    mask[0, 0, 1:] = False
    with torch.no_grad():
        batch = model(pixels, None, mask)
        for i, n in enumerate((3, 2)):
            alone = model(pixels[i, :n], None, mask[i, :n])
            torch.testing.assert_close(batch.logits[i], alone.logits)
            torch.testing.assert_close(batch.attention["cell"][i, :n], alone.attention["cell"])


def test_pixel_model_batchnorm_and_augmentation():
    torch.manual_seed(0)
    preset = get_preset("small-cnn")
    model = PixelMIL(create_encoder(preset), create_head("abmil", 128, 2), preset)
    pixels = torch.randint(0, 255, (2, 4, 64, 64, 3), dtype=torch.uint8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    model.eval()
    with torch.no_grad():  # running statistics: a patch's embedding does not depend on the other patches
        full, _ = model.embed(pixels, mask)
        alone, _ = model.embed(pixels[:1, :1], mask[:1, :1])
        torch.testing.assert_close(full[0, 0], alone[0, 0])
        torch.testing.assert_close(model(pixels, None, mask).logits, model(pixels, None, mask).logits)
    model.train()
    model.augment = False
    with torch.no_grad():  # batch statistics: the same patch embeds differently in another batch
        full, _ = model.embed(pixels, mask)
        alone, _ = model.embed(pixels[:1, :2], mask[:1, :2])
        assert not torch.allclose(full[0, 0], alone[0, 0], atol=1e-4)
    frozen = PixelMIL(model.encoder, model.head, preset, augment=False, batchnorm="frozen").train()
    with torch.no_grad():  # frozen BatchNorm: running statistics in training too
        full, _ = frozen.embed(pixels, mask)
        alone, _ = frozen.embed(pixels[:1, :1], mask[:1, :1])
        torch.testing.assert_close(full[0, 0], alone[0, 0])
    assert frozen.head.training and not frozen.encoder.model.stem[1].training
    masked = mask.clone()
    masked[1, 2:] = False
    features, _ = model.embed(pixels, masked)
    assert torch.count_nonzero(features[1, 2:]) == 0  # non-tissue patches are not encoded
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    turned = dihedral(x, torch.tensor([1, 6]))
    torch.testing.assert_close(turned[0], torch.rot90(x[0], 1, dims=(1, 2)))
    torch.testing.assert_close(turned[1], torch.rot90(x[1], 2, dims=(1, 2)).flip(2))
