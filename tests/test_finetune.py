"""End-to-end fine-tuning from the cache on a tiny generated cohort (CPU, tiny preset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrantool.config import ExtractConfig
from mrantool.encoders.rebuild import encoder_weights_from_run
from mrantool.encoders.registry import create_encoder, file_sha256
from mrantool.errors import ConfigError
from mrantool.extract.api import extract
from mrantool.store import FeatureStore
from mrantool.tiling.presets import get_preset
from mrantool.training.pixels.finetune import choose_bags, finetune, trainable_blocks

TINY = {"preset": "tiny", "workers": 0, "batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """Four 2048 px generated slides (two per class) extracted with the tiny preset: store, labels, slides."""
    from mrantool.cohorts.synthetic import make_cohort

    folder = tmp_path_factory.mktemp("ft")
    labels = make_cohort(folder / "slides", n_slides=4, seed=0, size=(2048, 2048), workers=1, n_foci=2)
    slides = sorted(str(p) for p in (folder / "slides").glob("*.tiff"))
    extract(ExtractConfig(slides=slides, store=str(folder / "frozen.zarr"), **TINY))
    return folder / "frozen.zarr", labels, slides


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    store, labels, _ = cohort
    out = tmp_path_factory.mktemp("ftrun") / "run"
    return finetune(store, labels, out, layers=1, bags_per_slide=2, epochs=6, lr=3e-3, encoder_lr=1e-3,
                    folds=2, val_fraction=0.0, device="cpu", seed=0, threads=1)


def test_training_loss_falls(run):
    losses = run.folds[0].step_losses
    assert len(losses) == 12  # 6 epochs x 2 training slides
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    fold = run.folds[0]
    assert fold.best_epoch == 6 and fold.seconds_per_step > 0
    assert set(fold.metrics) >= {"auc", "accuracy"}


def test_checkpoint_reloads_with_saved_outputs(run):
    weights = encoder_weights_from_run(run.out)
    reloaded = create_encoder(get_preset("tiny"), weights=weights)
    frozen = create_encoder(get_preset("tiny"))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = run.encoder(x)
        got = reloaded(x)
        before = frozen(x)
    for a, b, c in zip(want, got, before, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c, atol=1e-4)  # the last stage did change
    assert reloaded.identity()["weights"] == f"sha256:{file_sha256(weights)}"


def test_reextraction_uses_finetuned_encoder(run, cohort, tmp_path):
    store, _, slides = cohort
    weights = encoder_weights_from_run(run.out)
    new = tmp_path / "tuned.zarr"
    extract(ExtractConfig(slides=slides[:1], store=str(new), weights=str(weights), **TINY))
    tuned, frozen = FeatureStore.open(new), FeatureStore.open(store)
    assert tuned.identity["weights"] == f"sha256:{file_sha256(weights)}"
    sid = tuned.slide_ids()[0]
    a, b = tuned.slide(sid), frozen.slide(sid)
    np.testing.assert_array_equal(a.coords[:], b.coords[:])
    assert not np.allclose(a.patch_emb[:], b.patch_emb[:], atol=1e-2)
    assert a.cell_emb.shape == b.cell_emb.shape


def test_run_folder_and_errors(run, tmp_path):
    meta = (run.out / "encoder.json").read_text()
    assert '"layers": 1' in meta and "layer2" in meta and str(run.out.resolve()) in meta
    for name in ("config.json", "metrics.json", "fold_0/model.safetensors", "fold_0/head.json", "fold_1/encoder.json"):
        assert (run.out / name).is_file()
    (tmp_path / "encoder.safetensors").write_bytes(b"x")
    (tmp_path / "encoder.json").write_text('{"sha256": "0"}')
    with pytest.raises(ConfigError, match="does not match"):
        encoder_weights_from_run(tmp_path)
    with pytest.raises(ConfigError, match="holds no fine-tuned encoder"):
        encoder_weights_from_run(tmp_path / "nothing")


def test_trainable_blocks_and_bag_choice():
    encoder = create_encoder(get_preset("tiny"))
    names, units = trainable_blocks(encoder, 2)
    assert names == ["layer1", "layer2"] and len(units) == 4
    assert not any(p.requires_grad for p in encoder.model.conv1.parameters())
    with pytest.raises(ConfigError, match=r"finetune-layers 1\.\.2"):
        trainable_blocks(encoder, 3)
    rng = np.random.default_rng(0)
    attention = np.array([0.1, 0.5, 0.05, 0.35])
    assert choose_bags(attention, 2, 0.0, rng).tolist() == [1, 3]
    picks = [choose_bags(attention, 2, 0.5, rng) for _ in range(20)]
    assert all(1 in p and len(p) == 2 for p in picks) and any(3 not in p for p in picks)


def test_encoder_from_refuses_the_slides_that_trained_it(run, cohort, tmp_path):
    """fold_0's encoder (the run's) saw the labels of fold_0's training slides: re-extracting those is refused,
    its test slides are fine, and --allow-label-overlap extracts anyway and records it in the provenance."""
    import json

    _, _, slides = cohort
    split = json.loads((run.out / "splits.json").read_text())[0] if (run.out / "splits.json").is_file() else None
    seen = {e["slide_id"] for e in json.loads((run.out / "encoder.json").read_text())["label_slides"]}
    assert split is None or seen == set(split["train"]) | set(split["val"])
    by_id = {Path(s).stem: s for s in slides}
    trained, held_out = sorted(seen)[0], sorted(set(by_id) - seen)[0]
    cfg = {**TINY, "encoder_from": str(run.out)}
    with pytest.raises(ConfigError, match=f"1 of the slides to extract \\({trained}\\) trained or validated"):
        extract(ExtractConfig(slides=[by_id[trained]], store=str(tmp_path / "a.zarr"), **cfg))
    assert not (tmp_path / "a.zarr").exists()
    report = extract(ExtractConfig(slides=[by_id[held_out]], store=str(tmp_path / "b.zarr"), **cfg))
    assert [r.status for r in report.results] == ["done"]
    copy = tmp_path / "renamed.tiff"  # the same file under another name is still recognised
    copy.write_bytes(Path(by_id[trained]).read_bytes())
    extract(ExtractConfig(slides=[str(copy)], store=str(tmp_path / "c.zarr"), allow_label_overlap=True, **cfg))
    prov = FeatureStore.open(tmp_path / "c.zarr").provenance("renamed")
    assert prov["labels_seen_by_encoder"] == str(run.out.resolve())


def test_fit_finetune_applies_model_and_options_or_refuses(cohort, tmp_path):
    """`fit --finetune` used to train MRAN with defaults whatever --model/-O said, and dropped config keys."""
    import json

    from typer.testing import CliRunner

    from mrantool.cli import app

    store, labels, _ = cohort
    out = tmp_path / "ft"
    base = ["fit", "--finetune", "--store", str(store), "--labels", str(labels), "--folds", "2", "--epochs", "1",
            "--device", "cpu", "--threads", "1", "--quiet"]
    done = CliRunner().invoke(app, [*base, "--out", str(out), "--model", "abmil", "-O", "hidden=16"])
    assert done.exit_code == 0, done.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "abmil" and config["head_options"]["hidden"] == 16
    assert "fold_0: best epoch" in done.output  # progress lines (quiet mode)
    toml = tmp_path / "fit.toml"
    toml.write_text("patience = 3\nweight_decay = 0.01\n")
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "no"), "--config", str(toml)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "cannot apply weight_decay, patience (fine-tuning" in refused.output
    again = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "no2"), "--init-run", str(out), "--model", "mran"])
    assert again.exit_code == 1 and "cannot apply model, folds (they come from --init-run" in again.output


def test_fit_finetune_applies_or_refuses_every_fit_setting(tmp_path):
    """`cell_min_tissue`, `ensemble` and five others used to be dropped silently: every FitConfig field must be
    applied or refused, and a refused one is named."""
    from mrantool.config import FitConfig
    from mrantool.training.pixels import finetune as ft

    applied = ("store", "labels", "out", "id_column", "label_column", "model", "options", "folds", "val_fraction",
               "seed", "epochs", "lr", "max_bags", "patch_min_tissue", "cache_gb", "device", "threads", "weights",
               "encoder_lr")  # what finetune_from_fit passes on
    decided = (*applied, *ft.UNUSED_FIT_SETTINGS, *ft.FROM_INIT_RUN, *ft.END_TO_END_ONLY)
    assert set(FitConfig.model_fields) <= set(decided)
    for key, value in (("tissue_weights", True), ("cell_min_tissue", 0.5), ("ensemble", 3)):
        cfg = FitConfig(store=str(tmp_path), labels="l.csv", out=str(tmp_path / "o"), **{key: value})
        with pytest.raises(ConfigError, match=f"cannot apply {key} "):
            ft.finetune_from_fit(cfg)


def test_an_init_run_fit_with_tissue_centring_is_refused(cohort, tmp_path):
    """Its heads centre cells at their tissue fraction, which fine-tuning's freshly encoded cells do not carry."""
    import json

    store, labels, _ = cohort
    init = tmp_path / "centred"
    init.mkdir()
    (init / "config.json").write_text(json.dumps({"config": {"tissue_weights": True, "tissue_centring": True}}))
    (init / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"was fit with tissue_centring.*tissue_centring = false"):
        finetune(store, labels, tmp_path / "out", init_run=init, device="cpu")
    assert not (tmp_path / "out").exists()  # refused before anything was written
