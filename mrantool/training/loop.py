"""Training one fold: one slide per step (standard MIL), class-weighted loss, early stopping on validation.

Reference-code defects avoided on purpose: the best checkpoint is a deep copy of the weights (never an
alias of the live ones), evaluation runs in eval mode under no_grad on every bag, and every source of
randomness is seeded so two CPU runs with one seed give identical numbers.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mrantool.config import FitConfig
from mrantool.errors import ConfigError
from mrantool.models.base import MILHead, MILOutput, weighted_ce
from mrantool.training.data import MILData, sample_bags
from mrantool.training.metrics import auc

Progress = Callable[[str, dict[str, Any]], None]
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("loss", "auc")
SCHEDULES = ("constant", "cosine")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; any other torch device name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use device = 'cpu' or "
                          "'auto'.")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def torch_settings(threads: int | None, device: torch.device) -> Iterator[None]:
    """`threads` CPU threads and, off the CPU, deterministic algorithms (warning where an op has none).

    The CPU kernels the heads use are deterministic already; switching the flag on there costs a ~5 s
    import and slows small steps, so it is left alone. Settings are restored on exit.
    """
    old_flags = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
    old_threads = torch.get_num_threads()
    if device.type != "cpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if device.type != "cpu":
            torch.use_deterministic_algorithms(old_flags[0], warn_only=old_flags[1])
        torch.set_num_threads(old_threads)


def class_weights(y: np.ndarray, n_classes: int) -> Tensor:
    """Inverse-frequency weights n / (K n_k) of the training labels (1 for a class with no slides)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def make_optimizer(cfg: FitConfig, params: Any) -> torch.optim.Optimizer:
    """adam | adamw | sgd (with momentum) at cfg.lr and cfg.weight_decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")


def make_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for a constant lr; "cosine" anneals per step from cfg.lr to 0 over cfg.epochs epochs."""
    if cfg.lr_schedule == "constant":
        return None
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    raise ConfigError(f"lr_schedule {cfg.lr_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")


def uses_bag_weights(head: MILHead) -> bool:
    """Whether the head takes per-bag loss weights (MRAN's bag mining)."""
    inner = getattr(head, "head", head)  # a Standardized wrapper passes them through
    return "bag_weights" in inspect.signature(inner.forward).parameters


@dataclass
class Evaluation:
    """Probabilities (n, K) of the evaluated slides and their mean class-weighted cross-entropy."""

    probs: np.ndarray
    loss: float


@dataclass
class FoldResult:
    """The best epoch's weights (a deep copy), that epoch (1-based), and one log row per epoch run."""

    state: dict[str, Tensor]
    best_epoch: int
    epochs_run: int
    monitor: str
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _EpochLog:
    epoch: int
    train_loss: float
    train_ce: float
    val_loss: float
    val_auc: float
    seconds: float


@torch.no_grad()
def evaluate(head: MILHead, data: MILData, slide_ids: Sequence[str], y: np.ndarray | None = None, *,
             device: torch.device | str = "cpu", class_weights: Tensor | None = None,
             on_output: Callable[[str, MILOutput], None] | None = None) -> Evaluation:
    """Predict every bag of each slide in eval mode; `on_output(slide_id, out)` sees each raw output."""
    was_training = head.training
    head.eval()
    probs = np.zeros((len(slide_ids), head.n_classes), dtype=np.float64)
    losses = []
    weights = None if class_weights is None else class_weights.to(device)
    try:
        for i, slide_id in enumerate(slide_ids):
            bags = data.bags(slide_id, None, device)
            out = head(bags.patches, bags.cells if head.needs_cells else None, bags.mask)
            probs[i] = out.logits.float().softmax(-1).cpu().numpy()
            if y is not None:
                losses.append(float(weighted_ce(out.logits, torch.tensor(int(y[i]), device=device), weights)))
            if on_output is not None:
                on_output(slide_id, out)
    finally:
        head.train(was_training)
    return Evaluation(probs, float(np.mean(losses)) if losses else math.nan)


def train_fold(head: MILHead, data: MILData, train_ids: Sequence[str], train_y: np.ndarray,
               val_ids: Sequence[str], val_y: np.ndarray, cfg: FitConfig, *, seed: int,
               device: torch.device | str = "cpu", progress: Progress | None = None,
               context: dict[str, Any] | None = None, params: Any = None) -> FoldResult:
    """Train `head` in place on one fold; return the best epoch's weights as a deep copy.

    Each epoch visits the training slides in a fresh random order, one slide per step, with at most
    cfg.max_bags random bags of a larger slide. The best epoch has the lowest validation loss (or highest
    validation AUC with monitor="auc"; loss when the validation slides have one class), after an exponential
    moving average with weight `smoothing` on the past epochs; training stops after `patience` epochs
    without improvement once `min_epochs` have run. Without validation slides the last epoch is kept.
    `lr_schedule = "cosine"` anneals the lr per step to 0 over `epochs`. With bag mining, the slide head's
    bag attention x n_bags of a slide's last step becomes that slide's bag weights for its next step.
    `params`: optimiser parameter groups (default: all of the head's parameters at cfg.lr).
    """
    start = time.perf_counter()
    context = context or {}
    rng = np.random.default_rng(seed)
    head.to(device)
    weights = class_weights(train_y, head.n_classes).to(device) if cfg.class_weights else None
    optimizer = make_optimizer(cfg, head.parameters() if params is None else params)
    scheduler = make_scheduler(cfg, optimizer, len(train_ids))
    mining = cfg.bag_mining and uses_bag_weights(head)
    bag_weights: dict[str, np.ndarray] = {}
    monitor = cfg.monitor if cfg.monitor == "loss" or len(set(np.asarray(val_y).tolist())) > 1 else "loss"
    best_score, best_epoch, smoothed = math.inf, -1, math.nan
    best_state = copy.deepcopy(head.state_dict())
    history: list[dict[str, float]] = []
    epoch = -1
    for epoch in range(cfg.epochs):
        tic = time.perf_counter()
        head.train()
        losses, ces = [], []
        for i in rng.permutation(len(train_ids)):
            slide_id = train_ids[i]
            n_bags = data.n_bags(slide_id)
            bags = data.bags(slide_id, sample_bags(n_bags, cfg.max_bags, rng), device)
            label = torch.tensor(int(train_y[i]), device=device)
            out = head(bags.patches, bags.cells if head.needs_cells else None, bags.mask)
            extra = {}
            if mining:
                slide_weights = bag_weights.setdefault(slide_id, np.ones(n_bags, np.float32))
                extra["bag_weights"] = torch.from_numpy(slide_weights[bags.index]).to(device)
            loss, parts = head.compute_loss(out, label, epoch=epoch, n_epochs=cfg.epochs,
                                            class_weights=weights, **extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(parts["loss"])
            ces.append(float(weighted_ce(out.logits.detach(), label, weights)))
            if mining and "bag" in out.attention:
                attention = out.attention["bag"].detach().float().cpu().numpy()
                bag_weights[slide_id][bags.index] = attention * len(bags.index)
        val = None
        if len(val_ids):
            val = evaluate(head, data, val_ids, val_y, device=device, class_weights=weights)
        val_auc = auc(val_y, val.probs) if val is not None else math.nan
        score = -math.inf if val is None else (-val_auc if monitor == "auc" else val.loss)
        if math.isfinite(smoothed) and math.isfinite(score):  # exponential moving average over epochs
            score = cfg.smoothing * smoothed + (1 - cfg.smoothing) * score
        smoothed = score
        if score < best_score or val is None:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(head.state_dict())
        log = _EpochLog(epoch + 1, float(np.mean(losses)), float(np.mean(ces)), val.loss if val else math.nan,
                        val_auc, time.perf_counter() - tic)
        history.append(asdict(log))
        if progress is not None:
            info = {**context, **asdict(log), "n_epochs": cfg.epochs, "best_epoch": best_epoch + 1}
            progress("epoch", info)
        if epoch + 1 >= cfg.min_epochs and epoch - best_epoch >= cfg.patience:
            break
    return FoldResult(best_state, best_epoch + 1, epoch + 1, monitor, history, time.perf_counter() - start)
