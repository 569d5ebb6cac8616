"""`fit` (cross-validated training of a MIL head on a store's cached features) and `predict`.

The run folder they write and read is described in mrantool.training.runs and docs/fit.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.errors import ConfigError, StoreError
from mrantool.files import output_file
from mrantool.models.registry import create_head
from mrantool.models.standardize import Standardized
from mrantool.store import FeatureStore
from mrantool.store.health import read_provenance
from mrantool.store.schema import identity_differences
from mrantool.training.data import MILData, StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.loop import Progress, evaluate, resolve_device, seed_everything, torch_settings, train_fold
from mrantool.training.metrics import slide_metrics
from mrantool.training.runs import (
    FitReport,
    FoldReport,
    attention_saver,
    check_config,
    finish_run,
    fold_names,
    load_fold_models,
    prediction_rows,
    read_run,
    refuse_finished,
    resolved_options,
    run_notes,
    save_checkpoint,
    slides_to_predict,
    start_run,
    write_predictions,
)
from mrantool.training.splits import Split, derive_seed, make_splits

# --- fit ---

def fit(cfg: FitConfig, progress: Progress | None = None) -> FitReport:
    """Cross-validate `cfg.model` on the labelled slides of `cfg.store`; write the run to `cfg.out`."""
    check_config(cfg)
    store = FeatureStore.open(cfg.store)
    labels = read_labels(cfg.labels, store.slide_ids(), id_column=cfg.id_column, label_column=cfg.label_column)
    store.require_whole(labels.slide_ids, "fit")
    leaked = [sid for sid in labels.slide_ids
              if read_provenance(store.layout.slide(sid)).get("labels_seen_by_encoder")]
    if leaked:
        labels.notes.append(f"Warning: {len(leaked)} labelled slide(s) ({', '.join(leaked[:3])}) trained the "
                            f"fine-tuned encoder of this store ({store.identity.get('finetuned_from')}): their "
                            "features carry their labels, so cross-validated metrics are optimistic (see "
                            "docs/finetune.md).")
    probe = create_head(cfg.model, store.dims.dim, labels.n_classes, **cfg.options)
    data = StoreData(store, labels.slide_ids, cells=probe.needs_cells, patch_min_tissue=cfg.patch_min_tissue,
                     cache_gb=cfg.cache_gb)
    return fit_data(cfg, data, labels, identity=store.identity, progress=progress)


def fit_data(cfg: FitConfig, data: MILData, labels: Labels, *, identity: dict[str, Any] | None = None,
             progress: Progress | None = None) -> FitReport:
    """`fit` on any `MILData` (a store, or in-memory arrays such as Musk bags); `identity` is recorded."""
    started = time.perf_counter()
    check_config(cfg)
    if cfg.end_to_end:
        raise ConfigError("end_to_end = true trains from pixels, not from cached features; call "
                          "mrantool.training.pixels.e2e.fit_end_to_end (`mrantool fit --end-to-end` does).")
    emit = progress or (lambda event, info: None)
    out = Path(cfg.out)
    refuse_finished(out)
    options = resolved_options(cfg.model, cfg.options)
    data.check_head(create_head(cfg.model, data.in_dim, labels.n_classes, **cfg.options))
    device = resolve_device(cfg.device)
    splits = make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
    notes = run_notes(labels, splits)
    for note in notes:
        emit("note", {"message": note})
    start_run(out, cfg, labels, splits, in_dim=data.in_dim, identity=identity, device=device, notes=notes)
    names = fold_names(splits)
    emit("start", {"n_slides": len(labels), "n_folds": len(splits), "epochs": cfg.epochs,
                   "classes": labels.classes, "device": str(device), "out": str(out)})
    reports, predictions, histories, rocs = [], [], {}, {}
    with torch_settings(cfg.threads, device):
        for index, (name, split) in enumerate(zip(names, splits, strict=True)):
            report, rows, history, y_probs = _run_fold(cfg, data, labels, split, name, index, len(splits),
                                                        options, device, emit)
            reports.append(report)
            predictions += rows
            histories[name], rocs[name] = history, y_probs
    return finish_run(cfg, out, labels, reports, predictions, histories, rocs, notes, started, emit)


FoldOutcome = tuple[FoldReport, list[dict[str, Any]], list[dict[str, float]], tuple[np.ndarray, np.ndarray]]


def _run_fold(cfg: FitConfig, data: MILData, labels: Labels, split: Split, name: str, index: int,
              n_folds: int, options: dict[str, Any], device: torch.device, emit: Progress) -> FoldOutcome:
    """Train, checkpoint and test one fold; attention files for the test slides of repeat 0."""
    out, ids, y = Path(cfg.out), labels.slide_ids, labels.y
    context = {"name": name, "repeat": split.repeat, "fold": split.fold, "index": index, "n_folds": n_folds}
    emit("fold_start", {**context, "n_train": len(split.train), "n_val": len(split.val),
                        "n_test": len(split.test)})
    seed = derive_seed(cfg.seed, split.repeat, split.fold, 2)
    seed_everything(seed)
    head = create_head(cfg.model, data.in_dim, labels.n_classes, **cfg.options)
    if cfg.standardize:
        head = Standardized(head, data.in_dim)
        head.set_stats(*feature_stats(data, [ids[i] for i in split.train]))
    result = train_fold(head, data, [ids[i] for i in split.train], y[split.train],
                        [ids[i] for i in split.val], y[split.val], cfg, seed=seed, device=device,
                        progress=emit, context=context)
    head.load_state_dict(result.state)
    save_checkpoint(out / name, head, {
        "model": cfg.model, "options": options, "in_dim": data.in_dim, "n_classes": labels.n_classes,
        "classes": labels.classes, "repeat": split.repeat, "fold": split.fold,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
        "standardize": cfg.standardize, "mrantool_version": __version__})
    test_ids = [ids[i] for i in split.test]
    saver = attention_saver(out / "attention") if cfg.save_attention and split.repeat == 0 else None
    test = evaluate(head, data, test_ids, device=device, on_output=saver)
    metrics = slide_metrics(y[split.test], test.probs)
    report = FoldReport(name, split.repeat, split.fold, result.best_epoch, result.epochs_run, result.monitor,
                        len(split.train), len(split.val), len(split.test), metrics, result.seconds)
    emit("fold_end", {**context, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, **metrics})
    rows = prediction_rows(labels, split, test.probs)
    return report, rows, result.history, (y[split.test], test.probs)


def feature_stats(data: MILData, slide_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and sd of the tissue patch embeddings of `slide_ids` (the fold's training slides)."""
    total = torch.zeros(data.in_dim, dtype=torch.float64)
    squares = torch.zeros(data.in_dim, dtype=torch.float64)
    count = 0
    for slide_id in slide_ids:
        bags = data.bags(slide_id, None, "cpu")
        x = bags.patches[bags.mask].double()
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    mean = total / max(count, 1)
    sd = (squares / max(count, 1) - mean * mean).clamp_min(0).sqrt()
    return mean.float(), sd.float()


# --- predict ---

def predict(run_dir: str | Path, store_path: str | Path, out_csv: str | Path, *,
            slides: Sequence[str] | None = None, folds: Sequence[str] | None = None, device: str = "auto",
            progress: Progress | None = None) -> list[dict[str, Any]]:
    """Average the class probabilities of every fold model (or of `folds`) over the slides of a store.

    Writes `out_csv` (slide_id, prob_<class>..., predicted) and returns its rows (probabilities as floats).
    A store whose identity (encoder, geometry, ...) differs from the run's is refused.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    store = FeatureStore.open(store_path)
    if run.get("end_to_end"):
        raise ConfigError(f"Run {run_dir} was trained end to end: its heads need their folds' own encoders; "
                          "predict with mrantool.training.pixels.e2e.predict_end_to_end (`mrantool predict` "
                          "chooses it by itself).")
    if run["store_identity"] is None:
        raise ConfigError(f"Run {run_dir} was trained on in-memory features, not a store; predict with its "
                          "fold models from load_fold_models instead.")
    diffs = identity_differences(run["store_identity"], store.identity)
    if diffs:
        raise StoreError(f"Store {store_path} holds features of another encoder or geometry than run "
                         f"{run_dir} ({'; '.join(diffs)}); predict on a store extracted like the run's "
                         "training store.")
    ids = slides_to_predict(store.slide_ids(), slides, store_path)
    store.require_whole(ids, "predict")
    out_csv = output_file(out_csv, "--out")
    settings = run["config"]
    dev = resolve_device(device)
    emit = progress or (lambda event, info: None)
    with torch_settings(settings.get("threads"), dev), torch.no_grad():
        models = load_fold_models(run_dir, folds, dev)
        data = StoreData(store, ids, cells=any(h.needs_cells for _, h, _ in models),
                         patch_min_tissue=settings["patch_min_tissue"], cache_gb=settings["cache_gb"])
        probs = np.zeros((len(ids), run["n_classes"]))
        emit("start", {"n_slides": len(ids), "n_models": len(models)})
        for i, slide_id in enumerate(ids):
            bags = data.bags(slide_id, None, dev)
            for _, head, _ in models:
                out = head(bags.patches, bags.cells if head.needs_cells else None, bags.mask)
                probs[i] += out.logits.float().softmax(-1).cpu().numpy() / len(models)
            emit("slide", {"index": i, "n_slides": len(ids), "slide_id": slide_id})
    return write_predictions(out_csv, ids, probs, run["classes"])
