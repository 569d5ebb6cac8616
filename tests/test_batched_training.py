"""Batched training as users meet it: folds trained together give the fold metrics of training them one by
one, several slides per step train through `mrantool fit`, and the data path's reads and warnings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import FitConfig
from mrantool.errors import ConfigError
from mrantool.models.abmil import ABMIL
from mrantool.models.attention import masked_softmax, pool
from mrantool.models.base import InstanceHead, MILOutput, weighted_ce
from mrantool.store import FeatureStore
from mrantool.sweep.runner import run_sweep
from mrantool.sweep.spec import load_spec
from mrantool.sweep.worker import group_tasks
from mrantool.training.api import fit
from mrantool.training.data import ArrayData, StoreData
from mrantool.training.loop import Member, torch_settings, train_members, uses_bag_weights
from tests.test_training import FAST, label_rows, write_labels, write_store


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("batched")
    write_store(root / "s.zarr")
    labels = write_labels(root / "labels.csv", label_rows(), ["slide_id", "label", "patient_id"])
    return root / "s.zarr", labels


def _predictions(run: Path) -> dict[str, float]:
    with (run / "predictions.csv").open() as fh:
        return {row["slide_id"]: float(row["prob_tumour"]) for row in csv.DictReader(fh)}


@pytest.mark.parametrize(("model", "settings"), [("abmil", {}),
                                                 ("dsmil", {"lr_schedule": "cosine", "smoothing": 0.5})])
def test_folds_trained_together_equal_folds_trained_one_by_one(cohort, tmp_path, model, settings):
    store, labels = cohort
    runs = {}
    for parallel in (1, 0):
        cfg = FitConfig(store=str(store), labels=str(labels), out=str(tmp_path / f"p{parallel}"), model=model,
                        options={"hidden": 16}, folds=3, parallel_folds=parallel, save_attention=False, **FAST,
                        **settings)
        runs[parallel] = fit(cfg)
    alone, together = runs[1], runs[0]
    assert [f.best_epoch for f in together.folds] == [f.best_epoch for f in alone.folds]
    for a, b in zip(alone.folds, together.folds, strict=True):
        assert b.metrics == pytest.approx(a.metrics, abs=1e-6)
    first, second = _predictions(tmp_path / "p1"), _predictions(tmp_path / "p0")
    assert second.keys() == first.keys()
    assert max(abs(first[k] - second[k]) for k in first) < 1e-4


def test_fit_cli_trains_several_slides_per_step_and_warns_about_the_cache(cohort, tmp_path):
    store, labels = cohort
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "fit", "--store", str(store), "--labels", str(labels), "--model", "abmil", "--out", str(out),
        "--folds", "3", "--epochs", "12", "--lr", "0.01", "--threads", "1", "--device", "cpu", "--batch-size", "4",
        "--parallel-folds", "0", "--cache-gb", "0.00002", "-O", "hidden=16", "--quiet"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "The patch embeddings of these 24 slides take 0.07 MB in float16 but cache_gb holds 0.02 MB" in text
    assert "set cache_gb to 0.1 or more" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["config"]["batch_size"] == 4
    assert metrics["pooled"]["auc"] >= 0.8  # held-out test folds


def test_patch_only_reads_skip_cells_and_never_cache_partial_bags(cohort):
    store, _ = cohort
    data = StoreData(FeatureStore.open(store), ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1)
    patches, cells = data.read("s01", np.arange(2), cells=False)
    assert cells is None and patches.dtype == np.float16 and len(data.cache) == 0
    patches_again, cells = data.read("s01", np.arange(2))
    assert cells is not None and cells.shape[:2] == (2, patches.shape[1]) and len(data.cache) == 2
    np.testing.assert_array_equal(patches, patches_again)


def test_sweep_trains_variants_of_one_head_together_with_the_results_of_separate_fits(cohort, tmp_path):
    store, labels = cohort
    spec = tmp_path / "sweep.toml"
    spec.write_text(f"""
[base]
store = "{store}"
labels = "{labels}"
folds = 2
epochs = 3
min_epochs = 1
max_bags = 2
device = "cpu"
threads = 1
save_attention = false
[grid]
lr = [0.005, 0.01]
[[variant]]
name = "abmil"
model = "abmil"
options = {{hidden = 16}}
[[variant]]
name = "mean"
model = "mean"
""")
    runs = load_spec(spec).runs()
    groups = group_tasks([(run, "") for run in runs], workers=1)
    assert sorted(len(g) for g in groups) == [2, 2]  # each head's two learning rates train together
    assert len(group_tasks([(run, "") for run in runs], workers=3)) == 3
    result = run_sweep(spec, tmp_path / "SWEEP", workers=1)
    assert result.count("ran") == 4
    run = runs[1]
    alone = fit(run.fit_config(tmp_path / "alone"))
    swept = json.loads((tmp_path / "SWEEP" / "runs" / run.hash / "metrics.json").read_text())
    assert [f["auc"] for f in swept["folds"]] == pytest.approx([f.metrics["auc"] for f in alone.folds], abs=1e-6)


class BagMined(InstanceHead):
    """A batched head with a bag level and per-bag loss weights, as MRAN's bag mining uses them."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__(in_dim, n_classes)
        self.score = torch.nn.Linear(in_dim, 1)
        self.classifier = torch.nn.Linear(in_dim, n_classes)

    def forward(self, patches, cells=None, mask=None, bag_weights=None) -> MILOutput:
        return super().forward(patches, cells, mask)

    def pool(self, x, valid):
        a = masked_softmax(self.score(x).squeeze(-1), valid)
        return self.classifier(pool(a, x)), a, {}

    def compute_loss(self, out, label, *, epoch, n_epochs, class_weights=None, bag_weights=None):
        loss = weighted_ce(out.logits, label, class_weights, reduction="none")
        if bag_weights is not None:  # weigh each slide's loss by its bags' mean weight where attention sits
            loss = loss * (1 + (out.attention["bag"] * bag_weights).sum(-1)) / 2
        return loss, {"loss": loss.detach()}


def test_bag_mining_through_batched_members_equals_one_by_one(cohort):
    store, _ = cohort
    data = StoreData(FeatureStore.open(store), [f"s{i:02d}" for i in range(24)], cells=False,
                     patch_min_tissue=0.25, cache_gb=1)
    y = np.arange(24) % 2
    ids = data.slide_ids
    results = {}
    for together in (False, True):
        members = []
        for fold in range(3):
            torch.manual_seed(fold)
            cfg = FitConfig(store="-", labels="-", out="-", batch_size=2, **FAST)
            train = [i for i in range(24) if i % 3 != fold]
            val = [i for i in range(24) if i % 3 == fold]
            members.append(Member(BagMined(data.in_dim, 2), [ids[i] for i in train], y[train],
                                  [ids[i] for i in val], y[val], cfg, seed=fold))
        with torch_settings(1, torch.device("cpu")):
            results[together] = (train_members(members, data) if together
                                  else [r for m in members for r in train_members([m], data)])
    assert uses_bag_weights(members[0].head)
    for alone, stacked in zip(results[False], results[True], strict=True):
        assert stacked.best_epoch == alone.best_epoch
        assert [h["val_loss"] for h in stacked.history] == pytest.approx([h["val_loss"] for h in alone.history],
                                                                         rel=1e-4)


def test_a_head_without_the_batched_contract_trains_one_slide_per_step_and_says_so(cohort, tmp_path, monkeypatch):
    store, labels = cohort
    monkeypatch.setattr(ABMIL, "batched", False)  # as a head that takes one slide per call
    notes = []
    cfg = FitConfig(store=str(store), labels=str(labels), out=str(tmp_path / "run"), model="abmil",
                    options={"hidden": 8}, folds=2, batch_size=4, save_attention=False,
                    **{**FAST, "epochs": 2})
    report = fit(cfg, progress=lambda event, info: notes.append(info["message"]) if event == "note" else None)
    assert any("does not take padded batches of slides yet" in n and "batch_size 4 is ignored" in n for n in notes)
    assert len(report.folds) == 2 and all(f.epochs_run == 2 for f in report.folds)


def test_in_memory_slides_without_a_tissue_patch_are_refused_up_front():
    patches = {"a": np.zeros((1, 3, 4), np.float32), "b": np.zeros((2, 3, 4), np.float32)}
    masks = {"b": np.zeros((2, 3), bool)}
    with pytest.raises(ConfigError, match="slide 'b' has no True in its mask"):
        ArrayData(patches, masks=masks)


def test_the_per_epoch_auc_equals_sklearns_with_ties():
    from sklearn.metrics import roc_auc_score

    from mrantool.training.metrics import binary_auc

    rng = np.random.default_rng(0)
    for _ in range(50):
        y = np.r_[0, 1, rng.integers(0, 2, 20)]
        scores = np.round(rng.random(len(y)), 1)  # many ties
        assert binary_auc(y == 1, scores) == pytest.approx(roc_auc_score(y == 1, scores), abs=1e-12)
