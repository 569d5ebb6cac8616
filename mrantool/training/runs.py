"""What every fit run shares, whether it trains on the cache or from pixels: settings checks, the run folder.

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
from mrantool.files import atomic_path, atomic_write, output_folder
from mrantool.models.base import MILHead, MILOutput
from mrantool.models.registry import create_head, head_options
from mrantool.models.standardize import Standardized
from mrantool.training.labels import Labels
from mrantool.training.loop import MONITORS, OPTIMIZERS, SCHEDULES, Progress
from mrantool.training.metrics import METRICS, folds_used, mean_sd, slide_metrics
from mrantool.training.plots import plot_curves, plot_roc
from mrantool.training.splits import Split

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
    members: list[dict[str, Any]] = field(default_factory=list)  # ensemble: name, best_epoch, epochs_run each


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

def plain(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars and paths -> python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(plain(value), indent=1, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def prob_text(value: float) -> str:
    return f"{value:.9g}"


# --- checkpoints ---

def save_checkpoint(folder: Path, head: MILHead, meta: dict[str, Any]) -> None:
    """`folder/model.safetensors` (weights) and `folder/head.json` (how to rebuild the head)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"})
    write_json(folder / "head.json", meta)


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


def read_json(path: Path) -> Any:
    """A JSON file written by mrantool (run folders); a one-sentence error when it is damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__}); re-run the command that wrote it.") from None


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
    """(name, head, head.json) of every model of a run's folds, or of the named `folds` (e.g. "fold_0"): one per
    fold, or with `ensemble = K` its K members (fold_0, fold_0/member_1, ...)."""
    run_dir = Path(run_dir)
    names = read_run(run_dir)["folds"]
    if folds is not None:
        unknown = [f for f in folds if f not in names]
        if unknown:
            raise ConfigError(f"Run {run_dir} has no fold(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(names)}.")
        names = list(folds)
    models = []
    for name in names:
        members = sorted((run_dir / name).glob("member_*"), key=lambda p: int(p.name.split("_")[1]))
        for folder in [run_dir / name, *members]:
            models.append((str(folder.relative_to(run_dir)), *load_checkpoint(folder, device)))
    return models


def check_config(cfg: FitConfig) -> None:
    """One ConfigError listing every out-of-range fit setting."""
    rules = [
        (cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} (use {', '.join(OPTIMIZERS)})"),
        (cfg.monitor in MONITORS, f"monitor {cfg.monitor!r} (use {' or '.join(MONITORS)})"),
        (0 <= cfg.smoothing < 1, f"smoothing {cfg.smoothing} (use 0 <= smoothing < 1)"),
        (0 <= cfg.weight_ema < 1, f"weight_ema {cfg.weight_ema} (use 0 <= weight_ema < 1, e.g. 0.99)"),
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
        (cfg.ensemble >= 1, f"ensemble {cfg.ensemble} (use 1 or more models per fold)"),
        (cfg.parallel_folds >= 0, f"parallel_folds {cfg.parallel_folds} (use 0 for all, or 1 or more)"),
        (0 <= cfg.patch_min_tissue <= 1, f"patch_min_tissue {cfg.patch_min_tissue} (use 0..1)"),
        (0 <= cfg.cell_min_tissue <= 1, f"cell_min_tissue {cfg.cell_min_tissue} (use 0..1)"),
        (0 <= cfg.cache_gb < math.inf, f"cache_gb {cfg.cache_gb} (use a finite value >= 0)"),
        (cfg.threads is None or cfg.threads >= 1, f"threads {cfg.threads} (use 1 or more)"),
        (cfg.end_to_end or (cfg.weights is None and cfg.encoder_from is None and cfg.encoder_lr is None
                            and cfg.color_jitter == 0 and cfg.augment and cfg.batchnorm == "batch"),
         "weights, encoder_from, encoder_lr, color_jitter, augment or batchnorm (they apply only with "
         "end_to_end = true; weights and encoder_lr also with --finetune)"),
        (cfg.ensemble == 1 or not cfg.end_to_end, f"ensemble {cfg.ensemble} with end_to_end (training from pixels "
                                                  "keeps one model per fold; use ensemble = 1)"),
        (cfg.weights is None or cfg.encoder_from is None, "both weights and encoder_from (pass one of them)"),
        (not (cfg.tissue_weights and cfg.end_to_end), "tissue_weights with end_to_end (it applies to cached "
                                                      "features only; use tissue_weights = false, or drop --glass)"),
        (not cfg.tissue_centring or (cfg.tissue_weights and cfg.standardize),
         "tissue_centring without tissue_weights and standardize (it centres the standardised cells at the tissue "
         "fractions that tissue_weights brings; set both to true, or tissue_centring = false)"),
        (not cfg.tissue_spread or cfg.tissue_centring,
         "tissue_spread without tissue_centring (it scales the cells around the line tissue_centring fits; set "
         "tissue_centring = true, or tissue_spread = false)"),
        (cfg.encoder_lr is None or cfg.encoder_lr >= 0, f"encoder_lr {cfg.encoder_lr} (use 0 or more)"),
        (0 <= cfg.color_jitter < 1, f"color_jitter {cfg.color_jitter} (use 0 <= color_jitter < 1)"),
        (cfg.batchnorm in ("batch", "frozen"), f"batchnorm {cfg.batchnorm!r} (use 'batch' or 'frozen')"),
        (0 < cfg.pixel_cache_gb < math.inf, f"pixel_cache_gb {cfg.pixel_cache_gb} (use a positive, finite size)"),
    ]
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError(f"Invalid fit settings: {'; '.join(problems)}; fix them in the config file or the "
                          "flags.")


def resolved_options(model: str, options: dict[str, Any]) -> dict[str, Any]:
    """The head's options with defaults filled in (what config.json and head.json record)."""
    defaults = {k: d for k, (_, d) in head_options(model).items() if d is not inspect.Parameter.empty}
    return {**defaults, **options}


def attention_saver(folder: Path) -> Callable[[str, MILOutput], None]:
    """A callback writing attention/<slide_id>.npz (bag, patch, cell arrays where the head has them)."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(slide_id: str, out: MILOutput) -> None:
        arrays = {level: out.attention[level].detach().float().cpu().numpy() for level in LEVELS
                  if level in out.attention}
        with atomic_path(folder / f"{slide_id}.npz", f".{slide_id}.tmp.npz") as temp:
            np.savez(temp, **arrays)

    return save


def finish_run(cfg: FitConfig, out: Path, labels: Labels, reports: list[FoldReport],
            predictions: list[dict[str, Any]], histories: dict[str, list[dict[str, float]]],
            rocs: dict[str, tuple[np.ndarray, np.ndarray]], notes: list[str], started: float,
            emit: Progress) -> FitReport:
    """metrics.json, predictions.csv and the plots; the FitReport."""
    mean, sd = mean_sd([r.metrics for r in reports])
    n_used = folds_used([r.metrics for r in reports])
    y_all = np.concatenate([y for y, _ in rocs.values()])
    pooled = slide_metrics(y_all, np.concatenate([p for _, p in rocs.values()]))
    columns = ["slide_id", "fold", "repeat", "label", *[f"prob_{c}" for c in labels.classes], "predicted"]
    write_csv(out / "predictions.csv", predictions, columns)
    best = {r.name: r.best_epoch for r in reports} | {m["name"]: m["best_epoch"] for r in reports for m in r.members}
    plot_curves(histories, best, out / "curves.png")
    plot_roc(rocs, labels.classes, out / "roc.png")
    write_json(out / "metrics.json", {
        "model": cfg.model, "classes": labels.classes, "seed": cfg.seed,
        "folds": [{"name": r.name, "repeat": r.repeat, "fold": r.fold, "best_epoch": r.best_epoch,
                   "epochs_run": r.epochs_run, "monitor": r.monitor, "n_train": r.n_train, "n_val": r.n_val,
                   "n_test": r.n_test, **r.metrics,
                   "history": [{k: v for k, v in row.items() if k != "seconds"} for row in histories[r.name]],
                   **({"members": r.members} if r.members else {})}
                  for r in reports],
        "mean": mean, "sd": sd, "n_folds_used": n_used, "pooled": pooled})
    report = FitReport(out, cfg.model, labels.classes, reports, mean, sd, pooled, notes,
                       time.perf_counter() - started, n_used)
    emit("end", {"out": str(out), "mean": mean, "sd": sd, "seconds": report.seconds})
    return report


def refuse_finished(out: Path) -> None:
    """A ConfigError when `out` already holds a finished run (fit never overwrites one)."""
    if (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a finished fit run; choose a new --out or delete that "
                          "folder.")


def fold_names(splits: Sequence[Split]) -> list[str]:
    """Folder names of the folds: fold_<k>, or repeat_<r>/fold_<k> with several repeats."""
    repeats = max(s.repeat for s in splits) + 1
    return [s.name(repeats) for s in splits]


def start_run(out: Path, cfg: FitConfig, labels: Labels, splits: Sequence[Split], *, in_dim: int,
              identity: dict[str, Any] | None, device: torch.device, notes: list[str],
              extra: dict[str, Any] | None = None) -> None:
    """config.json (settings, head, classes, store identity, versions; plus `extra`) and splits.json."""
    output_folder(out, "--out")
    names = fold_names(splits)
    write_json(out / "config.json", {
        "mrantool_version": __version__, "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.model_dump(),
        "model": cfg.model, "head_options": resolved_options(cfg.model, cfg.options), "in_dim": in_dim,
        "n_classes": labels.n_classes, "classes": labels.classes, "class_counts": labels.counts(),
        "store_identity": identity, "labels_file": labels.source, "n_slides": len(labels), "folds": names,
        "repeats": max(s.repeat for s in splits) + 1, "device": str(device), "notes": notes, **(extra or {})})
    write_json(out / "splits.json", splits_json(labels, splits))


def splits_json(labels: Labels, splits: Sequence[Split]) -> list[dict[str, Any]]:
    """What splits.json holds: per fold its name, repeat, fold and train / val / test slide ids."""
    ids = labels.slide_ids
    return [{"name": n, "repeat": s.repeat, "fold": s.fold,
             **{part: [ids[i] for i in getattr(s, part)] for part in ("train", "val", "test")}}
            for n, s in zip(fold_names(splits), splits, strict=True)]


def prediction_rows(labels: Labels, split: Split, probs: np.ndarray) -> list[dict[str, Any]]:
    """predictions.csv rows of a fold's test slides."""
    ids, y = labels.slide_ids, labels.y
    return [{"slide_id": ids[i], "fold": split.fold, "repeat": split.repeat, "label": labels.classes[y[i]],
             **{f"prob_{c}": prob_text(p) for c, p in zip(labels.classes, row, strict=True)},
             "predicted": labels.classes[int(row.argmax())]}
            for i, row in zip(split.test, probs, strict=True)]


def run_notes(labels: Labels, splits: Sequence[Split]) -> list[str]:
    """Notes every fit reports: the labels' own, that a fold column overrides folds/repeats, and test folds of
    one class (their AUC is undefined)."""
    notes = list(labels.notes)
    if labels.folds is not None:
        notes.append(f"Using the fold column of {labels.source} ({len(splits)} folds); folds and repeats "
                     "are ignored.")
    one_class = [n for n, s in zip(fold_names(splits), splits, strict=True) if len(set(labels.y[s.test].tolist())) < 2]
    if one_class:
        notes.append(f"The test slides of {', '.join(one_class)} all have one class, so AUC is undefined there; "
                     f"mean AUC is over the other {len(splits) - len(one_class)} of {len(splits)} folds.")
    return notes


def slides_to_predict(available: Sequence[str], slides: Sequence[str] | None, store_path: str | Path) -> list[str]:
    """`slides` (all of `available` when None), each checked to be in the store."""
    ids = list(available) if slides is None else list(slides)
    absent = sorted(set(ids) - set(available))
    if absent:
        raise StoreError(f"{len(absent)} slide(s) are not in store {store_path} ({', '.join(absent[:3])}); "
                         "check the ids with `mrantool info`.")
    return ids


def write_predictions(out_csv: str | Path, ids: Sequence[str], probs: np.ndarray,
                      classes: Sequence[str]) -> list[dict[str, Any]]:
    """`out_csv` (slide_id, prob_<class>..., predicted); returns its rows with probabilities as floats."""
    rows = [{"slide_id": sid, **{f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)},
             "predicted": classes[int(p.argmax())]} for sid, p in zip(ids, probs, strict=True)]
    columns = ["slide_id", *[f"prob_{c}" for c in classes], "predicted"]
    text_rows = [{**r, **{f"prob_{c}": prob_text(r[f"prob_{c}"]) for c in classes}} for r in rows]
    write_csv(out_csv, text_rows, columns)
    return rows


def read_splits(run_dir: str | Path, labels: Labels) -> list[Split]:
    """The folds of a finished run (its splits.json) as `Split`s over `labels`, e.g. to train another model on
    identical folds; every slide of the run must be in `labels`."""
    path = Path(run_dir) / "splits.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no splits.json; pass the --out folder of a `mrantool fit` run.")
    row = {sid: i for i, sid in enumerate(labels.slide_ids)}
    splits = []
    for entry in read_json(path):
        missing = [sid for part in ("train", "val", "test") for sid in entry[part] if sid not in row]
        if missing:
            raise ConfigError(f"Slides of {path} are not in the labels ({', '.join(missing[:3])}); use the labels "
                              "file of that run.")
        splits.append(Split(entry["repeat"], entry["fold"],
                            *(np.array([row[sid] for sid in entry[part]], dtype=np.int64)
                              for part in ("train", "val", "test"))))
    return splits
