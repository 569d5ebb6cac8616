"""End-to-end fine-tuning from the cache: the last encoder layers and the MIL head train together.

Each step takes one training slide: the current head scores every cached bag (slide-level bag attention),
K bags are chosen (the top ones by attention, a fraction `explore` of them uniformly instead), their pixels
are read from the slide at the store's geometry and re-encoded with gradients, and those fresh patch and
cell embeddings replace the cached ones of the chosen bags while the other bags keep their cached features.
The head's own multi-level loss (MRAN: slide + bag + patch + cell) trains the head and the encoder's last
`layers` stages (ResNets) or blocks (ViTs, plus the final norm); the rest of the encoder is frozen, and the
whole encoder stays in eval mode, so BatchNorm running statistics keep their extraction values.

Validation and test slides are evaluated honestly: every bag of an evaluated slide is re-encoded with the
fine-tuned encoder. Layout of the run folder: docs/finetune.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mrantool import __version__
from mrantool.config import FitConfig
from mrantool.encoders.rebuild import rebuild_encoder
from mrantool.encoders.registry import PatchEncoder
from mrantool.encoders.transforms import to_tensor_batch
from mrantool.errors import ConfigError
from mrantool.models.base import MILHead, weighted_ce
from mrantool.models.registry import create_head
from mrantool.models.standardize import Standardized
from mrantool.store import FeatureStore
from mrantool.tiling.presets import Preset
from mrantool.training.api import feature_stats
from mrantool.training.data import StoreData, sample_bags
from mrantool.training.labels import Labels, read_labels
from mrantool.training.loop import class_weights, resolve_device, seed_everything, torch_settings
from mrantool.training.metrics import auc, mean_sd, slide_metrics
from mrantool.training.pixels.checkpoint import copy_atomic, label_slides, save_encoder
from mrantool.training.pixels.source import BagPixels, transform_preset
from mrantool.training.runs import load_checkpoint, read_run, resolved_options, save_checkpoint, write_json
from mrantool.training.splits import derive_seed, make_splits

Progress = Callable[[str, dict[str, Any]], None]
EVALUATION = "every bag of each validation/test slide re-encoded with the fine-tuned encoder"


@dataclass
class FoldSplit:
    """Slide ids of one fold: training, validation (best epoch) and test."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class FinetuneFold:
    """One fine-tuned fold: best epoch (0 = the starting weights), validation and test metrics, timings."""

    name: str
    best_epoch: int
    epochs_run: int
    val_auc: float
    start_val_auc: float
    metrics: dict[str, float]
    start_metrics: dict[str, float]
    history: list[dict[str, float]]
    step_losses: list[float]
    seconds_per_step: float
    seconds_per_epoch: float


@dataclass
class FinetuneReport:
    """What `finetune` did; `encoder` is the in-memory encoder saved as out/encoder.safetensors."""

    out: Path
    folds: list[FinetuneFold]
    mean: dict[str, float]
    sd: dict[str, float]
    encoder: PatchEncoder
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- the encoder: which layers train ---

def trainable_blocks(encoder: PatchEncoder, layers: int) -> tuple[list[str], list[nn.Module]]:
    """Freeze the encoder except its last `layers` stages/blocks; return their names and checkpoint units.

    ResNet-like CNNs: the last `layers` of layer1..layer4 that the truncation kept (or of `stages`).
    ViTs: the last `layers` transformer blocks plus the final norm(s).
    """
    model = encoder.model
    if encoder.kind == "vit":
        named = [(f"blocks.{i}", b) for i, b in enumerate(getattr(model, "blocks", [])) if _has_params(b)]
    else:
        named = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)
                 if _has_params(getattr(model, f"layer{i}", None))]
        if not named and hasattr(model, "stages"):
            named = [(f"stages.{i}", s) for i, s in enumerate(model.stages) if _has_params(s)]
    if not named:
        raise ConfigError(f"Encoder {type(model).__name__} has no ResNet stages, `stages` or ViT blocks to "
                          "fine-tune; use a ResNet, ConvNeXt-like or ViT encoder.")
    if not 1 <= layers <= len(named):
        raise ConfigError(f"finetune layers={layers} is out of range for this encoder ({len(named)} trainable "
                          f"stages/blocks: {named[0][0]}..{named[-1][0]}); pass --finetune-layers 1.."
                          f"{len(named)}.")
    chosen = named[-layers:]
    model.requires_grad_(False)
    names = [name for name, _ in chosen]
    units: list[nn.Module] = []
    for _, module in chosen:
        module.requires_grad_(True)
        units += list(module.children()) if encoder.kind == "cnn" else [module]
    if encoder.kind == "vit":
        for norm in ("norm", "fc_norm"):
            if _has_params(getattr(model, norm, None)):
                getattr(model, norm).requires_grad_(True)
                names.append(norm)
    return names, units


def _has_params(module: object) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters())


def checkpoint_units(units: Sequence[nn.Module]) -> None:
    """Recompute these modules' activations in the backward pass (torch.utils.checkpoint) to save memory."""
    for unit in units:
        inner = unit.forward
        unit.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)  # type: ignore


def encode(encoder: PatchEncoder, pixels: np.ndarray, preset: Preset, device: torch.device) -> tuple[Tensor, Tensor]:
    """(N, h, w, 3) uint8 patches -> fp32 patch (N, D) and cell (N, C, D) embeddings (bf16 autocast on CUDA)."""
    x = to_tensor_batch(pixels, preset).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        patch, cells = encoder(x)
    return patch.float(), cells.float()


# --- bags to re-encode ---

def choose_bags(attention: np.ndarray, k: int, explore: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of K bags: the top ones by attention, a fraction `explore` of K drawn uniformly.

    explore * K is rounded stochastically, so e.g. K = 2 and explore = 0.25 explores one bag every other step.
    """
    n = len(attention)
    k = min(k, n)
    expected = explore * k
    n_explore = min(k, int(expected) + int(rng.random() < expected - int(expected)))
    exploit = np.argsort(-np.asarray(attention, dtype=np.float64), kind="stable")[:k - n_explore]
    rest = np.setdiff1d(np.arange(n), exploit)
    return np.sort(np.concatenate([exploit, rng.choice(rest, n_explore, replace=False)]).astype(np.int64))


# --- one fold ---

@dataclass
class _Ctx:
    """What every step and evaluation of a fold needs."""

    head: nn.Module
    encoder: PatchEncoder
    data: StoreData
    pixels: BagPixels
    preset: Preset
    device: torch.device
    weights: Tensor
    eval_bags: int


def _fresh(ctx: _Ctx, slide_id: str, bags: np.ndarray) -> tuple[Tensor, Tensor | None]:
    """Re-encoded patch (n, P, D) and cell (n, P, C, D) embeddings of some bags of a slide."""
    p = ctx.preset.geometry.n_patches
    patch, cells = encode(ctx.encoder, ctx.pixels.read(slide_id, bags), ctx.preset, ctx.device)
    cells = cells.reshape(len(bags), p, *cells.shape[1:]) if ctx.head.needs_cells else None
    return patch.reshape(len(bags), p, -1), cells


def _step(ctx: _Ctx, slide_id: str, label: int, k: int, explore: float, max_bags: int,
          rng: np.random.Generator) -> float:
    """Forward + backward of one slide (optimizer step is the caller's); returns the loss."""
    head = ctx.head
    n_bags = ctx.data.n_bags(slide_id)
    context = sample_bags(n_bags, max_bags, rng)
    bags = ctx.data.bags(slide_id, context, ctx.device)
    cached_cells = bags.cells if head.needs_cells else None
    head.eval()
    with torch.no_grad():
        attention = head(bags.patches, cached_cells, bags.mask).attention["bag"].float().cpu().numpy()
    head.train()
    attention = np.where(bags.mask.any(-1).cpu().numpy(), attention, -1.0)  # bags without tissue last
    chosen = choose_bags(attention, k, explore, rng)
    patch, cells = _fresh(ctx, slide_id, bags.index[chosen])
    index = torch.from_numpy(chosen).to(ctx.device)
    patches = bags.patches.index_copy(0, index, patch)
    cells = cached_cells.index_copy(0, index, cells) if cells is not None else None
    out = head(patches, cells, bags.mask)
    label_t = torch.tensor(label, device=ctx.device)
    # deep supervision at full weight (the ramp's end): the head has been trained already, so the loss is
    # one fixed objective and steps are comparable
    loss, _ = head.compute_loss(out, label_t, epoch=0, n_epochs=1, class_weights=ctx.weights)
    loss.backward()
    return float(loss.detach())


@torch.no_grad()
def evaluate_reencoded(ctx: _Ctx, slide_ids: Sequence[str], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Class probabilities and mean weighted slide cross-entropy, every bag re-encoded (eval mode)."""
    ctx.head.eval()
    probs = np.zeros((len(slide_ids), ctx.head.n_classes))
    losses = []
    for i, slide_id in enumerate(slide_ids):
        n = ctx.data.n_bags(slide_id)
        parts = [_fresh(ctx, slide_id, np.arange(s, min(n, s + ctx.eval_bags))) for s in range(0, n, ctx.eval_bags)]
        patches = torch.cat([p for p, _ in parts])
        cells = torch.cat([c for _, c in parts]) if ctx.head.needs_cells else None
        mask = torch.from_numpy(ctx.data.mask(slide_id)).to(ctx.device)
        out = ctx.head(patches, cells, mask)
        probs[i] = out.logits.float().softmax(-1).cpu().numpy()
        losses.append(float(weighted_ce(out.logits, torch.tensor(int(y[i]), device=ctx.device), ctx.weights)))
    ctx.head.train()
    return probs, float(np.mean(losses)) if losses else math.nan


def _trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Deep copy of what training changes: the head's whole state, or an encoder's trainable parameters."""
    if isinstance(module, PatchEncoder):
        return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}
    return copy.deepcopy(module.state_dict())


# --- the public API ---

def finetune(store_path: str | Path, labels_csv: str | Path, out_dir: str | Path, *, init_run: str | Path | None = None,
             layers: int = 1, bags_per_slide: int = 2, epochs: int = 3, lr: float = 1e-4, encoder_lr: float = 1e-5,
             folds: int | Sequence[str] | None = None, seed: int = 0, explore: float = 0.25, device: str = "auto",
             progress: Progress | None = None, val_fraction: float = 0.2, max_bags: int = 64,
             weights: str | Path | None = None, eval_bags: int = 8, threads: int | None = None,
             model: str = "mran", options: dict[str, Any] | None = None, patch_min_tissue: float = 0.25,
             cache_gb: float = 4.0, id_column: str = "slide_id", label_column: str = "label") -> FinetuneReport:
    """Fine-tune the store's encoder (last `layers` stages/blocks) and a MIL head per fold; write `out_dir`.

    `init_run`: a frozen-cache `fit` run whose folds (splits, and fold_<k> heads with their standardisation)
    are the starting point (its head, options and patch_min_tissue win over `model`, `options` and
    `patch_min_tissue`); without it, `folds` (an int, default 3) new splits and new `model` heads (MRAN by
    default) with `options`. With it, `folds` may name a subset (e.g. ["fold_0"]). `weights`: the local encoder
    file when the store was extracted with one. `id_column` / `label_column` name the labels file's columns.
    Returns a `FinetuneReport`; see docs/finetune.md for the run folder.
    """
    started = time.perf_counter()
    emit = progress or (lambda event, info: None)
    _check_settings(layers, bags_per_slide, epochs, lr, encoder_lr, explore, val_fraction, max_bags, eval_bags)
    out = Path(out_dir)
    if (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a finished fine-tuning run; choose a new output folder or delete "
                          "that one.")
    store = FeatureStore.open(store_path)
    if "preset" not in store.identity or "transforms" not in store.identity:
        raise ConfigError(f"Store {store_path} has no encoder to fine-tune (imported features); extract the "
                          "slides with `mrantool extract` first.")
    labels = read_labels(labels_csv, store.slide_ids(), id_column=id_column, label_column=label_column)
    run = read_run(init_run) if init_run is not None else None
    if run is not None and run["config"].get("tissue_centring"):
        raise ConfigError(f"Run {init_run} was fit with tissue_centring, which fine-tuning does not support (its "
                          "heads need the cells' tissue fractions, which fine-tuning's freshly encoded cells do not "
                          "carry); start from a run fit with tissue_centring = false, or without an init run.")
    splits = _fold_splits(labels, run, init_run, folds, val_fraction, seed)
    model, options = (model, dict(options or {})) if run is None else (run["model"], run["head_options"])
    create_head(model, store.dims.dim, labels.n_classes, **options)  # unknown head or option: one ConfigError now
    settings = run["config"] if run else {"patch_min_tissue": patch_min_tissue}
    preset = transform_preset(store.identity)
    dev = resolve_device(device)
    config = {"store": str(store_path), "labels": str(labels_csv), "id_column": id_column,
              "label_column": label_column, "init_run": None if init_run is None else
              str(init_run), "layers": layers, "bags_per_slide": bags_per_slide, "epochs": epochs, "lr": lr,
              "encoder_lr": encoder_lr, "seed": seed, "explore": explore, "val_fraction": val_fraction,
              "max_bags": max_bags, "eval_bags": eval_bags, "device": str(dev), "model": model,
              "head_options": resolved_options(model, options), "classes": labels.classes,
              "store_identity": store.identity, "folds": [s.name for s in splits], "evaluation": EVALUATION,
              "mrantool_version": __version__, "torch_version": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    for note in labels.notes:
        emit("note", {"message": note})
    emit("start", {"n_folds": len(splits), "epochs": epochs, "device": str(dev), "out": str(out)})
    data = StoreData(store, labels.slide_ids, cells=True, patch_min_tissue=settings.get("patch_min_tissue", 0.25),
                     cache_gb=cache_gb)
    pixels = BagPixels(store, preset.geometry)
    reports, first_encoder = [], None
    y_of = dict(zip(labels.slide_ids, labels.y.tolist(), strict=True))
    try:
        with torch_settings(threads, dev):
            for index, split in enumerate(splits):
                emit("fold_start", {"name": split.name, "index": index, "n_folds": len(splits)})
                seed_everything(derive_seed(seed, index, 3))
                encoder = rebuild_encoder(store.identity, weights).to(dev)
                names, units = trainable_blocks(encoder, layers)
                if dev.type == "cuda":
                    checkpoint_units(units)
                head = _start_head(run, init_run, split, model, options, labels, data, dev)
                ctx = _Ctx(head, encoder, data, pixels, preset, dev,
                           class_weights(np.array([y_of[s] for s in split.train]), labels.n_classes).to(dev),
                           eval_bags)
                fold = _train(ctx, split, y_of, epochs, lr, encoder_lr, bags_per_slide, explore, max_bags,
                              derive_seed(seed, index, 4), emit)
                _save_fold(out / split.name, ctx, names, store, out, split, model, options, labels, fold)
                first_encoder = encoder if first_encoder is None else first_encoder
                if index == 0:
                    for suffix in ("safetensors", "json"):
                        copy_atomic(out / split.name / f"encoder.{suffix}", out / f"encoder.{suffix}")
                reports.append(fold)
                emit("fold_end", {"name": split.name, "best_epoch": fold.best_epoch, "epochs_run": fold.epochs_run,
                                  **fold.metrics})
    finally:
        pixels.close()
    mean, sd = mean_sd([f.metrics for f in reports])
    write_json(out / "metrics.json", {
        "evaluation": EVALUATION, "classes": labels.classes, "seed": seed,
        "folds": [dataclasses.asdict(f) for f in reports], "mean": mean, "sd": sd,
        "mean_val_auc": _nanmean([f.val_auc for f in reports])})
    report = FinetuneReport(out, reports, mean, sd, first_encoder.eval(), time.perf_counter() - started,
                            list(labels.notes))
    emit("end", {"out": str(out), "mean": mean, "sd": sd, "seconds": report.seconds})
    return report


# Fit settings that fine-tuning has no use for, and those an init run fixes (`fit --finetune` refuses them).
UNUSED_FIT_SETTINGS = ("repeats", "weight_decay", "optimizer", "momentum", "patience", "min_epochs", "monitor",
                       "smoothing", "weight_ema", "lr_schedule", "class_weights", "standardize", "bag_mining",
                       "batch_size", "parallel_folds", "ensemble", "cell_min_tissue", "tissue_weights",
                       "tissue_centring", "tissue_spread", "save_attention")
FROM_INIT_RUN = ("model", "options", "folds", "val_fraction", "patch_min_tissue")
END_TO_END_ONLY = ("end_to_end", "encoder_from", "augment", "color_jitter", "batchnorm", "pixel_cache_gb")


def finetune_from_fit(cfg: FitConfig, *, init_run: str | Path | None = None, layers: int = 1,
                      bags_per_slide: int = 2, progress: Progress | None = None) -> FinetuneReport:
    """`fit --finetune`: every fit setting the user gave is applied, or refused in one sentence (never dropped).

    Settings given explicitly are `cfg.model_fields_set` (flags and config-file keys). Defaults that differ
    from fit's: 3 epochs, lr 1e-4 and encoder_lr 1e-5 unless given; `weights` is the store's encoder file.
    """
    given = cfg.model_fields_set
    unused = [key for key in (*UNUSED_FIT_SETTINGS, *END_TO_END_ONLY) if key in given]
    fixed = [key for key in FROM_INIT_RUN if key in given] if init_run is not None else []
    if unused or fixed:
        parts = ([f"{', '.join(unused)} (fine-tuning trains with Adam at a fixed weight decay, keeps the epoch "
                  "with the lowest validation loss and reads only the bags it re-encodes)"] if unused else []) + (
                 [f"{', '.join(fixed)} (they come from --init-run {init_run})"] if fixed else [])
        raise ConfigError(f"fit --finetune cannot apply {' nor '.join(parts)}; remove them from the flags or the "
                          "config file.")
    return finetune(cfg.store, cfg.labels, cfg.out, init_run=init_run, layers=layers, bags_per_slide=bags_per_slide,
                    epochs=cfg.epochs if "epochs" in given else 3, lr=cfg.lr if "lr" in given else 1e-4,
                    encoder_lr=cfg.encoder_lr if cfg.encoder_lr is not None else 1e-5, weights=cfg.weights,
                    folds=None if init_run is not None else cfg.folds, seed=cfg.seed, device=cfg.device,
                    progress=progress, val_fraction=cfg.val_fraction, max_bags=cfg.max_bags, threads=cfg.threads,
                    model=cfg.model, options=cfg.options, patch_min_tissue=cfg.patch_min_tissue,
                    cache_gb=cfg.cache_gb, id_column=cfg.id_column, label_column=cfg.label_column)


# --- helpers of finetune ---

def _check_settings(layers: int, k: int, epochs: int, lr: float, encoder_lr: float, explore: float,
                    val_fraction: float, max_bags: int, eval_bags: int) -> None:
    rules = [(layers >= 1, f"layers {layers} (use 1 or more)"), (k >= 1, f"bags_per_slide {k} (use 1 or more)"),
             (epochs >= 1, f"epochs {epochs} (use 1 or more)"), (lr > 0 and encoder_lr >= 0,
             f"lr {lr} / encoder_lr {encoder_lr} (use lr > 0, encoder_lr >= 0)"),
             (0 <= explore <= 1, f"explore {explore} (use 0..1)"),
             (0 <= val_fraction < 1, f"val_fraction {val_fraction} (use 0 <= val_fraction < 1)"),
             (max_bags > k, f"max_bags {max_bags} (use more than bags_per_slide {k})"),
             (eval_bags >= 1, f"eval_bags {eval_bags} (use 1 or more)")]
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError(f"Invalid fine-tuning settings: {'; '.join(problems)}; fix them in the flags or config.")


def _fold_splits(labels: Labels, run: dict[str, Any] | None, init_run: str | Path | None,
                 folds: int | Sequence[str] | None, val_fraction: float, seed: int) -> list[FoldSplit]:
    """The init run's folds (all or the named ones), or new k-fold splits (default 3) without a run."""
    if run is None:
        if folds is not None and not isinstance(folds, int):
            raise ConfigError("Fold names need an init run to name; pass --init-run RUN or a number of folds.")
        # make_splits divides by val_fraction: ask for some and fold it back into training when 0 is wanted
        splits = make_splits(labels, folds or 3, 1, val_fraction or 0.2, seed)
        ids = labels.slide_ids

        def names(rows: np.ndarray) -> list[str]:
            return [ids[i] for i in np.sort(rows)]

        return [FoldSplit(s.name(1), names(np.concatenate([s.train, s.val])) if not val_fraction else names(s.train),
                          [] if not val_fraction else names(s.val), names(s.test)) for s in splits]
    stored = json.loads((Path(init_run) / "splits.json").read_text())
    if isinstance(folds, int):
        raise ConfigError(f"Run {init_run} fixes the folds; pass fold names (e.g. fold_0) or none, not a count.")
    wanted = [s["name"] for s in stored] if folds is None else list(folds)
    unknown = [f for f in wanted if f not in {s["name"] for s in stored}]
    if unknown:
        raise ConfigError(f"Run {init_run} has no fold(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(s['name'] for s in stored)}.")
    return [FoldSplit(s["name"], s["train"], s["val"], s["test"]) for s in stored if s["name"] in wanted]


def _start_head(run: dict[str, Any] | None, init_run: str | Path | None, split: FoldSplit, model: str,
                options: dict[str, Any], labels: Labels, data: StoreData, device: torch.device) -> MILHead:
    """The init run's head of this fold (standardisation included), or a new standardised head."""
    if run is not None:
        if run["classes"] != labels.classes:
            raise ConfigError(f"Run {init_run} was trained on classes {run['classes']}, the labels give "
                              f"{labels.classes}; pass the labels file of that run.")
        head, _ = load_checkpoint(Path(init_run) / split.name, device)
        return head.train()
    head = Standardized(create_head(model, data.in_dim, labels.n_classes, **options), data.in_dim)
    head.set_stats(**feature_stats(data, split.train))
    return head.to(device).train()


def _train(ctx: _Ctx, split: FoldSplit, y_of: dict[str, int], epochs: int, lr: float, encoder_lr: float, k: int,
           explore: float, max_bags: int, seed: int, emit: Progress) -> FinetuneFold:
    """Epochs of one step per training slide; the best epoch by validation loss (epoch 0 = start) is kept."""
    rng = np.random.default_rng(seed)
    enc_params = [p for p in ctx.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": list(ctx.head.parameters()), "lr": lr, "weight_decay": 1e-4},
                                  {"params": enc_params, "lr": encoder_lr, "weight_decay": 0.0}])
    val_y = np.array([y_of[s] for s in split.val])
    test_y = np.array([y_of[s] for s in split.test])

    def validate() -> tuple[float, float]:
        if not split.val:
            return math.nan, math.nan
        probs, loss = evaluate_reencoded(ctx, split.val, val_y)
        return loss, auc(val_y, probs)

    start_metrics = slide_metrics(test_y, evaluate_reencoded(ctx, split.test, test_y)[0])
    val_loss, val_auc = validate()
    history = [{"epoch": 0, "train_loss": math.nan, "val_loss": val_loss, "val_auc": val_auc, "seconds": 0.0}]
    best = (val_loss if split.val else math.inf, 0, _trainable_state(ctx.head), _trainable_state(ctx.encoder))
    step_losses, step_seconds = [], []
    for epoch in range(epochs):
        tic = time.perf_counter()
        for i in rng.permutation(len(split.train)):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            slide_id = split.train[i]
            step_losses.append(_step(ctx, slide_id, y_of[slide_id], k, explore, max_bags, rng))
            optimizer.step()
            step_seconds.append(time.perf_counter() - t0)
            emit("step", {"name": split.name, "epoch": epoch + 1, "loss": step_losses[-1],
                          "seconds": step_seconds[-1]})
        train_seconds = time.perf_counter() - tic
        val_loss, val_auc = validate()
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(step_losses[-len(split.train):])),
                        "val_loss": val_loss, "val_auc": val_auc, "seconds": train_seconds})
        if not split.val or val_loss < best[0]:
            best = (val_loss, epoch + 1, _trainable_state(ctx.head), _trainable_state(ctx.encoder))
        emit("epoch", {"name": split.name, **history[-1], "n_epochs": epochs, "best_epoch": best[1]})
    ctx.head.load_state_dict(best[2])
    ctx.encoder.model.load_state_dict(best[3], strict=False)
    probs, _ = evaluate_reencoded(ctx, split.test, test_y)
    return FinetuneFold(split.name, best[1], epochs, history[best[1]]["val_auc"], history[0]["val_auc"],
                        slide_metrics(test_y, probs), start_metrics, history, step_losses,
                        float(np.mean(step_seconds)), float(np.mean([h["seconds"] for h in history[1:]])))


def _save_fold(folder: Path, ctx: _Ctx, names: list[str], store: FeatureStore, out: Path, split: FoldSplit,
               model: str, options: dict[str, Any], labels: Labels, result: FinetuneFold) -> None:
    """fold folder: encoder.safetensors + encoder.json (with the slides whose labels trained it), model.safetensors
    + head.json."""
    fold = split.name
    ident = store.identity
    save_encoder(folder, ctx.encoder, ident, {
        "trainable": {"layers": len(names) - sum(n in ("norm", "fc_norm") for n in names), "modules": names},
        "base_weights": ident["weights"], "run": str(out.resolve()), "fold": fold, "best_epoch": result.best_epoch,
        "label_slides": label_slides(store, [*split.train, *split.val])})
    head = ctx.head
    standardize = isinstance(head, Standardized)
    save_checkpoint(folder, head, {
        "model": model, "options": resolved_options(model, options), "in_dim": head.in_dim,
        "n_classes": labels.n_classes, "classes": labels.classes, "fold": fold, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "monitor": "loss", "standardize": standardize, "finetuned": True,
        "mrantool_version": __version__})


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
