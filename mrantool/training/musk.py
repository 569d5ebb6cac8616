"""Classical MIL sets (Musk1, Musk2, Elephant, ...) through the real import path, and Ilse et al. 2018's protocol.

`write_mil_h5` writes one h5 per bag of a classical set's CSV (a `features` dataset, no coordinates) plus
labels.csv; `reproduce_musk` imports those files into a store and cross-validates MIL heads on it with
`fit_data`, standardising features with each fold's training statistics (`FoldStandardised`), and summarises
the accuracy the way the paper reports it (mean and standard error over 5 runs of 10-fold CV).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mrantool.cohorts.classical import load_mil_csv
from mrantool.config import FitConfig
from mrantool.errors import MrantoolError
from mrantool.interop.importers import ImportReport, import_h5
from mrantool.store import FeatureStore
from mrantool.training.api import FitReport, fit_data
from mrantool.training.data import MILData, StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.splits import Split, make_splits

Progress = Callable[[str, dict[str, Any]], None]


def encoder_name(name: str, n_features: int) -> str:
    """The store identity's encoder for a classical set, e.g. `musk1-166`."""
    return f"{name}-{n_features}"


@dataclass
class MuskFiles:
    """The h5 files written for the bags and the labels.csv naming their slide ids."""

    h5: list[Path]
    labels: Path


def write_mil_h5(csv_path: str | Path, out_dir: str | Path, name: str | None = None) -> MuskFiles:
    """One `<bag name>.h5` per bag (`features` (n, d) float32, no coords) and `labels.csv`."""
    name = name or Path(csv_path).stem
    bags, labels, names = load_mil_csv(csv_path, name)
    encoder = encoder_name(name, bags[0].shape[1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for bag, bag_name in zip(bags, names, strict=True):
        path = out / f"{bag_name}.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("features", data=bag)
            h5.attrs["encoder"] = encoder
            h5.attrs["source"] = str(Path(csv_path).name)
        files.append(path)
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["slide_id", "label"])
        writer.writerows(zip(names, labels.tolist(), strict=True))
    return MuskFiles(files, labels_path)


class FoldStandardised(MILData):
    """Instances standardised with the mean and sd of the current fold's training instances.

    `fit_data` announces each fold with a `fold_start` event whose `index` indexes the splits that
    `make_splits` returns for the same settings; pass `on_event` as (part of) its progress callback. Test
    slides never contribute to the statistics, so nothing about them leaks into training.
    """

    fold_dependent = True  # each fold reads different numbers, so fit trains its folds one at a time

    def __init__(self, base: MILData, labels: Labels, splits: Sequence[Split]) -> None:
        self.base = base
        self.slide_ids = base.slide_ids
        self.in_dim = base.in_dim
        self.has_cells = self.cells = False
        self._ids = labels.slide_ids
        self._splits = list(splits)
        self.mean: np.ndarray | None = None
        self.sd: np.ndarray | None = None

    def on_event(self, event: str, info: dict[str, Any]) -> None:
        if event != "fold_start":
            return
        split = self._splits[info["index"]]
        if len(split.train) != info["n_train"] or split.fold != info["fold"]:
            raise MrantoolError("FoldStandardised got splits that differ from fit's; build them with "
                                "make_splits and the FitConfig's folds, repeats, val_fraction and seed.")
        self.fit([self._ids[i] for i in split.train])

    def fit(self, slide_ids: Sequence[str]) -> None:
        """Mean and sd (floored at 1e-6) of the valid instances of `slide_ids`."""
        rows = []
        for slide_id in slide_ids:
            patches, _ = self.base.read(slide_id, np.arange(self.base.n_bags(slide_id)))
            rows.append(patches[self.base.mask(slide_id)])
        x = np.concatenate(rows).astype(np.float64)
        self.mean = x.mean(0).astype(np.float32)
        self.sd = np.maximum(x.std(0), 1e-6).astype(np.float32)

    def n_bags(self, slide_id: str) -> int:
        return self.base.n_bags(slide_id)

    def mask(self, slide_id: str) -> np.ndarray:
        return self.base.mask(slide_id)

    def in_ram(self) -> bool:
        return self.base.in_ram()

    def read(self, slide_id: str, index: np.ndarray, cells: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if self.mean is None or self.sd is None:
            raise MrantoolError("FoldStandardised has no statistics yet; call fit() or pass on_event to fit_data.")
        patches, _ = self.base.read(slide_id, index)
        return (patches - self.mean) / self.sd, None


@dataclass
class MuskProtocol:
    """Ilse et al. 2018 on the classical MIL sets: 5 runs of 10-fold CV, Adam(lr 5e-4, betas 0.9/0.999), no
    class weights, every instance of a bag in every step.

    Model selection uses only training bags: `val_fraction` of each fold's training bags (stratified) pick
    the epoch with the lowest validation loss (EMA-smoothed with `smoothing`; `patience` epochs without
    improvement stop a fold early, after at most `epochs`); the test fold is never looked at. Head options:
    the paper's MIL-benchmark network (docs/import.md).
    """

    repeats: int = 5
    folds: int = 10
    epochs: int = 100
    lr: float = 5e-4
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    patience: int = 10
    smoothing: float = 0.0
    seed: int = 0
    threads: int = 1
    standardise: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "abmil": {"hidden": 64, "attn_dim": 64}, "gated-abmil": {"hidden": 64, "attn_dim": 64}})

    def fit_config(self, model: str, store: Path, labels: Path, out: Path) -> FitConfig:
        return FitConfig(store=str(store), labels=str(labels), out=str(out), model=model,
                         options=self.options.get(model, {}), folds=self.folds, repeats=self.repeats,
                         val_fraction=self.val_fraction, seed=self.seed, epochs=self.epochs, lr=self.lr,
                         patience=self.patience, smoothing=self.smoothing, max_bags=100_000,
                         weight_decay=self.weight_decay, optimizer="adam", class_weights=False,
                         bag_mining=False, device="cpu", threads=self.threads, save_attention=False)


@dataclass
class MuskResult:
    """Accuracy of one head: per fold, per run (pooled over its 10 folds) and the summaries."""

    model: str
    options: dict[str, Any]
    fold_accuracy: list[float]
    run_accuracy: list[float]
    mean: float  # mean of the fold accuracies
    se_folds: float  # per run: sd of its fold accuracies / sqrt(folds); averaged over runs
    se_runs: float  # sd of the run accuracies / sqrt(runs)
    sd_folds: float
    seconds: float
    run_dir: str


def _se(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def summarise(model: str, options: dict[str, Any], report: FitReport, n_test: dict[tuple[int, int], int],
              seconds: float) -> MuskResult:
    """Fold, run and summary accuracies from a finished fit report."""
    folds = report.folds
    acc = [f.metrics["accuracy"] for f in folds]
    runs = sorted({f.repeat for f in folds})
    run_acc, run_se = [], []
    for r in runs:
        part = [f for f in folds if f.repeat == r]
        correct = sum(f.metrics["accuracy"] * n_test[(r, f.fold)] for f in part)
        run_acc.append(correct / sum(n_test[(r, f.fold)] for f in part))
        run_se.append(_se([f.metrics["accuracy"] for f in part]))
    return MuskResult(model, options, acc, run_acc, float(np.mean(acc)), float(np.mean(run_se)), _se(run_acc),
                      float(np.std(acc, ddof=1)), seconds, str(report.out))


def reproduce_musk(csv_path: str | Path, work_dir: str | Path, *, models: Sequence[str] = ("abmil", "gated-abmil"),
                   protocol: MuskProtocol | None = None, name: str | None = None,
                   progress: Progress | None = None) -> tuple[ImportReport, list[MuskResult]]:
    """A classical set's CSV -> h5 files -> `import_h5` -> store -> `fit_data` per head; runs go to
    `work_dir/runs/<model>`. `name` (default: the CSV's stem) names the bags and the store."""
    protocol = protocol or MuskProtocol()
    emit = progress or (lambda event, info: None)
    work = Path(work_dir)
    name = name or Path(csv_path).stem
    files = write_mil_h5(csv_path, work / "h5", name)
    store_path = work / f"{name}.zarr"
    imported = import_h5(files.h5, store_path, bag_grid=4)
    if imported.failed:
        raise MrantoolError(f"Importing the Musk h5 files into {store_path} failed: {imported.failed[0].message}")
    store = FeatureStore.open(store_path)
    labels = read_labels(files.labels, store.slide_ids())
    results = []
    for model in models:
        started = time.perf_counter()
        cfg = protocol.fit_config(model, store_path, files.labels, work / "runs" / model)
        data: MILData = StoreData(store, labels.slide_ids, cells=False, patch_min_tissue=cfg.patch_min_tissue,
                                  cache_gb=cfg.cache_gb)
        splits = make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
        hook = emit
        if protocol.standardise:
            scaled = FoldStandardised(data, labels, splits)
            data, hook = scaled, _chain(scaled.on_event, emit)
        report = fit_data(cfg, data, labels, identity=store.identity, progress=hook)
        n_test = {(s.repeat, s.fold): len(s.test) for s in splits}
        result = summarise(model, cfg.options, report, n_test, time.perf_counter() - started)
        emit("musk_result", asdict(result))
        results.append(result)
    return imported, results


def _chain(*callbacks: Progress) -> Progress:
    def call(event: str, info: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(event, info)

    return call
