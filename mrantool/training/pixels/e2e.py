"""End-to-end training: a patch encoder and any MIL head trained together from bag pixels, per fold.

The store supplies the cohort's geometry, bag coordinates, tissue fractions and slide files (provenance), and
the encoder architecture with its input size and normalisation; its cached features are not used. Pixels are
read once into RAM (`PixelData`). Each fold trains a `PixelMIL` (encoder + head) with the cached fit's loop,
splits, early stopping, metrics and run folder, and also saves that fold's encoder. Validation and test slides
are encoded by the fold's own encoder in eval mode. See docs/end-to-end.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.encoders.registry import PatchEncoder, create_encoder
from mrantool.errors import ConfigError, StoreError
from mrantool.files import output_file
from mrantool.models.base import MILOutput
from mrantool.models.registry import create_head
from mrantool.store import FeatureStore
from mrantool.tiling.presets import Preset
from mrantool.training.data import tissue_mask
from mrantool.training.labels import Labels, read_labels
from mrantool.training.loop import Progress, evaluate, resolve_device, seed_everything, torch_settings, train_fold
from mrantool.training.metrics import slide_metrics
from mrantool.training.pixels.checkpoint import copy_atomic, label_slides, load_encoder, save_encoder
from mrantool.training.pixels.model import PixelMIL
from mrantool.training.pixels.source import BagPixels, PixelData, transform_preset
from mrantool.training.runs import (
    LEVELS,
    FitReport,
    FoldReport,
    attention_saver,
    check_config,
    finish_run,
    fold_names,
    load_checkpoint,
    prediction_rows,
    read_json,
    read_run,
    refuse_finished,
    resolved_options,
    run_notes,
    save_checkpoint,
    slides_to_predict,
    splits_json,
    start_run,
    write_json,
    write_predictions,
)
from mrantool.training.splits import Split, derive_seed, make_splits

EVALUATION = "validation and test slides encoded by the fold's own encoder in eval mode (BatchNorm running statistics)"
RESUME_IGNORED = ("out", "threads", "device", "pixel_cache_gb")  # may change when a run is resumed
Attention = dict[str, dict[str, dict[str, np.ndarray]]]  # fold name -> slide id -> level -> weights


@dataclass
class EndToEndReport(FitReport):
    """`FitReport` of an end-to-end run; with `keep_attention`, `attention[fold][slide_id][level]` holds the test
    slides' attention ("bag" (n_bags,), "patch" (n_bags, P), "cell" (n_bags, P, C) where the head has them)."""

    attention: Attention = field(default_factory=dict)


def is_end_to_end_run(run_dir: str | Path) -> bool:
    """Whether a run folder holds an end-to-end run (its config.json says so)."""
    path = Path(run_dir) / "config.json"
    return path.is_file() and bool(read_json(path).get("end_to_end"))


def fit_end_to_end(cfg: FitConfig, *, splits: Sequence[Split] | None = None, keep_attention: bool = False,
                   progress: Progress | None = None) -> EndToEndReport:
    """Cross-validate the store's encoder architecture + `cfg.model` trained from pixels; write the run to `cfg.out`.

    `splits`: explicit folds (e.g. `runs.read_splits(cached_run, labels)` for the folds of a cached fit; the same
    labels, folds, repeats, val_fraction and seed give them too). An unfinished run in `cfg.out` with the same
    settings and folds is resumed: finished folds are kept, the others are trained (each fold is seeded on its own,
    so the result equals an uninterrupted run).
    """
    started = time.perf_counter()
    check_config(cfg)
    if not cfg.end_to_end:
        raise ConfigError("fit_end_to_end needs end_to_end = true in the settings (or `mrantool fit --end-to-end`).")
    emit = progress or (lambda event, info: None)
    store = FeatureStore.open(cfg.store)
    identity = store.identity
    if "preset" not in identity or "transforms" not in identity:
        raise ConfigError(f"Store {cfg.store} holds imported features, with no slide files or encoder to train; "
                          "extract the slides with `mrantool extract` first.")
    labels = read_labels(cfg.labels, store.slide_ids(), id_column=cfg.id_column, label_column=cfg.label_column)
    store.require_whole(labels.slide_ids, "fit")
    preset = transform_preset(identity)
    create_head(cfg.model, store.dims.dim, labels.n_classes, **cfg.options)  # options checked before any reading
    device = resolve_device(cfg.device)
    splits = list(splits) if splits is not None else make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction,
                                                                 cfg.seed)
    names = fold_names(splits)
    out = Path(cfg.out)
    refuse_finished(out)
    notes = run_notes(labels, splits)
    done = _finished_folds(out, cfg, labels, splits)
    data = PixelData(store, labels.slide_ids, preset.geometry, patch_min_tissue=cfg.patch_min_tissue,
                     budget_gb=cfg.pixel_cache_gb, progress=emit)  # before anything is written to `out`
    if done is None:
        start_run(out, cfg, labels, splits, in_dim=store.dims.dim, identity=identity, device=device, notes=notes,
                  extra={"end_to_end": _describe(cfg, identity)})
        done = set()
    elif done:
        notes.append(f"Resuming {out}: {len(done)} of {len(splits)} folds were finished and are kept.")
    for note in notes:
        emit("note", {"message": note})
    emit("start", {"n_slides": len(labels), "n_folds": len(splits), "epochs": cfg.epochs, "classes": labels.classes,
                   "device": str(device), "out": str(out)})
    reports, predictions, histories, rocs, attention = [], [], {}, {}, {}
    with torch_settings(cfg.threads, device):
        for index, (name, split) in enumerate(zip(names, splits, strict=True)):
            fold = _Fold(cfg, data, labels, split, name, index, len(splits), preset, identity, device, emit)
            outcome = fold.load(keep_attention) if name in done else fold.run(keep_attention)
            reports.append(outcome.report)
            predictions += outcome.rows
            histories[name], rocs[name] = outcome.history, (outcome.y, outcome.probs)
            attention[name] = outcome.attention
    report = finish_run(cfg, out, labels, reports, predictions, histories, rocs, notes, started, emit)
    return EndToEndReport(**vars(report), attention=attention if keep_attention else {})


def _describe(cfg: FitConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """config.json's end_to_end block: encoder, where it starts, how it trains and is evaluated."""
    start = ("random-init" if cfg.weights is None and cfg.encoder_from is None else
             f"weights:{Path(cfg.weights).resolve()}" if cfg.weights else f"run:{Path(cfg.encoder_from).resolve()}")
    return {"encoder": identity["encoder"], "preset": identity["preset"], "start": start, "trainable": "all",
            "encoder_lr": cfg.lr if cfg.encoder_lr is None else cfg.encoder_lr, "augment": cfg.augment,
            "color_jitter": cfg.color_jitter, "batchnorm": cfg.batchnorm, "evaluation": EVALUATION}


def _finished_folds(out: Path, cfg: FitConfig, labels: Labels, splits: Sequence[Split]) -> set[str] | None:
    """Names of the finished folds of an unfinished run in `out` with these settings; None for a fresh folder."""
    if not (out / "config.json").is_file():
        return None
    previous = read_json(out / "config.json")
    old = {k: v for k, v in previous.get("config", {}).items() if k not in RESUME_IGNORED}
    new = {k: v for k, v in cfg.model_dump().items() if k not in RESUME_IGNORED}
    changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
    same_splits = (out / "splits.json").is_file() and read_json(out / "splits.json") == splits_json(labels, splits)
    if not previous.get("end_to_end") or changed or not same_splits:
        why = f"settings {', '.join(changed[:4])} differ" if changed else "other folds" if previous.get(
            "end_to_end") else "it is not an end-to-end run"
        raise ConfigError(f"{out} holds an unfinished run that cannot be resumed ({why}); choose a new --out, or "
                          "delete that folder to start over.")
    return {name for name in fold_names(splits) if (out / name / "result.json").is_file()}


@dataclass
class _Outcome:
    report: FoldReport
    rows: list[dict[str, Any]]
    history: list[dict[str, float]]
    y: np.ndarray
    probs: np.ndarray
    attention: dict[str, dict[str, np.ndarray]]


@dataclass
class _Fold:
    """One fold of an end-to-end run: train, save and test it, or load it back when an earlier call finished it."""

    cfg: FitConfig
    data: PixelData
    labels: Labels
    split: Split
    name: str
    index: int
    n_folds: int
    preset: Preset
    identity: dict[str, Any]
    device: torch.device
    emit: Progress

    @property
    def folder(self) -> Path:
        return Path(self.cfg.out) / self.name

    def ids(self, part: str) -> list[str]:
        return [self.labels.slide_ids[i] for i in getattr(self.split, part)]

    def run(self, keep_attention: bool) -> _Outcome:
        cfg, split, y = self.cfg, self.split, self.labels.y
        context = {"name": self.name, "repeat": split.repeat, "fold": split.fold, "index": self.index,
                   "n_folds": self.n_folds}
        self.emit("fold_start", {**context, "n_train": len(split.train), "n_val": len(split.val),
                                 "n_test": len(split.test)})
        seed = derive_seed(cfg.seed, split.repeat, split.fold, 2)
        seed_everything(seed)
        encoder, start = self._start_encoder()
        head = create_head(cfg.model, encoder.embed_dim, self.labels.n_classes, **cfg.options)
        model = PixelMIL(encoder, head, self.preset, augment=cfg.augment, color_jitter=cfg.color_jitter,
                         batchnorm=cfg.batchnorm).to(self.device)
        result = train_fold(model, self.data, self.ids("train"), y[split.train], self.ids("val"), y[split.val], cfg,
                            seed=seed, device=self.device, progress=self.emit, context=context,
                            params=model.param_groups(cfg.lr, cfg.encoder_lr))
        model.load_state_dict(result.state)
        save_checkpoint(self.folder, model.head, {
            "model": cfg.model, "options": resolved_options(cfg.model, cfg.options), "in_dim": encoder.embed_dim,
            "n_classes": self.labels.n_classes, "classes": self.labels.classes, "repeat": split.repeat,
            "fold": split.fold, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "monitor": result.monitor, "standardize": False, "end_to_end": True, "mrantool_version": __version__})
        save_encoder(self.folder, model.encoder, self.identity, {
            "trainable": "all", "start": start, "run": str(Path(cfg.out).resolve()), "fold": self.name,
            "best_epoch": result.best_epoch, "label_slides": label_slides(self.data.store, [
                *self.ids("train"), *self.ids("val")])})
        if self.index == 0:
            for suffix in ("safetensors", "json"):
                copy_atomic(self.folder / f"encoder.{suffix}", Path(cfg.out) / f"encoder.{suffix}")
        attention: dict[str, dict[str, np.ndarray]] = {}
        save = attention_saver(Path(cfg.out) / "attention") if cfg.save_attention and split.repeat == 0 else None

        def on_output(slide_id: str, out: MILOutput) -> None:
            if save is not None:
                save(slide_id, out)
            if keep_attention:
                attention[slide_id] = {k: out.attention[k].float().cpu().numpy() for k in LEVELS if k in out.attention}

        test = evaluate(model, self.data, self.ids("test"), device=self.device, on_output=on_output)
        metrics = slide_metrics(y[split.test], test.probs)
        report = FoldReport(self.name, split.repeat, split.fold, result.best_epoch, result.epochs_run,
                            result.monitor, len(split.train), len(split.val), len(split.test), metrics, result.seconds)
        self.emit("fold_end", {**context, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                               **metrics})
        outcome = _Outcome(report, prediction_rows(self.labels, split, test.probs), result.history, y[split.test],
                           test.probs, attention)
        write_json(self.folder / "result.json", {  # written last: its presence marks the fold finished
            "report": asdict(report), "rows": outcome.rows, "history": outcome.history,
            "y": outcome.y.tolist(), "probs": outcome.probs.tolist()})
        return outcome

    def load(self, keep_attention: bool) -> _Outcome:
        """A fold finished by an earlier call (result.json); its attention from attention/ when asked for."""
        saved = read_json(self.folder / "result.json")
        report = FoldReport(**{k: _nan(v) for k, v in saved["report"].items()})
        report.metrics = {k: _nan(v) for k, v in report.metrics.items()}
        history = [{k: _nan(v) for k, v in row.items()} for row in saved["history"]]
        attention = {}
        if keep_attention:
            for slide_id in self.ids("test"):
                path = Path(self.cfg.out) / "attention" / f"{slide_id}.npz"
                if path.is_file():
                    with np.load(path) as npz:
                        attention[slide_id] = {k: npz[k] for k in npz.files}
        self.emit("fold_end", {"name": self.name, "repeat": self.split.repeat, "fold": self.split.fold,
                               "index": self.index, "n_folds": self.n_folds, "best_epoch": report.best_epoch,
                               "epochs_run": report.epochs_run, **report.metrics})
        return _Outcome(report, saved["rows"], history, np.asarray(saved["y"], dtype=np.int64),
                        np.asarray(saved["probs"], dtype=np.float64), attention)

    def _start_encoder(self) -> tuple[PatchEncoder, str]:
        """The fold's starting encoder and a description: random init (seeded, as the registry defines it), a
        weights file, or this fold's encoder of another run, which must not have seen this fold's test slides."""
        cfg = self.cfg
        if cfg.encoder_from is None:
            encoder = create_encoder(self.preset, weights=cfg.weights, arch=self.identity["encoder"])
            return encoder.train(), encoder.identity()["weights"]
        run = Path(cfg.encoder_from)
        folder = run / self.name
        if not (folder / "encoder.safetensors").is_file():
            raise ConfigError(f"Run {run} has no encoder for fold {self.name}; pass a run trained on the same folds "
                              "(same labels, folds and seed), or --weights FILE for one encoder for every fold.")
        seen = _training_slides(run, self.name)
        leaked = sorted(set(seen) & set(self.ids("test")))
        if leaked:
            raise ConfigError(f"The encoder of {folder} was trained on {len(leaked)} slide(s) that are test slides of "
                              f"{self.name} here ({', '.join(leaked[:3])}); start from a run with the same folds.")
        encoder = load_encoder(folder)
        mine = (self.identity["encoder"], self.preset.input_px, self.preset.geometry.cells)
        theirs = (encoder.identity()["arch"], encoder.input_px, encoder.cells)
        if theirs != mine:
            raise ConfigError(f"The encoder of {folder} (arch, input px, cells {theirs}) does not match this store's "
                              f"{mine}; start from a run trained on a store extracted like this one.")
        return encoder.train(), f"run:{folder.resolve()}"


def _training_slides(run: Path, fold: str) -> list[str]:
    """The slides a run's fold trained on (train + validation), from its splits.json or its init run's."""
    for candidate in (run, Path(str(read_json(run / "config.json").get("init_run") or run))):
        path = candidate / "splits.json"
        if path.is_file():
            for entry in read_json(path):
                if entry["name"] == fold:
                    return [*entry["train"], *entry["val"]]
    raise ConfigError(f"Run {run} does not record which slides fold {fold} trained on (no splits.json); pass its "
                      "encoder with --weights FILE only if it never saw these slides.")


def _nan(value: Any) -> Any:
    return math.nan if value is None else value


# --- predict ---

def load_end_to_end_models(run_dir: str | Path, folds: Sequence[str] | None = None,
                           device: torch.device | str = "cpu") -> list[tuple[str, PixelMIL]]:
    """(fold name, encoder + head in eval mode) of every fold of an end-to-end run, or of the named `folds`."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if not run.get("end_to_end"):
        raise ConfigError(f"Run {run_dir} was trained on cached features; use mrantool.training.api.predict.")
    names = run["folds"] if folds is None else list(folds)
    unknown = [f for f in names if f not in run["folds"]]
    if unknown:
        raise ConfigError(f"Run {run_dir} has no fold(s) {', '.join(unknown)}; choose from {', '.join(run['folds'])}.")
    preset = transform_preset(run["store_identity"])
    models = []
    for name in names:
        head, _ = load_checkpoint(run_dir / name)
        models.append((name, PixelMIL(load_encoder(run_dir / name), head, preset).to(device).eval()))
    return models


def predict_end_to_end(run_dir: str | Path, store_path: str | Path, out_csv: str | Path, *,
                       slides: Sequence[str] | None = None, folds: Sequence[str] | None = None, device: str = "auto",
                       progress: Progress | None = None) -> list[dict[str, Any]]:
    """`predict` for an end-to-end run: each slide's bags are read from its file (at the run's geometry, with the
    store's coordinates and tissue) and encoded by each fold's encoder; the fold models' probabilities are
    averaged. Any store extracted with the run's geometry works, whatever encoder filled it."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    store = FeatureStore.open(store_path)
    want, have = run["store_identity"]["geometry"], store.identity.get("geometry")
    if want != have:
        raise StoreError(f"Store {store_path} was cut with geometry {have}, run {run_dir} with {want}; extract the "
                         "slides with the run's preset and geometry.")
    ids = slides_to_predict(store.slide_ids(), slides, store_path)
    store.require_whole(ids, "predict")
    out_csv = output_file(out_csv, "--out")
    settings = run["config"]
    dev = resolve_device(device)
    emit = progress or (lambda event, info: None)
    probs = np.zeros((len(ids), run["n_classes"]))
    with torch_settings(settings.get("threads"), dev), torch.no_grad():
        models = load_end_to_end_models(run_dir, folds, dev)
        emit("start", {"n_slides": len(ids), "n_models": len(models)})
        reader = BagPixels(store, transform_preset(run["store_identity"]).geometry)
        try:
            for i, slide_id in enumerate(ids):
                pixels, mask = _slide_pixels(reader, store, slide_id, settings["patch_min_tissue"], dev)
                for _, model in models:
                    probs[i] += model(pixels, None, mask).logits.float().softmax(-1).cpu().numpy() / len(models)
                emit("slide", {"index": i, "n_slides": len(ids), "slide_id": slide_id})
        finally:
            reader.close()
    return write_predictions(out_csv, ids, probs, run["classes"])


def _slide_pixels(reader: BagPixels, store: FeatureStore, slide_id: str, patch_min_tissue: float,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every bag of a slide as (n_bags, P, h, w, 3) uint8 and its tissue mask, on `device`."""
    features = store.slide(slide_id)
    patches = reader.read(slide_id, np.arange(features.n_bags))
    pixels = torch.from_numpy(patches.reshape(features.n_bags, -1, *patches.shape[1:])).to(device)
    mask = torch.from_numpy(tissue_mask(features.patch_tissue[:], patch_min_tissue)).to(device)
    return pixels, mask

