"""`fit` (cross-validated training of a MIL head on a store, written to a run folder) and `predict`.

Run folder (see docs/fit.md): config.json, splits.json, metrics.json, predictions.csv, curves.png,
roc.png, fold_<k>/ (or repeat_<r>/fold_<k>/) with model.safetensors + head.json, attention/<slide_id>.npz.
No pickle anywhere: weights are safetensors, everything else JSON, CSV, npz (no object arrays) or PNG.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.errors import ConfigError, StoreError
from mrantool.files import atomic_path, atomic_write, output_file, output_folder
from mrantool.models.base import MILHead, MILOutput
from mrantool.models.registry import create_head, head_options
from mrantool.models.standardize import Standardized
from mrantool.store import FeatureStore
from mrantool.store.schema import identity_differences
from mrantool.training.data import MILData, StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.loop import (
    MONITORS,
    OPTIMIZERS,
    SCHEDULES,
    FoldResult,
    Member,
    Progress,
    evaluate,
    group_settings,
    resolve_device,
    seed_everything,
    torch_settings,
    train_members,
)
from mrantool.training.metrics import METRICS, folds_used, mean_sd, slide_metrics
from mrantool.training.plots import plot_curves, plot_roc
from mrantool.training.splits import Split, derive_seed, make_splits

LEVELS = ("bag", "patch", "cell")


@dataclass
class FoldReport:
    """One trained fold: where it sits, its best epoch (1-based), split sizes and test metrics."""

    name: str
    repeat: int
    fold: int
    best_epoch: int
    epochs_run: int
    monitor: str
    n_train: int
    n_val: int
    n_test: int
    metrics: dict[str, float]
    seconds: float = 0.0


@dataclass
class FitReport:
    """What `fit` did: per-fold and summary metrics (NaN where undefined), notes, and the run folder."""

    out: Path
    model: str
    classes: list[str]
    folds: list[FoldReport]
    mean: dict[str, float]
    sd: dict[str, float]
    pooled: dict[str, float]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    n_used: dict[str, int] = field(default_factory=dict)  # folds with a defined value of each metric

    def table(self) -> list[dict[str, str]]:
        """Rows of strings for a rich table: one per fold, then 'mean ± sd' (with 'n of k folds' where a fold's
        value is undefined) and 'pooled'."""
        def fmt(value: float) -> str:
            return "nan" if math.isnan(value) else f"{value:.3f}"

        def used(name: str) -> str:
            n = self.n_used.get(name, len(self.folds))
            return "" if n == len(self.folds) else f" ({n} of {len(self.folds)} folds)"

        rows = [{"fold": f.name, "best epoch": f"{f.best_epoch}/{f.epochs_run}", "test slides": str(f.n_test),
                 **{name: fmt(f.metrics[name]) for name in METRICS}} for f in self.folds]
        rows.append({"fold": "mean ± sd", "best epoch": "", "test slides": "",
                     **{name: f"{fmt(self.mean[name])} ± {fmt(self.sd[name])}{used(name)}" for name in METRICS}})
        n_test = str(sum(f.n_test for f in self.folds))
        rows.append({"fold": "pooled", "best epoch": "", "test slides": n_test,
                     **{name: fmt(self.pooled[name]) for name in METRICS}})
        return rows


# --- small file helpers ---

def _plain(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars and paths -> python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(_plain(value), indent=1, allow_nan=False) + "\n")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def _prob(value: float) -> str:
    return f"{value:.9g}"


# --- checkpoints ---

def save_checkpoint(folder: Path, head: MILHead, meta: dict[str, Any]) -> None:
    """`folder/model.safetensors` (weights) and `folder/head.json` (how to rebuild the head)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"})
    _write_json(folder / "head.json", meta)


def load_checkpoint(folder: Path, device: torch.device | str = "cpu") -> tuple[MILHead, dict[str, Any]]:
    """The head saved in `folder` (eval mode, on `device`) and its head.json."""
    files = [folder / "head.json", folder / "model.safetensors"]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"Fold folder {folder} lacks {', '.join(missing)}; pass a run folder written "
                          "completely by `mrantool fit` (re-run fit if it was interrupted).")
    meta = json.loads(files[0].read_text())
    head = create_head(meta["model"], meta["in_dim"], meta["n_classes"], **meta["options"])
    if meta.get("standardize"):
        head = Standardized(head, meta["in_dim"])
    head.load_state_dict(load_file(str(files[1])))
    return head.to(device).eval(), meta


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """config.json of a finished run (one with metrics.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a fit run (no config.json); pass the --out folder of "
                          "`mrantool fit`.")
    if not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"Run {run_dir} did not finish (no metrics.json); re-run `mrantool fit` into a new "
                          "--out.")
    return json.loads((run_dir / "config.json").read_text())


def load_fold_models(run_dir: str | Path, folds: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> list[tuple[str, MILHead, dict[str, Any]]]:
    """(fold name, head, head.json) of every fold of a run, or of the named `folds` (e.g. "fold_0")."""
    run_dir = Path(run_dir)
    names = read_run(run_dir)["folds"]
    if folds is not None:
        unknown = [f for f in folds if f not in names]
        if unknown:
            raise ConfigError(f"Run {run_dir} has no fold(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(names)}.")
        names = list(folds)
    return [(name, *load_checkpoint(run_dir / name, device)) for name in names]


# --- fit ---

def check_config(cfg: FitConfig) -> None:
    """One ConfigError listing every out-of-range fit setting."""
    rules = [
        (cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} (use {', '.join(OPTIMIZERS)})"),
        (cfg.monitor in MONITORS, f"monitor {cfg.monitor!r} (use {' or '.join(MONITORS)})"),
        (0 <= cfg.smoothing < 1, f"smoothing {cfg.smoothing} (use 0 <= smoothing < 1)"),
        (cfg.lr_schedule in SCHEDULES, f"lr_schedule {cfg.lr_schedule!r} (use {' or '.join(SCHEDULES)})"),
        (cfg.folds >= 2, f"folds {cfg.folds} (use 2 or more)"),
        (cfg.repeats >= 1, f"repeats {cfg.repeats} (use 1 or more)"),
        (0 <= cfg.val_fraction < 1, f"val_fraction {cfg.val_fraction} (use 0 <= val_fraction < 1)"),
        (cfg.epochs >= 1, f"epochs {cfg.epochs} (use 1 or more)"),
        (0 < cfg.lr < math.inf, f"lr {cfg.lr} (use a positive, finite learning rate)"),
        (0 <= cfg.weight_decay < math.inf, f"weight_decay {cfg.weight_decay} (use a finite value >= 0)"),
        (0 <= cfg.momentum < math.inf, f"momentum {cfg.momentum} (use a finite value >= 0)"),
        (cfg.seed >= 0, f"seed {cfg.seed} (use 0 or more)"),
        (cfg.patience >= 1, f"patience {cfg.patience} (use 1 or more)"),
        (cfg.min_epochs >= 0, f"min_epochs {cfg.min_epochs} (use 0 or more)"),
        (cfg.max_bags >= 1, f"max_bags {cfg.max_bags} (use 1 or more)"),
        (cfg.batch_size >= 1, f"batch_size {cfg.batch_size} (use 1 or more)"),
        (cfg.parallel_folds >= 0, f"parallel_folds {cfg.parallel_folds} (use 0 for all, or 1 or more)"),
        (0 <= cfg.patch_min_tissue <= 1, f"patch_min_tissue {cfg.patch_min_tissue} (use 0..1)"),
        (0 <= cfg.cache_gb < math.inf, f"cache_gb {cfg.cache_gb} (use a finite value >= 0)"),
        (cfg.threads is None or cfg.threads >= 1, f"threads {cfg.threads} (use 1 or more)"),
    ]
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError(f"Invalid fit settings: {'; '.join(problems)}; fix them in the config file or the "
                          "flags.")


def resolved_options(model: str, options: dict[str, Any]) -> dict[str, Any]:
    """The head's options with defaults filled in (what config.json and head.json record)."""
    defaults = {k: d for k, (_, d) in head_options(model).items() if d is not inspect.Parameter.empty}
    return {**defaults, **options}


def fit(cfg: FitConfig, progress: Progress | None = None) -> FitReport:
    """Cross-validate `cfg.model` on the labelled slides of `cfg.store`; write the run to `cfg.out`."""
    check_config(cfg)
    store = FeatureStore.open(cfg.store)
    labels = read_labels(cfg.labels, store.slide_ids(), id_column=cfg.id_column, label_column=cfg.label_column)
    store.require_whole(labels.slide_ids, "fit")
    leaked = [sid for sid in labels.slide_ids
              if store.provenance(sid).get("labels_seen_by_encoder")]
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
    return fit_many([cfg], data, labels, identity=identity, progress=progress)[0]


@dataclass
class _Run:
    """One fit run in progress: its settings, folder, splits and what its folds produced so far."""

    cfg: FitConfig
    options: dict[str, Any]
    device: torch.device
    splits: list[Split]
    names: list[str]
    notes: list[str]
    started: float
    reports: list[FoldReport] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def fit_many(cfgs: Sequence[FitConfig], data: MILData, labels: Labels, *, identity: dict[str, Any] | None = None,
             progress: Progress | None = None) -> list[FitReport]:
    """`fit_data` for several runs on the same data (e.g. sweep variants), each into its own `out`.

    Folds of runs that share a head, its options and the group settings train together as members of one
    group (`parallel_folds` at most; one at a time for `fold_dependent` data); each fold's result is the
    same, within noise, as training it alone.
    """
    emit = progress or (lambda event, info: None)
    runs = [_start_run(cfg, data, labels, identity, emit) for cfg in cfgs]
    folds = [(run, index) for run in runs for index in range(len(run.splits))]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for group in _fold_groups(folds, data):
        run0 = group[0][0]
        with torch_settings(run0.cfg.threads, run0.device):
            members = [_member(run, index, data, labels, moments, emit) for run, index in group]
            results = train_members(members, data, device=run0.device, progress=emit)
            for (run, index), member, result in zip(group, members, results, strict=True):
                _end_fold(run, index, member, result, data, labels, emit)
    return [_finish(run.cfg, Path(run.cfg.out), labels, run.reports, run.predictions, run.histories, run.rocs,
                    run.notes, run.started, emit) for run in runs]


def _start_run(cfg: FitConfig, data: MILData, labels: Labels, identity: dict[str, Any] | None,
               emit: Progress) -> _Run:
    """Validate a run, write its config.json and splits.json, announce it."""
    started = time.perf_counter()
    check_config(cfg)
    out = Path(cfg.out)
    if (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a finished fit run; choose a new --out or delete that "
                          "folder.")
    options = resolved_options(cfg.model, cfg.options)
    k = labels.n_classes
    probe = create_head(cfg.model, data.in_dim, k, **cfg.options)
    data.check_head(probe)
    device = resolve_device(cfg.device)
    splits = make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
    repeats = max(s.repeat for s in splits) + 1
    notes = list(labels.notes) + data.notes()
    if labels.folds is not None:
        notes.append(f"Using the fold column of {labels.source} ({len(splits)} folds); folds and repeats "
                     "are ignored.")
    one_class = [s.name(repeats) for s in splits if len(set(labels.y[s.test].tolist())) < 2]
    if one_class:
        notes.append(f"The test slides of {', '.join(one_class)} all have one class, so AUC is undefined there; "
                     f"mean AUC is over the other {len(splits) - len(one_class)} of {len(splits)} folds.")
    if not probe.batched and cfg.batch_size > 1:
        notes.append(f"Head {cfg.model} does not take padded batches of slides yet, so it trains one slide per "
                     f"step and one fold at a time; batch_size {cfg.batch_size} is ignored.")
    for note in notes:
        emit("note", {"message": note})
    output_folder(out, "--out")
    names = [s.name(repeats) for s in splits]
    _write_json(out / "config.json", {
        "mrantool_version": __version__, "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.model_dump(),
        "model": cfg.model, "head_options": options, "in_dim": data.in_dim, "n_classes": k,
        "classes": labels.classes, "class_counts": labels.counts(), "store_identity": identity,
        "labels_file": labels.source, "n_slides": len(labels), "folds": names, "repeats": repeats,
        "device": str(device), "notes": notes})
    ids = labels.slide_ids
    _write_json(out / "splits.json", [
        {"name": n, "repeat": s.repeat, "fold": s.fold, **{part: [ids[i] for i in getattr(s, part)]
                                                           for part in ("train", "val", "test")}}
        for n, s in zip(names, splits, strict=True)])
    emit("start", {"n_slides": len(labels), "n_folds": len(splits), "epochs": cfg.epochs,
                   "classes": labels.classes, "device": str(device), "out": str(out)})
    return _Run(cfg, options, device, splits, names, notes, started)


def _fold_groups(folds: list[tuple[_Run, int]], data: MILData) -> list[list[tuple[_Run, int]]]:
    """Folds in groups that train together: same head, options and group settings, at most `parallel_folds`."""
    groups: dict[str, list[list[tuple[_Run, int]]]] = {}
    for run, index in folds:
        cfg = run.cfg
        key = train_together_key(cfg)
        limit = 1 if data.fold_dependent else cfg.parallel_folds or len(folds)
        chunks = groups.setdefault(key, [[]])
        if len(chunks[-1]) >= limit:
            chunks.append([])
        chunks[-1].append((run, index))
    return [chunk for chunks in groups.values() for chunk in chunks]


def train_together_key(cfg: FitConfig) -> str:
    """Runs on the same data whose folds can train as members of one group have the same key."""
    return json.dumps([cfg.model, resolved_options(cfg.model, cfg.options), cfg.standardize, group_settings(cfg),
                       cfg.device, cfg.threads], sort_keys=True, default=str)


def _member(run: _Run, index: int, data: MILData, labels: Labels,
            moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]], emit: Progress) -> Member:
    """Announce a fold and build its seeded head (standardised with its training slides' statistics)."""
    cfg, split, name = run.cfg, run.splits[index], run.names[index]
    ids, y = labels.slide_ids, labels.y
    context = {"name": name, "repeat": split.repeat, "fold": split.fold, "index": index,
               "n_folds": len(run.splits)}
    emit("fold_start", {**context, "n_train": len(split.train), "n_val": len(split.val),
                        "n_test": len(split.test)})
    seed = derive_seed(cfg.seed, split.repeat, split.fold, 2)
    seed_everything(seed)
    head = create_head(cfg.model, data.in_dim, labels.n_classes, **cfg.options)
    if cfg.standardize:
        head = Standardized(head, data.in_dim)
        train_ids = [ids[i] for i in split.train]
        head.set_stats(**feature_stats(data, train_ids, None if data.fold_dependent else moments))
    return Member(head, [ids[i] for i in split.train], y[split.train], [ids[i] for i in split.val], y[split.val],
                  cfg, seed, context)


def _end_fold(run: _Run, index: int, member: Member, result: FoldResult, data: MILData, labels: Labels,
              emit: Progress) -> None:
    """Checkpoint and test a trained fold; attention files for the test slides of repeat 0."""
    cfg, split, name = run.cfg, run.splits[index], run.names[index]
    out, ids, y = Path(cfg.out), labels.slide_ids, labels.y
    head = member.head
    head.load_state_dict(result.state)
    save_checkpoint(out / name, head, {
        "model": cfg.model, "options": run.options, "in_dim": data.in_dim, "n_classes": labels.n_classes,
        "classes": labels.classes, "repeat": split.repeat, "fold": split.fold,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
        "standardize": cfg.standardize, "mrantool_version": __version__})
    test_ids = [ids[i] for i in split.test]
    saver = _attention_saver(out / "attention") if cfg.save_attention and split.repeat == 0 else None
    test = evaluate(head, data, test_ids, device=run.device, on_output=saver)
    metrics = slide_metrics(y[split.test], test.probs)
    run.reports.append(FoldReport(name, split.repeat, split.fold, result.best_epoch, result.epochs_run,
                                  result.monitor, len(split.train), len(split.val), len(split.test), metrics,
                                  result.seconds))
    emit("fold_end", {**member.context, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                      **metrics})
    run.predictions += [
        {"slide_id": sid, "fold": split.fold, "repeat": split.repeat, "label": labels.classes[y[i]],
         **{f"prob_{c}": _prob(p) for c, p in zip(labels.classes, probs, strict=True)},
         "predicted": labels.classes[int(probs.argmax())]}
        for sid, i, probs in zip(test_ids, split.test, test.probs, strict=True)]
    run.histories[name], run.rocs[name] = result.history, (y[split.test], test.probs)


def feature_stats(data: MILData, slide_ids: Sequence[str],
                  moments: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] | None = None,
                  ) -> dict[str, torch.Tensor]:
    """Mean and sd of the tissue patch embeddings of `slide_ids` (the fold's training slides) per dimension, and,
    when `data` loads cells (heads that need them), of their cell embeddings per cell position:
    {"mean", "sd"} (D,) [+ {"cell_mean", "cell_sd"} (C, D)].

    Cells are read only when `data.cells`. `moments` keeps each slide's sums across calls, so the K folds of a CV
    read every slide once.
    """
    moments = {} if moments is None else moments
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for slide_id in slide_ids:
        if slide_id not in moments:
            patches, cells = data.read(slide_id, np.arange(data.n_bags(slide_id)), cells=data.cells)
            mask = data.mask(slide_id)
            moments[slide_id] = {"patch": _moments(patches[mask])}
            if cells is not None:
                moments[slide_id]["cell"] = _moments(cells[mask])
        for level, (total, squares, count) in moments[slide_id].items():
            acc = sums.get(level)
            sums[level] = (total, squares, count) if acc is None else (acc[0] + total, acc[1] + squares,
                                                                         acc[2] + count)
    if "patch" not in sums:
        return {"mean": torch.zeros(data.in_dim), "sd": torch.ones(data.in_dim)}
    stats = dict(zip(("mean", "sd"), _mean_sd(*sums["patch"]), strict=True))
    if "cell" in sums:
        stats.update(zip(("cell_mean", "cell_sd"), _mean_sd(*sums["cell"]), strict=True))
    return stats


def _moments(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum and sum of squares over the first axis (float64), and the row count."""
    t = torch.from_numpy(np.asarray(x)).double()
    return t.sum(0), (t * t).sum(0), len(t)


def _mean_sd(total: torch.Tensor, squares: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / max(count, 1)
    return mean.float(), (squares / max(count, 1) - mean * mean).clamp_min(0).sqrt().float()


def _attention_saver(folder: Path) -> Callable[[str, MILOutput], None]:
    """A callback writing attention/<slide_id>.npz (bag, patch, cell arrays where the head has them)."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(slide_id: str, out: MILOutput) -> None:
        arrays = {level: out.attention[level].detach().float().cpu().numpy() for level in LEVELS
                  if level in out.attention}
        with atomic_path(folder / f"{slide_id}.npz", f".{slide_id}.tmp.npz") as temp:
            np.savez(temp, **arrays)

    return save


def _finish(cfg: FitConfig, out: Path, labels: Labels, reports: list[FoldReport],
            predictions: list[dict[str, Any]], histories: dict[str, list[dict[str, float]]],
            rocs: dict[str, tuple[np.ndarray, np.ndarray]], notes: list[str], started: float,
            emit: Progress) -> FitReport:
    """metrics.json, predictions.csv and the plots; the FitReport."""
    mean, sd = mean_sd([r.metrics for r in reports])
    n_used = folds_used([r.metrics for r in reports])
    y_all = np.concatenate([y for y, _ in rocs.values()])
    pooled = slide_metrics(y_all, np.concatenate([p for _, p in rocs.values()]))
    columns = ["slide_id", "fold", "repeat", "label", *[f"prob_{c}" for c in labels.classes], "predicted"]
    _write_csv(out / "predictions.csv", predictions, columns)
    plot_curves(histories, {r.name: r.best_epoch for r in reports}, out / "curves.png")
    plot_roc(rocs, labels.classes, out / "roc.png")
    _write_json(out / "metrics.json", {
        "model": cfg.model, "classes": labels.classes, "seed": cfg.seed,
        "folds": [{"name": r.name, "repeat": r.repeat, "fold": r.fold, "best_epoch": r.best_epoch,
                   "epochs_run": r.epochs_run, "monitor": r.monitor, "n_train": r.n_train, "n_val": r.n_val,
                   "n_test": r.n_test, **r.metrics,
                   "history": [{k: v for k, v in row.items() if k != "seconds"} for row in histories[r.name]]}
                  for r in reports],
        "mean": mean, "sd": sd, "n_folds_used": n_used, "pooled": pooled})
    report = FitReport(out, cfg.model, labels.classes, reports, mean, sd, pooled, notes,
                       time.perf_counter() - started, n_used)
    emit("end", {"out": str(out), "mean": mean, "sd": sd, "seconds": report.seconds})
    return report


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
    if run["store_identity"] is None:
        raise ConfigError(f"Run {run_dir} was trained on in-memory features, not a store; predict with its "
                          "fold models from load_fold_models instead.")
    diffs = identity_differences(run["store_identity"], store.identity)
    if diffs:
        raise StoreError(f"Store {store_path} holds features of another encoder or geometry than run "
                         f"{run_dir} ({'; '.join(diffs)}); predict on a store extracted like the run's "
                         "training store.")
    ids = store.slide_ids() if slides is None else list(slides)
    absent = sorted(set(ids) - set(store.slide_ids()))
    if absent:
        raise StoreError(f"{len(absent)} slide(s) are not in store {store_path} ({', '.join(absent[:3])}); "
                         "check the ids with `mrantool info`.")
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
    classes = run["classes"]
    rows = [{"slide_id": sid, **{f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)},
             "predicted": classes[int(p.argmax())]} for sid, p in zip(ids, probs, strict=True)]
    columns = ["slide_id", *[f"prob_{c}" for c in classes], "predicted"]
    text_rows = [{**r, **{f"prob_{c}": _prob(r[f"prob_{c}"]) for c in classes}} for r in rows]
    _write_csv(out_csv, text_rows, columns)
    return rows
