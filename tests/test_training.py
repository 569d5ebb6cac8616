"""Training stage: labels, splits, cached data, the fold loop, metrics, and the fit/predict run folder."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mrantool.config import FitConfig
from mrantool.errors import ConfigError, LabelsError, StoreError
from mrantool.models.registry import create_head
from mrantool.store import FeatureStore, make_identity
from mrantool.training import api
from mrantool.training.api import fit, fit_data, fit_many, load_fold_models, predict
from mrantool.training.data import ArrayData, LRUCache, StoreData, cell_tissue_mask, tissue_mask
from mrantool.training.labels import make_labels, read_labels
from mrantool.training.loop import evaluate, torch_settings, train_fold
from mrantool.training.metrics import auc, mean_sd, slide_metrics
from mrantool.training.runs import check_config
from mrantool.training.splits import make_splits

N_SLIDES, N_BAGS, GRID, CELLS, DIM = 24, 3, 4, 2, 32
P, C = GRID * GRID, CELLS * CELLS
FAST = {"epochs": 4, "lr": 5e-3, "patience": 10, "min_epochs": 1, "max_bags": 2, "threads": 1,
        "device": "cpu"}
ALLOWED_SUFFIXES = {".json", ".csv", ".png", ".npz", ".safetensors"}


def identity(has_cells: bool = True, encoder: str = "toy") -> dict:
    return make_identity(encoder=encoder, weights="random-init", transforms={}, embed_dim=DIM,
                         geometry={"bag_px": 128, "mpp": 1.0, "grid": GRID, "cells": CELLS}, preset=None,
                         has_cells=has_cells)


def provenance() -> dict:
    return {"source": "generated", "fingerprint": None, "mpp": 1.0, "level0_size": [512, 512],
            "bag_size_l0": 128}


def slide_features(positive: bool, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Non-negative cells; a positive slide has a few strong cells along one direction in 2 of its 3 bags."""
    cells = np.abs(rng.normal(0, 0.5, (N_BAGS, P, C, DIM))).astype(np.float32)
    tissue = np.ones((N_BAGS, P), np.float32)
    tissue[:, -2:] = 0.05  # masked out by patch_min_tissue
    if positive:
        for bag in range(2):
            for patch in rng.choice(P - 2, 4, replace=False):
                cells[bag, patch, rng.integers(C), :8] += 3.0
    return np.zeros((N_BAGS, 2)), tissue, cells.mean(axis=2), cells


def write_store(path: Path, n: int = N_SLIDES, has_cells: bool = True, encoder: str = "toy") -> FeatureStore:
    store = FeatureStore.create(path, identity(has_cells, encoder))
    rng = np.random.default_rng(0)
    for i in range(n):
        coords, tissue, patches, cells = slide_features(i % 2 == 1, rng)
        writer = store.begin_slide(f"s{i:02d}", N_BAGS, provenance())
        writer.write(0, coords, tissue, patches, cells if has_cells else None)
        writer.commit()
    return store


def write_labels(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_rows(n: int = N_SLIDES) -> list[dict]:
    """Odd slides positive; slides 2j and 2j+2 share a patient (same label) for j < 4."""
    return [{"slide_id": f"s{i:02d}", "label": "tumour" if i % 2 else "normal",
             "patient_id": f"p{i - 2 if i in (2, 3, 6, 7) else i}"} for i in range(n)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("training")
    store = write_store(root / "s.zarr")
    labels = write_labels(root / "labels.csv", label_rows(), ["slide_id", "label", "patient_id"])
    return {"root": root, "store": store.path, "labels": labels}


def config(cohort: dict, out: str, **extra) -> FitConfig:
    return FitConfig(store=str(cohort["store"]), labels=str(cohort["labels"]), out=str(cohort["root"] / out),
                     **{"folds": 2, **FAST, **extra})


@pytest.fixture(scope="module")
def mran_run(cohort: dict) -> dict:
    events: list[tuple[str, dict]] = []
    report = fit(config(cohort, "mran"), progress=lambda event, info: events.append((event, info)))
    return {"report": report, "events": events, "out": cohort["root"] / "mran"}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- fit / predict ---

def test_fit_mran_writes_the_run_folder(mran_run: dict) -> None:
    out, report = mran_run["out"], mran_run["report"]
    for name in ("config.json", "splits.json", "metrics.json", "predictions.csv", "curves.png", "roc.png"):
        assert (out / name).is_file(), name
    assert all(p.suffix in ALLOWED_SUFFIXES for p in out.rglob("*") if p.is_file())  # no pickle anywhere
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classes"] == ["normal", "tumour"] and cfg["store_identity"]["encoder"] == "toy"
    assert cfg["head_options"]["t"] == 0.1 and cfg["config"]["folds"] == 2 and cfg["mrantool_version"]
    for fold in ("fold_0", "fold_1"):
        head = json.loads((out / fold / "head.json").read_text())
        assert head["model"] == "mran" and head["in_dim"] == DIM and head["classes"] == ["normal", "tumour"]
        weights = load_file(str(out / fold / "model.safetensors"))
        assert head["standardize"] and "head.classifier.weight" in weights
        assert weights["sd"].shape == (DIM,) and (weights["sd"] > 0).all()  # the fold's feature statistics
    preds = read_csv(out / "predictions.csv")
    assert sorted(r["slide_id"] for r in preds) == [f"s{i:02d}" for i in range(N_SLIDES)]
    assert list(preds[0]) == ["slide_id", "fold", "repeat", "label", "prob_normal", "prob_tumour",
                              "predicted"]
    with np.load(out / "attention" / "s01.npz", allow_pickle=False) as att:
        assert att["bag"].shape == (N_BAGS,) and att["patch"].shape == (N_BAGS, P)
        assert att["cell"].shape == (N_BAGS, P, C)
        assert np.allclose(att["patch"][:, -2:], 0) and math.isclose(att["cell"].sum(), 1, rel_tol=1e-5)
    assert len(list((out / "attention").glob("*.npz"))) == N_SLIDES
    assert report.mean["auc"] > 0.8 and all(f.metrics["auc"] > 0.8 for f in report.folds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean"]["auc"] == pytest.approx(report.mean["auc"]) and len(metrics["folds"]) == 2
    table = report.table()
    assert [r["fold"] for r in table] == ["fold_0", "fold_1", "mean ± sd", "pooled"]
    assert "±" in table[2]["auc"]
    kinds = [event for event, _ in mran_run["events"]]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("fold_end") == 2 and "epoch" in kinds


def test_fit_records_labels_notes_and_refuses_a_finished_run(cohort: dict, mran_run: dict) -> None:
    with pytest.raises(ConfigError, match="already holds a finished fit run"):
        fit(config(cohort, "mran"))
    labels = read_labels(cohort["labels"], [*[f"s{i:02d}" for i in range(N_SLIDES)], "extra"])
    assert labels.notes and "1 slide(s) in the store have no row" in labels.notes[0]


def test_same_seed_and_tiny_cache_give_identical_results(cohort: dict, mran_run: dict) -> None:
    """A second run with the same seed, through a ~21 kB cache (4 bags: constant eviction), matches."""
    tiny = fit(config(cohort, "tiny", cache_gb=2e-5))
    out = cohort["root"] / "tiny"
    assert (out / "metrics.json").read_text() == (mran_run["out"] / "metrics.json").read_text()
    assert (out / "predictions.csv").read_text() == (mran_run["out"] / "predictions.csv").read_text()
    assert tiny.mean == mran_run["report"].mean


def test_predict_reproduces_fold_probabilities_and_ensembles(cohort: dict, mran_run: dict) -> None:
    out = mran_run["out"]
    fold0 = [r for r in read_csv(out / "predictions.csv") if r["fold"] == "0"]
    rows = predict(out, cohort["store"], cohort["root"] / "p0.csv", slides=[r["slide_id"] for r in fold0],
                   folds=["fold_0"], device="cpu")
    for mine, theirs in zip(rows, fold0, strict=True):
        assert mine["slide_id"] == theirs["slide_id"] and mine["predicted"] == theirs["predicted"]
        assert mine["prob_tumour"] == pytest.approx(float(theirs["prob_tumour"]), abs=1e-6)
    every = predict(out, cohort["store"], cohort["root"] / "all.csv", device="cpu")
    assert len(every) == N_SLIDES and len(read_csv(cohort["root"] / "all.csv")) == N_SLIDES
    assert all(r["prob_normal"] + r["prob_tumour"] == pytest.approx(1) for r in every)
    assert [name for name, _, _ in load_fold_models(out)] == ["fold_0", "fold_1"]


def test_ensemble_members_have_their_own_seeds_and_validation_slides_and_are_averaged(cohort: dict,
                                                                                      mran_run: dict) -> None:
    out = cohort["root"] / "ens"
    report = fit(config(cohort, "ens", ensemble=3))
    splits = {s["name"]: s for s in json.loads((out / "splits.json").read_text())}
    preds = read_csv(out / "predictions.csv")
    for fold, split in splits.items():
        folders = [out / fold, out / fold / "member_1", out / fold / "member_2"]
        heads = [json.loads((f / "head.json").read_text()) for f in folders]
        assert [h["member"] for h in heads] == [0, 1, 2] and len({h["seed"] for h in heads}) == 3
        assert heads[0]["val_slides"] == split["val"]  # member 0 is the fold's model of a run without ensemble
        pool = set(split["train"]) | set(split["val"])
        vals = [set(h["val_slides"]) for h in heads]
        assert all(v and v <= pool and not v & set(split["test"]) for v in vals)
        assert len({frozenset(v) for v in vals}) > 1  # different validation slides, so they train on different ones
        weights = [load_file(str(f / "model.safetensors"))["head.classifier.weight"] for f in folders]
        assert not torch.equal(weights[0], weights[1])
        # the fold's test probabilities are the mean of its members' (each member evaluated on its own), and
        # predict on that fold averages the same three models
        mine = [r for r in preds if f"fold_{r['fold']}" == fold]
        ids = [r["slide_id"] for r in mine]
        models = load_fold_models(out, [fold])
        assert [name for name, _, _ in models] == [fold, f"{fold}/member_1", f"{fold}/member_2"]
        data = StoreData(FeatureStore.open(cohort["store"]), ids, cells=True, patch_min_tissue=0.25, cache_gb=1)
        each = np.stack([evaluate(head, data, ids).probs[:, 1] for _, head, _ in models])
        assert not np.allclose(each[0], each[1])
        assert np.allclose(each.mean(0), [float(r["prob_tumour"]) for r in mine], atol=1e-6)
        rows = predict(out, cohort["store"], cohort["root"] / f"ens_{fold}.csv", folds=[fold], slides=ids,
                       device="cpu")
        assert np.allclose([r["prob_tumour"] for r in rows], each.mean(0), atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(f["members"]) for f in metrics["folds"]] == [3, 3]
    assert report.mean["auc"] > 0.8
    assert len(load_fold_models(out)) == 6 and not list(mran_run["out"].glob("fold_*/member_*"))


def test_ensemble_must_be_positive_and_cache_only(cohort: dict) -> None:
    with pytest.raises(ConfigError, match="ensemble 0"):
        fit(config(cohort, "ens0", ensemble=0))
    with pytest.raises(ConfigError, match="ensemble 2 with end_to_end"):
        fit(config(cohort, "ens_e2e", ensemble=2, end_to_end=True))


def test_predict_refuses_a_store_of_another_encoder(cohort: dict, mran_run: dict) -> None:
    other = write_store(cohort["root"] / "other.zarr", n=1, encoder="resnet50")
    with pytest.raises(StoreError, match=r"another encoder or geometry .*encoder"):
        predict(mran_run["out"], other.path, cohort["root"] / "x.csv")


def test_fit_abmil(cohort: dict) -> None:
    report = fit(config(cohort, "abmil", model="abmil", options={"hidden": 64}))
    assert report.mean["auc"] > 0.8
    with np.load(report.out / "attention" / "s00.npz") as att:
        assert set(att.files) == {"bag", "patch"}
    assert json.loads((report.out / "fold_0" / "head.json").read_text())["options"]["hidden"] == 64


def test_store_without_cells_and_mran_gives_the_heads_error(tmp_path: Path, cohort: dict) -> None:
    store = write_store(tmp_path / "p.zarr", n=4, has_cells=False)
    labels = write_labels(tmp_path / "l.csv", label_rows(4), ["slide_id", "label"])
    cfg = FitConfig(store=str(store.path), labels=str(labels), out=str(tmp_path / "run"), folds=2, **FAST)
    with pytest.raises(ConfigError, match=r"needs cell embeddings.*cells=false") as err:
        fit(cfg)
    assert str(err.value).count(". ") == 0 and not (tmp_path / "run").exists()


def test_three_classes_from_arrays_without_geometry(tmp_path: Path) -> None:
    """Musk-style bags: one bag of a varying number of instances per sample, no store, no coordinates."""
    rng = np.random.default_rng(1)
    patches, names, classes = {}, [], []
    for i in range(24):
        k = i % 3
        x = rng.normal(0, 1, (int(rng.integers(5, 12)), DIM)).astype(np.float32)
        if k:
            x[:2, 4 * k:4 * k + 4] += 3.0
        patches[f"m{i}"] = x[None]
        names.append(f"m{i}")
        classes.append(["a", "b", "c"][k])
    labels = make_labels(names, classes)
    cfg = FitConfig(store="-", labels="-", out=str(tmp_path / "musk"), model="abmil", options={"hidden": 32},
                    folds=3, **FAST)
    report = fit_data(cfg, ArrayData(patches), labels)
    assert report.classes == ["a", "b", "c"] and report.mean["auc"] > 0.8
    preds = read_csv(tmp_path / "musk" / "predictions.csv")
    assert {"prob_a", "prob_b", "prob_c"} <= set(preds[0]) and len(preds) == 24


# --- the fold loop ---

def test_best_checkpoint_is_a_copy_not_the_live_weights() -> None:
    """Validation labels contradict training labels, so validation loss is best early and training goes on."""
    rng = np.random.default_rng(0)
    patches, y = {}, []
    for i in range(16):
        x = rng.normal(0, 1, (2, 4, 8)).astype(np.float32)
        x[..., 0] += 2.0 * (i % 2)
        patches[f"x{i}"] = x
        y.append(i % 2)
    ids, y = list(patches), np.array(y)
    cfg = FitConfig(store="-", labels="-", out="-", epochs=8, lr=0.05, patience=100, min_epochs=8,
                    device="cpu")
    torch.manual_seed(0)
    head = create_head("abmil", 8, 2, hidden=16, attn_dim=8)
    snapshots = []
    with torch_settings(1, torch.device("cpu")):
        result = train_fold(head, ArrayData(patches), ids[:12], y[:12], ids[12:], 1 - y[12:], cfg, seed=0,
                            progress=lambda event, info: snapshots.append(copy.deepcopy(head.state_dict())))
    assert result.epochs_run == 8 and result.best_epoch < 8
    best = snapshots[result.best_epoch - 1]
    for name, tensor in result.state.items():
        assert torch.equal(tensor, best[name]), name
    assert any(not torch.equal(result.state[n], t) for n, t in head.state_dict().items())


def border_cell_store(path: Path, glass: float = 0.0) -> FeatureStore:
    """The cohort's features in a store that records cell tissue: cell 3 of every patch is 10% of its patch's.
    With `glass`, cell 3's fraction varies from patch to patch (5-50%) and its features shift by `glass` x its
    missing tissue, as glass in a receptive field shifts them."""
    store = FeatureStore.create(path, identity())
    rng = np.random.default_rng(0)
    for i in range(N_SLIDES):
        coords, tissue, patches, cells = slide_features(i % 2 == 1, rng)
        cell_tissue = np.ones((N_BAGS, P, C), np.float32)
        cell_tissue[..., 3] = rng.uniform(0.05, 0.5, size=(N_BAGS, P)) if glass else 0.1
        cells[..., 3, :] += glass * (1 - cell_tissue[..., 3, None])
        writer = store.begin_slide(f"s{i:02d}", N_BAGS, provenance())
        writer.write(0, coords, tissue, patches, cells, cell_tissue * tissue[..., None])
        writer.commit()
    return store


def test_cells_with_little_tissue_get_no_attention_in_fit_and_predict(tmp_path: Path, cohort: dict) -> None:
    """A store whose slides record cell tissue: cell 3 of every patch is 10% tissue (a tissue border)."""
    store = border_cell_store(tmp_path / "c.zarr")
    cfg = FitConfig(store=str(store.path), labels=str(cohort["labels"]), out=str(tmp_path / "run"), folds=2,
                    cell_min_tissue=0.5, **FAST)
    report = fit(cfg)
    with np.load(report.out / "attention" / "s01.npz") as att:
        assert np.all(att["cell"][..., 3] == 0) and att["cell"][..., :3].sum() == pytest.approx(1, rel=1e-5)
    data = StoreData(store, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0, cell_min_tissue=0.5)
    assert data.bags("s01").cell_mask[:, :-2, :3].all() and not data.bags("s01").cell_mask[:, :-2, 3].any()
    assert StoreData(store, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0).cell_mask("s01") is None
    assert FitConfig(store="s", labels="l", out="o").cell_min_tissue == 0.0  # off unless asked for (docs/fit.md)
    everything = fit(cfg.model_copy(update={"out": str(tmp_path / "all"), "cell_min_tissue": 0.0}))
    with np.load(everything.out / "attention" / "s01.npz") as att:
        assert att["cell"][:, :-2, 3].sum() > 0
    mask = cell_tissue_mask(np.array([[[0.2, 0.6], [0.1, 0.3]]]), 0.5)
    assert mask.tolist() == [[[False, True], [False, True]]]  # a patch without such a cell keeps its best one
    assert len(predict(report.out, store.path, tmp_path / "p.csv")) == N_SLIDES


def test_tissue_weights_fit_and_predict_weigh_glassy_cells_down(tmp_path: Path, cohort: dict) -> None:
    """Cell 3 of every patch is 10% tissue: with tissue_weights its attention is a tenth of what the same fitted
    heads give it without the weights, and predict applies the run's setting."""
    store = border_cell_store(tmp_path / "c.zarr")
    cfg = FitConfig(store=str(store.path), labels=str(cohort["labels"]), out=str(tmp_path / "run"), folds=2,
                    tissue_weights=True, **FAST)
    report = fit(cfg)
    assert json.loads((report.out / "config.json").read_text())["config"]["tissue_weights"] is True
    weighted = StoreData(store, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0, tissue_weights=True)
    plain = StoreData(store, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0)
    bags, same = weighted.bags("s01"), plain.bags("s01")
    assert bags.cell_mask.dtype == torch.float32
    assert torch.allclose(bags.cell_mask[:, :-2, 3], torch.tensor(0.1), atol=1e-3)  # the tissue patches
    _, head, _ = load_fold_models(report.out, None, torch.device("cpu"))[0]
    with torch.no_grad():
        beta = head(bags.patches, bags.cells, bags.mask, cell_mask=bags.cell_mask).aux["beta"][bags.mask]
        raw = head(same.patches, same.cells, same.mask).aux["beta"][same.mask]
    w = bags.cell_mask[bags.mask]  # the stored fractions (float16): 1 and about 0.1
    expected = raw[:, 3] * w[:, 3] / (raw * w).sum(-1)
    assert torch.allclose(beta[:, 3], expected, atol=1e-6)
    assert len(predict(report.out, store.path, tmp_path / "p.csv")) == N_SLIDES
    with pytest.raises(ConfigError, match=r"tissue_weights weighs cells.*reads no cells"):
        StoreData(store, ["s01"], cells=False, patch_min_tissue=0.25, cache_gb=1.0, tissue_weights=True)
    no_cells = write_store(tmp_path / "no_cells.zarr", n=2, has_cells=False)
    with pytest.raises(ConfigError, match=r"tissue_weights weighs cells.*store .*no_cells.zarr has none"):
        StoreData(no_cells, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0, tissue_weights=True)
    with pytest.raises(ConfigError, match="tissue_weights with end_to_end"):
        check_config(cfg.model_copy(update={"end_to_end": True}))
    shutil.rmtree(store.path / "slides" / "s01" / "cell_tissue")  # as a store written before they were kept
    older = StoreData(FeatureStore.open(store.path), ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0,
                      tissue_weights=True)
    with pytest.raises(ConfigError, match=r"Slide s01 of store .* has no cell tissue fractions.*`fit --glass` sets it"):
        older.bags("s01")


def test_tissue_centring_fits_slopes_per_fold_and_predict_applies_them(tmp_path: Path, cohort: dict) -> None:
    """With tissue_centring each fold's head carries the slopes of its own training cells on their tissue
    fraction, and predict (which passes the fractions) runs with them; without tissue_weights it is refused."""
    store = border_cell_store(tmp_path / "c.zarr", glass=2.0)
    cfg = FitConfig(store=str(store.path), labels=str(cohort["labels"]), out=str(tmp_path / "run"), folds=2,
                    tissue_weights=True, tissue_centring=True, **FAST)
    report = fit(cfg)
    heads = [head for _, head, _ in load_fold_models(report.out, None, torch.device("cpu"))]
    for head in heads:  # cell 3's features fall by 2 per unit of tissue: found without the labels' help
        assert head.cell_slope.shape == head.cell_mean.shape
        assert head.cell_slope[3].mean().item() == pytest.approx(-2.0, abs=0.2)
        assert torch.all(head.cell_slope[:3] == 0)  # whole-tissue cells: no spread of fractions, no slope
        assert 0.2 < head.cell_tissue_mean[3] < 0.35
    assert not torch.equal(heads[0].cell_slope, heads[1].cell_slope)  # each fold's own training slides
    assert len(predict(report.out, store.path, tmp_path / "p.csv")) == N_SLIDES
    plain = fit(cfg.model_copy(update={"out": str(tmp_path / "plain"), "tissue_centring": False}))
    assert load_fold_models(plain.out, None, torch.device("cpu"))[0][1].cell_slope.numel() == 0
    with pytest.raises(ConfigError, match="tissue_centring without tissue_weights and standardize"):
        check_config(cfg.model_copy(update={"tissue_weights": False}))
    with pytest.raises(ConfigError, match="tissue_spread without tissue_centring"):
        check_config(cfg.model_copy(update={"tissue_centring": False, "tissue_spread": True}))


def test_a_sweep_of_centred_and_spread_variants_reads_each_slide_once(tmp_path: Path, cohort: dict,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Variants with and without tissue_spread share one statistics pass (fit_many, as sweeps call it): each slide's
    sums, per-bin ones included, are taken once; the two train in separate groups (their heads' buffers differ in
    shape, which once failed the shared group) and only the spread variant's heads carry spreads."""
    store = border_cell_store(tmp_path / "c.zarr", glass=2.0)
    labels = read_labels(cohort["labels"], store.slide_ids())
    cfg = FitConfig(store=str(store.path), labels=str(cohort["labels"]), out=str(tmp_path / "centred"), folds=2,
                    tissue_weights=True, tissue_centring=True, **FAST)
    data = StoreData(store, labels.slide_ids, cells=True, patch_min_tissue=cfg.patch_min_tissue, cache_gb=1.0,
                     tissue_weights=True)
    reads: list[str] = []
    slide_moments = api._slide_moments
    monkeypatch.setattr(api, "_slide_moments", lambda d, sid, bins=False: reads.append(sid) or slide_moments(d, sid,
                                                                                                          bins))
    centred, spread = fit_many([cfg, cfg.model_copy(update={"out": str(tmp_path / "spread"), "tissue_spread": True})],
                               data, labels)
    assert len(reads) == len(set(reads)) > N_SLIDES / 2  # every training slide of either fold, once
    assert all(h.cell_spread.numel() == 0 for _, h, _ in load_fold_models(centred.out, None, torch.device("cpu")))
    assert all(h.cell_spread.shape == (len(h.cell_mean), 10)
               for _, h, _ in load_fold_models(spread.out, None, torch.device("cpu")))


def test_data_cache_mask_and_sampling(cohort: dict) -> None:
    store = FeatureStore.open(cohort["store"])
    data = StoreData(store, ["s01"], cells=True, patch_min_tissue=0.25, cache_gb=1.0)
    bags = data.bags("s01", np.array([0, 2]))
    assert bags.patches.dtype == torch.float32 and bags.cells.shape == (2, P, C, DIM)
    assert bags.mask.shape == (2, P) and not bags.mask[:, -2:].any() and bags.mask[:, :-2].all()
    again = data.bags("s01")
    assert data.cache.hits == 2 and torch.equal(again.cells[[0, 2]], bags.cells)
    np.testing.assert_allclose(again.cells.numpy(), store.slide("s01").cell_emb[:].astype(np.float32))
    small = StoreData(store, ["s01", "s03"], cells=True, patch_min_tissue=0.25, cache_gb=2e-5)  # 4 bags fit
    for slide_id in ("s01", "s03", "s01"):
        np.testing.assert_array_equal(small.bags(slide_id).cells, data.bags(slide_id).cells)
    assert len(small.cache) == 4 and small.cache.evictions == 4
    assert small.cache.hits == 1  # s01's bag 2 was still cached
    mask = tissue_mask(np.array([[0.1, 0.2], [0.9, np.nan]]), 0.5)
    assert mask.tolist() == [[False, True], [True, False]]  # a bag without tissue keeps its best patch
    cache = LRUCache(250)
    for key in range(3):
        cache.put(key, (np.zeros(100, np.uint8), None))
    assert cache.get(0) is None and cache.get(2) is not None and cache.evictions == 1


# --- labels, splits, metrics ---

def test_labels_errors(tmp_path: Path) -> None:
    ids = [f"s{i:02d}" for i in range(N_SLIDES)]
    missing = write_labels(tmp_path / "a.csv", [{"slide_id": "s00"}], ["slide_id"])
    with pytest.raises(LabelsError, match=r"a\.csv lacks column\(s\) label"):
        read_labels(missing, ids)
    extra = [{"slide_id": f"z{i}", "label": "x"} for i in range(5)]
    unknown = write_labels(tmp_path / "b.csv", [*label_rows(4), *extra], ["slide_id", "label", "patient_id"])
    with pytest.raises(LabelsError, match=r"names 5 slide id\(s\) that are not in the store \('z0', 'z1', "
                                          r"'z2' and 2 more"):
        read_labels(unknown, ids)
    one = write_labels(tmp_path / "c.csv", [{"slide_id": i, "label": "x"} for i in ids[:4]],
                       ["slide_id", "label"])
    with pytest.raises(LabelsError, match=r"only one class \('x'\)"):
        read_labels(one, ids)
    dupes = write_labels(tmp_path / "d.csv", [*label_rows(4), label_rows(1)[0]],
                         ["slide_id", "label", "patient_id"])
    with pytest.raises(LabelsError, match="more than once"):
        read_labels(dupes, ids)
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "none.csv", ids)
    labels = read_labels(write_labels(tmp_path / "e.csv", label_rows(4), ["slide_id", "label"]), ids)
    assert labels.patients == labels.slide_ids and labels.classes == ["normal", "tumour"]
    assert labels.folds is None


def test_splits_group_patients_and_are_deterministic() -> None:
    patients = [f"p{i // 2}" for i in range(60)]
    y = [("a", "b", "c")[(i // 2) % 3] for i in range(60)]
    labels = make_labels([f"s{i}" for i in range(60)], y, patients)
    splits = make_splits(labels, folds=4, repeats=2, val_fraction=0.25, seed=3)
    assert len(splits) == 8 and splits[0].name(2) == "repeat_0/fold_0"
    for repeat in (0, 1):
        tests = [set(np.asarray(patients)[s.test]) for s in splits if s.repeat == repeat]
        assert sum(len(t) for t in tests) == 30 and len(set().union(*tests)) == 30  # no patient in two folds
    for s in splits:
        parts = [set(np.asarray(patients)[idx]) for idx in (s.train, s.val, s.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(s.val) > 0 and set(labels.y[s.train]) == {0, 1, 2}
    again = make_splits(labels, folds=4, repeats=2, val_fraction=0.25, seed=3)
    same = [np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)
            for a, b in zip(splits, again, strict=True)]
    assert all(same)
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(splits[:4], splits[4:], strict=True))


def test_fold_column_and_too_few_slides(tmp_path: Path) -> None:
    rows = [{**r, "fold": str(int(r["patient_id"][1:]) % 3)} for r in label_rows()]
    labels = read_labels(write_labels(tmp_path / "f.csv", rows, ["slide_id", "label", "patient_id", "fold"]))
    splits = make_splits(labels, folds=5, repeats=3)
    assert [s.fold for s in splits] == [0, 1, 2]
    for s in splits:
        assert set(labels.folds[s.test]) == {s.fold} and s.fold not in set(labels.folds[s.train])
    bad = [{**r, "fold": "1" if r["slide_id"] == "s02" else r["fold"]} for r in rows]
    with pytest.raises(LabelsError, match="puts patient 'p0' in folds"):
        make_splits(read_labels(write_labels(tmp_path / "g.csv", bad, list(bad[0]))))
    few = make_labels(["a", "b", "c", "d", "e"], ["x", "x", "x", "y", "y"])
    with pytest.raises(LabelsError, match=r"too few slides for 3-fold.*'y' has 2 slides from 2 patients"):
        make_splits(few, folds=3)


def test_metrics_nan_auc_and_macro_ovr() -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    y = np.array([0, 1, 2, 1])
    from sklearn.metrics import roc_auc_score

    assert auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    single = slide_metrics(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert math.isnan(single["auc"]) and single["accuracy"] == 0.5
    mean, sd = mean_sd([single, {**single, "auc": 0.8}, {**single, "auc": 0.6}])
    assert mean["auc"] == pytest.approx(0.7) and sd["auc"] == pytest.approx(math.sqrt(0.02))


def test_val_fraction_zero_trains_on_all_training_slides() -> None:
    """Regression: val_fraction = 0 divided by zero before its own guard."""
    from mrantool.training.labels import make_labels
    from mrantool.training.splits import validation_split

    labels = make_labels([f"s{i}" for i in range(8)], ["a", "b"] * 4, source="test")
    train = np.arange(8)
    fit_rows, val_rows = validation_split(labels, train, 0.0, seed=0)
    assert fit_rows.tolist() == train.tolist() and len(val_rows) == 0


def test_mean_row_says_over_how_many_folds_a_metric_is_defined(tmp_path: Path) -> None:
    """A fold whose test slides have one class has AUC NaN: the mean must say it covers n of k folds."""
    from mrantool.training.api import FitReport, FoldReport
    from mrantool.training.metrics import folds_used, mean_sd

    per_fold = [{"auc": math.nan, "accuracy": 1.0, "balanced_accuracy": 1.0, "f1": 1.0},
                {"auc": 0.5, "accuracy": 0.5, "balanced_accuracy": 0.5, "f1": 0.5}]
    folds = [FoldReport(f"fold_{k}", 0, k, 1, 1, "loss", 2, 0, 2, m) for k, m in enumerate(per_fold)]
    mean, sd = mean_sd(per_fold)
    report = FitReport(tmp_path, "mean", ["a", "b"], folds, mean, sd, per_fold[1], n_used=folds_used(per_fold))
    row = report.table()[-2]
    assert row["auc"] == "0.500 ± 0.000 (1 of 2 folds)" and row["accuracy"] == "0.750 ± 0.354"
