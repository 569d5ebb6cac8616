"""`fit` (cross-validated training of a MIL head on a store's cached features) and `predict`.

The run folder they write and read is described in mrantool.training.runs and docs/fit.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.errors import ConfigError, StoreError
from mrantool.files import output_file
from mrantool.models.base import MILOutput, call_head
from mrantool.models.registry import create_head
from mrantool.models.standardize import Standardized, floored_sd
from mrantool.store import FeatureStore
from mrantool.store.schema import identity_differences
from mrantool.training.data import MILData, StoreData
from mrantool.training.labels import Labels, read_labels
from mrantool.training.loop import (
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
from mrantool.training.splits import Split, derive_seed, make_splits, validation_split

SPREAD_BINS = 10  # tissue_spread: equal bins of the cells' tissue fraction, each with its residual spread
SPREAD_MIN_CELLS = 50  # a bin with fewer training cells (all positions together) keeps spread 1

# --- fit ---

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
                     cache_gb=cfg.cache_gb, cell_min_tissue=cfg.cell_min_tissue, tissue_weights=cfg.tissue_weights)
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
    same, within noise, as training it alone. With `ensemble = K` each fold trains K models, which are
    tested together once the last of them is trained.
    """
    emit = progress or (lambda event, info: None)
    runs = [_start_run(cfg, data, labels, identity, emit) for cfg in cfgs]
    models = [(run, index, k) for run in runs for index in range(len(run.splits)) for k in range(run.cfg.ensemble)]
    moments: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {}
    bins = any(run.cfg.tissue_spread for run in runs)  # per-bin sums taken in the first read of each slide
    trained: dict[tuple[int, int], list[tuple[Member, FoldResult]]] = {}
    for group in _fold_groups(models, data):
        run0 = group[0][0]
        with torch_settings(run0.cfg.threads, run0.device):
            members = [_member(run, index, k, data, labels, moments, emit, bins=bins) for run, index, k in group]
            results = train_members(members, data, device=run0.device, progress=emit)
            for (run, index, _), member, result in zip(group, members, results, strict=True):
                done = trained.setdefault((id(run), index), [])
                done.append((member, result))
                if len(done) == run.cfg.ensemble:
                    _end_fold(run, index, done, data, labels, emit)
    return [finish_run(run.cfg, Path(run.cfg.out), labels, run.reports, run.predictions, run.histories, run.rocs,
                       run.notes, run.started, emit) for run in runs]


def _start_run(cfg: FitConfig, data: MILData, labels: Labels, identity: dict[str, Any] | None,
               emit: Progress) -> _Run:
    """Validate a run, write its config.json and splits.json, announce it."""
    started = time.perf_counter()
    check_config(cfg)
    if cfg.end_to_end:
        raise ConfigError("end_to_end = true trains from pixels, not from cached features; call "
                          "mrantool.training.pixels.e2e.fit_end_to_end (`mrantool fit --end-to-end` does).")
    out = Path(cfg.out)
    refuse_finished(out)
    options = resolved_options(cfg.model, cfg.options)
    probe = create_head(cfg.model, data.in_dim, labels.n_classes, **cfg.options)
    data.check_head(probe)
    device = resolve_device(cfg.device)
    splits = make_splits(labels, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
    notes = run_notes(labels, splits) + data.notes()
    if not probe.batched and cfg.batch_size > 1:
        notes.append(f"Head {cfg.model} does not take padded batches of slides yet, so it trains one slide per "
                     f"step and one fold at a time; batch_size {cfg.batch_size} is ignored.")
    for note in notes:
        emit("note", {"message": note})
    start_run(out, cfg, labels, splits, in_dim=data.in_dim, identity=identity, device=device, notes=notes)
    emit("start", {"n_slides": len(labels), "n_folds": len(splits), "epochs": cfg.epochs,
                   "classes": labels.classes, "device": str(device), "out": str(out)})
    return _Run(cfg, options, device, splits, fold_names(splits), notes, started)


def _fold_groups(models: list[tuple[_Run, int, int]], data: MILData) -> list[list[tuple[_Run, int, int]]]:
    """(run, fold, member) in groups that train together: same head, options, group settings and standardisation
    buffers (runs with and without tissue_centring or tissue_spread share the data and the statistics pass, not
    a group), at most `parallel_folds` models (one fold's members at a time for `fold_dependent` data)."""
    groups: dict[str, list[list[tuple[_Run, int, int]]]] = {}
    for run, index, k in models:
        cfg = run.cfg
        key = train_together_key(cfg) + str((cfg.tissue_centring, cfg.tissue_spread))  # the heads' buffer shapes
        chunks = groups.setdefault(key, [[]])
        last = chunks[-1]
        if data.fold_dependent:  # a new fold starts a new group (runs compared by identity, not field by field)
            full = bool(last) and (last[-1][0] is not run or last[-1][1] != index)
        else:
            full = len(last) >= (cfg.parallel_folds or len(models))
        if full:
            chunks.append([])
        chunks[-1].append((run, index, k))
    return [chunk for chunks in groups.values() for chunk in chunks]


def train_together_key(cfg: FitConfig) -> str:
    """Runs on the same data whose folds can train as members of one group have the same key."""
    return json.dumps([cfg.model, resolved_options(cfg.model, cfg.options), cfg.standardize, group_settings(cfg),
                       cfg.device, cfg.threads], sort_keys=True, default=str)


def _member(run: _Run, index: int, k: int, data: MILData, labels: Labels,
            moments: dict[str, dict[str, tuple[torch.Tensor, ...]]], emit: Progress, *, bins: bool = False) -> Member:
    """Build the seeded head of member `k` of a fold (standardised with its training slides' statistics).

    Member 0 is the fold's single model of a run without an ensemble; member k > 0 has its own seed and draws
    its own validation slides from the fold's training slides, so together the members train on all of them.
    """
    cfg, split, name = run.cfg, run.splits[index], run.names[index]
    ids, y = labels.slide_ids, labels.y
    fit_rows, val_rows = split.train, split.val
    if k:
        rows = np.sort(np.concatenate([split.train, split.val]))
        fit_rows, val_rows = validation_split(labels, rows, cfg.val_fraction,
                                              derive_seed(cfg.seed, split.repeat, split.fold, 1, k))
        name = f"{name}/member_{k}"
    context = {"name": name, "repeat": split.repeat, "fold": split.fold, "index": index, "member": k,
               "n_folds": len(run.splits)}
    if k == 0:  # fold-dependent data (e.g. FoldStandardised) refits its statistics on this event
        emit("fold_start", {**context, "n_train": len(split.train), "n_val": len(split.val),
                            "n_test": len(split.test)})
    seed = derive_seed(cfg.seed, split.repeat, split.fold, 2, *([k] if k else []))
    seed_everything(seed)
    head = create_head(cfg.model, data.in_dim, labels.n_classes, **cfg.options)
    if cfg.standardize:
        head = Standardized(head, data.in_dim)
        train_ids = [ids[i] for i in fit_rows]
        head.set_stats(**feature_stats(data, train_ids, None if data.fold_dependent else moments,
                                       tissue_slopes=cfg.tissue_centring, tissue_spread=cfg.tissue_spread,
                                       bins=bins))
    return Member(head, [ids[i] for i in fit_rows], y[fit_rows], [ids[i] for i in val_rows], y[val_rows],
                  cfg, seed, context)


def _end_fold(run: _Run, index: int, trained: list[tuple[Member, FoldResult]], data: MILData, labels: Labels,
              emit: Progress) -> None:
    """Checkpoint and test a fold's trained model(s): with an ensemble the members' probabilities and attention
    are averaged; attention files for the test slides of repeat 0."""
    cfg, split, name = run.cfg, run.splits[index], run.names[index]
    out, ids, y = Path(cfg.out), labels.slide_ids, labels.y
    test_ids = [ids[i] for i in split.test]
    outputs: dict[str, list[MILOutput]] = {}
    probs = np.zeros((len(test_ids), labels.n_classes))
    trained = sorted(trained, key=lambda t: t[0].context["member"])
    keep = cfg.save_attention and split.repeat == 0
    for member, result in trained:
        head = member.head
        head.load_state_dict(result.state)
        k = member.context["member"]
        save_checkpoint(out / name / (f"member_{k}" if k else ""), head, {
            "model": cfg.model, "options": run.options, "in_dim": data.in_dim, "n_classes": labels.n_classes,
            "classes": labels.classes, "repeat": split.repeat, "fold": split.fold,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
            "standardize": cfg.standardize, "mrantool_version": __version__,
            **({"member": k, "seed": member.seed, "val_slides": list(member.val_ids)} if cfg.ensemble > 1 else {})})
        probs += evaluate(head, data, test_ids, device=run.device,
                          on_output=partial(_keep_attention, outputs) if keep else None).probs / len(trained)
        run.histories[member.context["name"]] = result.history
    if outputs:
        save = attention_saver(out / "attention")
        for slide_id, outs in outputs.items():
            save(slide_id, MILOutput(outs[0].logits, {level: torch.stack([o.attention[level] for o in outs]).mean(0)
                                                      for level in outs[0].attention}, {}))
    first = trained[0][1]  # member 0: the fold's model without an ensemble; its epochs and history stand for it
    members = [{"name": m.context["name"], "best_epoch": r.best_epoch, "epochs_run": r.epochs_run}
               for m, r in trained] if cfg.ensemble > 1 else []
    metrics = slide_metrics(y[split.test], probs)
    run.reports.append(FoldReport(name, split.repeat, split.fold, first.best_epoch, first.epochs_run, first.monitor,
                                  len(split.train), len(split.val), len(split.test), metrics,
                                  sum(r.seconds for _, r in trained), members))
    emit("fold_end", {**trained[0][0].context, "best_epoch": first.best_epoch, "epochs_run": first.epochs_run,
                      **metrics})
    run.predictions += prediction_rows(labels, split, probs)
    run.rocs[name] = (y[split.test], probs)


def _keep_attention(outputs: dict[str, list[MILOutput]], slide_id: str, out: MILOutput) -> None:
    outputs.setdefault(slide_id, []).append(MILOutput(out.logits, {k: v.detach().cpu() for k, v in
                                                                    out.attention.items()}))


def feature_stats(data: MILData, slide_ids: Sequence[str],
                  moments: dict[str, dict[str, tuple[torch.Tensor, ...]]] | None = None, *,
                  tissue_slopes: bool = False, tissue_spread: bool = False,
                  bins: bool = False) -> dict[str, torch.Tensor]:
    """Mean and sd of the tissue patch embeddings of `slide_ids` (the fold's training slides) per dimension, and,
    when `data` loads cells (heads that need them), of their cell embeddings per cell position:
    {"mean", "sd"} (D,) [+ {"cell_mean", "cell_sd"} (C, D)]. With `tissue_slopes` (fit's `tissue_centring`; the
    data must give the cells' tissue fractions, as with `tissue_weights`), also each position's mean fraction and
    the least-squares slope of every cell feature on it, {"cell_tissue_mean"} (C,) and {"cell_slope"} (C, D), and
    "cell_sd" is the spread around that line; with `tissue_spread` (fit's option of that name) also
    {"cell_spread"} (C, SPREAD_BINS), the squared spread around the line per bin of the fraction (`_tissue_spread`).

    Cells are read only when `data.cells`. `moments` keeps each slide's sums across calls, so the K folds of a CV
    read every slide once; `bins` keeps the per-bin sums there too (a sweep of which only some variants use
    `tissue_spread` then reads every slide once).
    """
    moments = {} if moments is None else moments
    sums: dict[str, tuple[torch.Tensor, ...]] = {}
    for slide_id in slide_ids:
        if slide_id not in moments or (tissue_spread and "tissue_bins" not in moments[slide_id]):
            moments[slide_id] = _slide_moments(data, slide_id, bins=tissue_spread or bins)
        for level, values in moments[slide_id].items():
            acc = sums.get(level)
            sums[level] = values if acc is None else tuple(a + v for a, v in zip(acc, values, strict=True))
    if "patch" not in sums:
        return {"mean": torch.zeros(data.in_dim), "sd": torch.ones(data.in_dim)}
    stats = dict(zip(("mean", "sd"), _mean_sd(*sums["patch"]), strict=True))
    if "cell" in sums:
        stats.update(zip(("cell_mean", "cell_sd"), _mean_sd(*sums["cell"]), strict=True))
    if tissue_slopes:
        if "tissue" not in sums:
            raise ConfigError("tissue_centring needs the cells' tissue fractions, which this data does not give; "
                              "use cached features of a store with cell tissue fractions and tissue_weights = true.")
        stats.update(_tissue_slopes(sums["cell"], sums["tissue"]))
        if tissue_spread:
            stats["cell_spread"] = _tissue_spread(stats, sums["tissue_bins"])
    return stats


def _slide_moments(data: MILData, slide_id: str, bins: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """Sums of one slide's tissue patches and, when loaded, of their cells (and, when the data gives them, of their
    tissue fractions: a sweep's variants share these sums, with and without `tissue_centring`); with `bins`, also
    the sums per tissue bin that `tissue_spread` needs."""
    patches, cells = data.read(slide_id, np.arange(data.n_bags(slide_id)), cells=data.cells)
    mask = data.mask(slide_id)
    out = {"patch": _moments(_float64(patches[mask]))}
    if cells is None:
        return out
    x = _float64(cells[mask])
    tissue = data.cell_mask(slide_id)
    if tissue is None or tissue.dtype.kind != "f":
        out["cell"] = _moments(x)
        return out
    t = _float64(tissue[mask])
    if bins:  # the whole slide's sums are the bins' sums: x and t are squared once
        out["tissue_bins"] = per_bin = _bin_moments(x, t)
        n, t1, t2, x1, x2, xt = (s.sum(1) for s in per_bin)
        out["cell"] = (x1, x2, n[0])
        out["tissue"] = (t1, t2, xt)
    else:
        out["cell"] = _moments(x)
        out["tissue"] = (t.sum(0), (t * t).sum(0), torch.einsum("ncd,nc->cd", x, t))
    return out


def _bin_moments(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per cell position and tissue bin (SPREAD_BINS equal bins of the fraction): count, sums of t and t^2 (C, K),
    sums of x, x^2 and x t (C, K, D); cells x (N, C, D), fractions t (N, C)."""
    onehot = torch.nn.functional.one_hot((t * SPREAD_BINS).long().clamp(0, SPREAD_BINS - 1), SPREAD_BINS).double()
    return (onehot.sum(0), torch.einsum("nck,nc->ck", onehot, t), torch.einsum("nck,nc->ck", onehot, t * t),
            torch.einsum("nck,ncd->ckd", onehot, x), torch.einsum("nck,ncd->ckd", onehot, x * x),
            torch.einsum("nck,ncd->ckd", onehot, x * t.unsqueeze(-1)))  # pairwise: no (N, C, K, D) intermediate


def _tissue_spread(stats: dict[str, torch.Tensor], bins: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(C, K): per tissue bin, the mean squared residual of the cells around their position's tissue line, in units
    of the cell sd and averaged over dimensions and positions (1 over all cells); the same for every position (edge
    cells are too few to estimate it per position). Bins with under SPREAD_MIN_CELLS cells get 1."""
    n, t1, t2, x1, x2, xt = bins
    slope, sd = stats["cell_slope"].double(), floored_sd(stats["cell_sd"].double())
    alpha = stats["cell_mean"].double() - stats["cell_tissue_mean"].double().unsqueeze(-1) * slope  # line at t = 0
    a, b = alpha.unsqueeze(1), slope.unsqueeze(1)  # (C, 1, D)
    sq = (x2 - 2 * a * x1 - 2 * b * xt + a * a * n.unsqueeze(-1) + 2 * a * b * t1.unsqueeze(-1)
          + b * b * t2.unsqueeze(-1))  # (C, K, D): sum over the bin's cells of (x - a - b t)^2
    count = n.sum(0)
    g = (sq / (sd * sd).unsqueeze(1)).mean(-1).sum(0) / count.clamp_min(1)
    g = torch.where(count >= SPREAD_MIN_CELLS, g.clamp_min(1e-2), torch.ones_like(g))
    return g.expand_as(n).float()


def _float64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).double()


def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum and sum of squares over the first axis, and the row count (float64)."""
    return t.sum(0), (t * t).sum(0), torch.tensor(len(t), dtype=torch.float64)


def _mean_sd(total: torch.Tensor, squares: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = count.clamp_min(1)
    mean = total / n
    return mean.float(), (squares / n - mean * mean).clamp_min(0).sqrt().float()


def _tissue_slopes(cell: tuple[torch.Tensor, ...], tissue: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Per cell position and dimension, the least-squares line of the cell features on the tissue fraction:
    its pivot (the mean fraction), slope, and the sd left around it. A position whose fraction hardly varies
    (sd under 0.01) keeps slope 0."""
    (total, squares, count), (t_sum, t_squares, xt) = cell, tissue
    n = count.clamp_min(1)
    mean, t_mean = total / n, t_sum / n
    t_var = (t_squares / n - t_mean * t_mean).clamp_min(0)
    slope = (xt / n - t_mean.unsqueeze(-1) * mean) / t_var.clamp_min(1e-12).unsqueeze(-1)
    slope = torch.where((t_var > 1e-4).unsqueeze(-1), slope, torch.zeros_like(slope))
    residual = (squares / n - mean * mean - slope * slope * t_var.unsqueeze(-1)).clamp_min(0)
    return {"cell_tissue_mean": t_mean.float(), "cell_slope": slope.float(), "cell_sd": residual.sqrt().float()}


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
                         patch_min_tissue=settings["patch_min_tissue"], cache_gb=settings["cache_gb"],
                         cell_min_tissue=settings.get("cell_min_tissue", 0.0),  # runs from before: no cell mask
                         tissue_weights=settings.get("tissue_weights", False))
        probs = np.zeros((len(ids), run["n_classes"]))
        emit("start", {"n_slides": len(ids), "n_models": len(models)})
        for i, slide_id in enumerate(ids):
            bags = data.bags(slide_id, None, dev)
            for _, head, _ in models:
                cells = head.needs_cells
                out = call_head(head, bags.patches, bags.cells if cells else None, bags.mask,
                                bags.cell_mask if cells else None)
                probs[i] += out.logits.float().softmax(-1).cpu().numpy() / len(models)
            emit("slide", {"index": i, "n_slides": len(ids), "slide_id": slide_id})
    return write_predictions(out_csv, ids, probs, run["classes"])
