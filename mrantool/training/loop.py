"""Training folds: several members (the folds of a CV, sweep variants) at once, slides in padded batches.

Every member trains exactly as it would alone: its own seeded order of slides, its own bag samples, optimiser
state, validation, early stopping and best-epoch copy; members only share the forward call of a step (see
`mrantool.training.batched`). With one slide per step (`batch_size` 1) this is standard MIL training.

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
import torch.nn.functional as F
from torch import Tensor

from mrantool.config import FitConfig
from mrantool.errors import ConfigError
from mrantool.models.base import MILHead, MILOutput, call_head, weighted_ce
from mrantool.training.batched.batches import Batch, Pick, Prefetcher, collate, fill
from mrantool.training.batched.stack import MemberStack, is_batched
from mrantool.training.data import MILData, sample_bags
from mrantool.training.metrics import auc

Progress = Callable[[str, dict[str, Any]], None]
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("loss", "auc")
SCHEDULES = ("constant", "cosine")
EVAL_BYTES = 256 * 2**20  # float32 bytes of one evaluation batch of slides (at least one slide)


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
    """adam | adamw | sgd (with momentum) at cfg.lr and cfg.weight_decay; `params` may be parameter groups
    with their own lr, weight_decay and momentum. Fused kernels (one pass per step) on CPU and CUDA."""
    groups = list(params)
    first = groups[0]["params"][0] if groups and isinstance(groups[0], dict) else (groups[0] if groups else None)
    fused = {"fused": True} if first is not None and first.device.type in ("cpu", "cuda") else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **fused)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")


def scheduled_lr(cfg: FitConfig, step: int, total_steps: int, lr: float | None = None) -> float:
    """The lr of a member's `step`-th optimiser step (0-based) for a parameter group starting at `lr`
    (default `cfg.lr`): `lr`, or with `lr_schedule = "cosine"` lr (1 + cos(pi step / total_steps)) / 2, from lr
    down to 0 over `total_steps` (torch's CosineAnnealingLR stepped after every optimiser step, in closed form,
    so each member of a group keeps its own count)."""
    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule == "constant":
        return lr
    if cfg.lr_schedule == "cosine":
        return lr * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))) / 2
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


@dataclass
class Member:
    """One model of a group trained together: a fold's head, slides, settings, seed and progress context.
    `params`: its optimiser parameter groups, each with its own "lr" (e.g. an encoder trained with its head);
    default: all of the head's parameters at `cfg.lr`."""

    head: MILHead
    train_ids: Sequence[str]
    train_y: np.ndarray
    val_ids: Sequence[str]
    val_y: np.ndarray
    cfg: FitConfig
    seed: int
    context: dict[str, Any] = field(default_factory=dict)
    params: list[dict[str, Any]] | None = None


def group_settings(cfg: FitConfig) -> tuple[Any, ...]:
    """Settings that members trained together must share (the rest, e.g. lr, seed, folds, may differ)."""
    return (cfg.optimizer, cfg.epochs, cfg.batch_size)


@torch.no_grad()
def evaluate(head: MILHead, data: MILData, slide_ids: Sequence[str], y: np.ndarray | None = None, *,
             device: torch.device | str = "cpu", class_weights: Tensor | None = None,
             on_output: Callable[[str, MILOutput], None] | None = None,
             batch_bytes: int = EVAL_BYTES) -> Evaluation:
    """Predict every bag of each slide in eval mode, slides of similar size batched up to `batch_bytes`;
    `on_output(slide_id, out)` sees each slide's raw output with that slide's own shapes."""
    device = torch.device(device)
    was_training = head.training
    head.eval()
    probs = np.zeros((len(slide_ids), head.n_classes), dtype=np.float64)
    losses = np.zeros(len(slide_ids))
    weights = None if class_weights is None else class_weights.to(device)
    cells = head.needs_cells and data.cells
    chunks = _eval_chunks(data, slide_ids, batch_bytes if is_batched(head) else 0)
    labels = np.zeros(len(slide_ids), np.int64) if y is None else np.asarray(y, np.int64)

    def make(chunk: list[int]) -> Batch:
        return collate(data, [[Pick(slide_ids[i], None, i, int(labels[i])) for i in chunk]], device, cells)

    try:
        for batch in Prefetcher(make, chunks, threaded=device.type == "cuda" or not data.in_ram()):
            index = [pick.position for pick in batch.picks[0]]
            patches, mask = batch.patches[0], batch.mask[0]
            cell_values = None if batch.cells is None else batch.cells[0]
            cell_mask = None if batch.cell_mask is None else batch.cell_mask[0]
            if is_batched(head):
                out = call_head(head, patches, cell_values, mask, cell_mask)
            else:
                out = call_head(head, patches[0], None if cell_values is None else cell_values[0], mask[0],
                                None if cell_mask is None else cell_mask[0])
                out = MILOutput(out.logits[None], {k: v[None] for k, v in out.attention.items()},
                                {k: v[None] for k, v in out.aux.items()})
            logits = out.logits.float()
            probs[index] = logits.softmax(-1).cpu().numpy()
            if y is not None:
                losses[index] = weighted_ce(logits, batch.labels[0], weights, reduction="none").cpu().numpy()
            if on_output is not None:
                for j, i in enumerate(index):
                    on_output(slide_ids[i], _crop(out.slide(j), int(batch.n_bags[0, j]),
                                                  int(batch.n_patches[0, j])))
    finally:
        head.train(was_training)
    return Evaluation(probs, float(losses.mean()) if y is not None and len(slide_ids) else math.nan)


def _eval_chunks(data: MILData, slide_ids: Sequence[str], budget: int) -> list[list[int]]:
    """Slide positions grouped by size so that each padded group stays within `budget` bytes (0: one each)."""
    if budget <= 0:
        return [[i] for i in range(len(slide_ids))]
    order = sorted(range(len(slide_ids)), key=lambda i: data.n_bags(slide_ids[i]))
    sizes = {i: 4 * data.n_bags(slide_ids[i]) * data.bag_values(slide_ids[i]) for i in order}
    chunks: list[list[int]] = []
    for i in order:  # ascending size: the newest slide is the largest of its chunk
        if chunks and (len(chunks[-1]) + 1) * sizes[i] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _crop(out: MILOutput, n_bags: int, n_patches: int) -> MILOutput:
    """A slide's output without the padding of its batch (attention and aux cut to its bags and patches)."""
    def cut(value: Tensor) -> Tensor:
        value = value[:n_bags] if value.dim() >= 1 else value
        return value[:, :n_patches] if value.dim() >= 2 else value

    return MILOutput(out.logits, {k: cut(v) for k, v in out.attention.items()}, out.aux)


def train_fold(head: MILHead, data: MILData, train_ids: Sequence[str], train_y: np.ndarray,
               val_ids: Sequence[str], val_y: np.ndarray, cfg: FitConfig, *, seed: int,
               device: torch.device | str = "cpu", progress: Progress | None = None,
               context: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None) -> FoldResult:
    """Train `head` in place on one fold (`train_members` with one member); return the best epoch's weights.
    `params`: optimiser parameter groups with their own lr (default: all of the head's parameters at cfg.lr)."""
    member = Member(head, train_ids, train_y, val_ids, val_y, cfg, seed, context or {}, params)
    return train_members([member], data, device=device, progress=progress)[0]


def train_members(members: Sequence[Member], data: MILData, *, device: torch.device | str = "cpu",
                  progress: Progress | None = None) -> list[FoldResult]:
    """Train every member's head in place, together; return each one's best epoch's weights (deep copies).

    Each epoch visits a member's training slides in a fresh random order from its own seed, `batch_size`
    slides per step (padded with masks), with at most `max_bags` random bags of a larger slide. The best
    epoch has the lowest validation loss (or highest validation AUC with monitor="auc"; loss when the
    validation slides have one class), after an exponential moving average with weight `smoothing` on the
    past epochs; a member stops after `patience` epochs without improvement once `min_epochs` have run, and
    sits out the rest. With `weight_ema` each member also keeps an exponential moving average of its weights
    (updated after each of its steps), and that average, not the live weights, is validated and kept. Without
    validation slides the last epoch is kept. `lr_schedule = "cosine"` anneals a member's lr per step to 0 over
    `epochs` (`scheduled_lr`). With bag mining, the slide head's bag attention x n_bags of a slide's last step
    becomes that slide's bag weights for its next step (next epoch). Heads without the batched contract train
    one member at a time, one slide per step.
    """
    if not members:
        return []
    if not is_batched(members[0].head) and len(members) > 1:
        return [result for m in members for result in train_members([m], data, device=device, progress=progress)]
    if len({group_settings(m.cfg) for m in members}) > 1:
        raise ValueError("members trained together must share optimizer, epochs and batch_size")
    start = time.perf_counter()
    device = torch.device(device)
    for m in members:
        m.head.to(device)
    stack = MemberStack([m.head for m in members])
    cfg0 = members[0].cfg
    # slides per step; never more than the largest training set, which would only add fillers
    size = min(cfg0.batch_size, max(len(m.train_ids) for m in members)) if stack.batched else 1
    scheduled = any(m.cfg.lr_schedule != "constant" for m in members)
    groups, owned = _param_groups(members, stack, per_member=scheduled)
    optimizer = make_optimizer(cfg0, groups)
    states = [_MemberState(m, data, device) for m in members]
    cells = data.cells and members[0].head.needs_cells
    class_w = torch.stack([state.class_weights for state in states])
    for epoch in range(cfg0.epochs):
        active = [g for g, state in enumerate(states) if not state.done]
        if not active:
            break
        tic = time.perf_counter()
        stack.train(True)
        plans = {g: states[g].plan_epoch(data, size) for g in active}
        steps = [[(g, plans[g][t]) for g in active if t < len(plans[g])] for t in range(max(map(len, plans.values())))]
        make = lambda step: collate(data, [fill(picks, size) for _, picks in step], device, cells)  # noqa: E731
        threaded = device.type == "cuda" or not data.in_ram()
        record = _EpochRecord()
        mined: list[tuple[list[int], list[list[Pick]], Tensor]] = []
        for step, batch in zip(steps, Prefetcher(make, steps, threaded=threaded), strict=True):
            chosen = [g for g, _ in step]
            bag_weights = _bag_weights(states, chosen, batch, device)
            weights = class_w if len(chosen) == len(states) else class_w[chosen]
            loss, logits, bag = stack(chosen, batch.patches, batch.cells, batch.mask, batch.labels, weights,
                                      bag_weights, epoch, cfg0.epochs, cell_mask=batch.cell_mask)
            w = batch.weights
            per_member = loss.mean(1) if batch.full else (loss * w).sum(1) / w.sum(1)
            optimizer.zero_grad(set_to_none=True)
            per_member.sum().backward()
            if scheduled:
                for g in chosen:
                    step_index, total = states[g].next_step(size)
                    for group, lr in owned[g]:
                        group["lr"] = scheduled_lr(states[g].cfg, step_index, total, lr)
            optimizer.step()
            for g in chosen:
                states[g].average_weights()
            record.add(chosen, loss.detach(), logits, batch.labels, None if batch.full else w)
            if bag_weights is not None:
                mined.append((chosen, batch.picks, bag))
        _keep_bag_attention(states, mined)  # each slide comes once per epoch: its weights serve the next one
        sums = record.sums(len(members), class_w)
        for g in active:
            states[g].end_epoch(epoch, sums[g], data, device, time.perf_counter() - tic, start, progress)
    return [state.result() for state in states]


class _EpochRecord:
    """Each trained slide's loss, logits and label of an epoch, summed per member once at the epoch's end."""

    def __init__(self) -> None:
        self.members: list[np.ndarray] = []
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []

    def add(self, chosen: Sequence[int], loss: Tensor, logits: Tensor, labels: Tensor, weights: Tensor | None) -> None:
        self.members.append(np.repeat(np.asarray(chosen), loss.shape[1]))
        self.parts.append((loss, logits, labels, weights))

    def sums(self, n_members: int, class_w: Tensor) -> np.ndarray:
        """(members, 3): sums of the training loss and class-weighted cross-entropy, and slide counts."""
        member = torch.as_tensor(np.concatenate(self.members), device=class_w.device)
        loss = torch.cat([p[0].reshape(-1) for p in self.parts])
        logits = torch.cat([p[1].reshape(-1, p[1].shape[-1]) for p in self.parts]).float()
        labels = torch.cat([p[2].reshape(-1) for p in self.parts])
        w = torch.cat([torch.ones(p[0].numel(), device=loss.device) if p[3] is None else p[3].reshape(-1)
                       for p in self.parts])
        ce = F.cross_entropy(logits, labels, reduction="none") * class_w[member, labels]
        owner = F.one_hot(member, n_members).to(loss.dtype)  # a matmul: deterministic on CUDA, unlike index_add
        return (owner.T @ torch.stack([loss * w, ce * w, w], 1)).cpu().numpy()


def _param_groups(members: Sequence[Member], stack: MemberStack, per_member: bool,
                  ) -> tuple[list[dict[str, Any]], list[list[tuple[dict[str, Any], float]]]]:
    """Optimiser parameter groups: one per member part (its whole head, or each of its own `params` groups) when
    lrs are scheduled per member, else one per distinct (lr, weight_decay, momentum), so that the members of one
    fit share a group and a step is one fused update; a member outside a step has no gradients and is left
    alone. Also, per member, its groups with their starting lrs (what a schedule scales)."""
    groups: dict[Any, dict[str, Any]] = {}
    owned: list[list[tuple[dict[str, Any], float]]] = []
    for member, m in enumerate(members):
        cfg = m.cfg
        parts = m.params if m.params is not None else [{"params": stack.parameters(member), "lr": cfg.lr}]
        owned.append([])
        for i, part in enumerate(parts):
            lr = part.get("lr", cfg.lr)
            key = (member, i) if per_member else (lr, cfg.weight_decay, cfg.momentum)
            group = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": cfg.weight_decay})
            if cfg.optimizer == "sgd":
                group["momentum"] = cfg.momentum
            group["params"] += list(part["params"])
            owned[member].append((group, lr))
    return list(groups.values()), owned


def _bag_weights(states: Sequence[_MemberState], chosen: Sequence[int], batch: Batch,
                 device: torch.device) -> Tensor | None:
    """(G, S, n_bags) bag-mining weights of the step's slides (1 on padding), or None without mining."""
    if not any(states[g].mining for g in chosen):
        return None
    weights = np.ones(batch.mask.shape[:3], np.float32)
    for i, (g, row) in enumerate(zip(chosen, batch.picks, strict=True)):
        if states[g].mining:
            for j, pick in enumerate(row):
                slide = states[g].bag_weights.setdefault(pick.slide_id, np.ones(states[g].n_bags(pick), np.float32))
                weights[i, j, :len(pick.index)] = slide[pick.index]
    host = torch.from_numpy(weights)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _keep_bag_attention(states: Sequence[_MemberState], mined: list[tuple[list[int], list[list[Pick]], Tensor]],
                        ) -> None:
    """Each step's bag attention x bags sampled becomes each real slide's bag weights for its next step."""
    for chosen, picks, bag in mined:
        attention = bag.float().cpu().numpy()
        for i, (g, row) in enumerate(zip(chosen, picks, strict=True)):
            if states[g].mining:
                for j, pick in enumerate(row):
                    if pick.real:
                        n = len(pick.index)
                        states[g].bag_weights[pick.slide_id][pick.index] = attention[i, j, :n] * n


class _MemberState:
    """A member's own randomness, class weights, bag weights, best epoch and history while a group trains."""

    def __init__(self, member: Member, data: MILData, device: torch.device) -> None:
        cfg, head = member.cfg, member.head
        self.member, self.cfg = member, cfg
        self.rng = np.random.default_rng(member.seed)
        weights = class_weights(member.train_y, head.n_classes) if cfg.class_weights else torch.ones(head.n_classes)
        self.class_weights = weights.to(device)
        self.mining = cfg.bag_mining and uses_bag_weights(head)
        self.bag_weights: dict[str, np.ndarray] = {}
        self.monitor = cfg.monitor if cfg.monitor == "loss" or len(set(np.asarray(member.val_y).tolist())) > 1 \
            else "loss"
        self.best_score, self.best_epoch, self.smoothed = math.inf, -1, math.nan
        self.steps = 0
        self.best_state = copy.deepcopy(head.state_dict())
        self.averages = 0
        self.averaged = ({k: v.detach().clone() for k, v in head.state_dict().items() if v.is_floating_point()}
                         if cfg.weight_ema > 0 else None)
        self.history: list[dict[str, float]] = []
        self.epochs_run, self.seconds, self.done = 0, 0.0, False
        self._n_bags = data.n_bags

    def n_bags(self, pick: Pick) -> int:
        return self._n_bags(pick.slide_id)

    def next_step(self, size: int) -> tuple[int, int]:
        """This member's next optimiser step (0-based) and its total steps (its schedule counts its own)."""
        self.steps += 1
        return self.steps - 1, self.cfg.epochs * math.ceil(len(self.member.train_ids) / size)

    def average_weights(self) -> None:
        """After an optimiser step: move the weight average towards the live weights, with decay
        min(weight_ema, (1 + n) / (10 + n)) at the n-th step, so that early averages are not held at the init."""
        if self.averaged is None:
            return
        decay = min(self.cfg.weight_ema, (1 + self.averages) / (10 + self.averages))
        self.averages += 1
        live = self.member.head.state_dict()
        with torch.no_grad():
            keys = list(self.averaged)
            torch._foreach_lerp_([self.averaged[k] for k in keys], [live[k].detach() for k in keys], 1 - decay)

    @contextmanager
    def validated_weights(self) -> Iterator[None]:
        """The weights to validate and keep: the live ones, or (weight_ema) their average, swapped in for now."""
        if self.averaged is None:
            yield
            return
        head = self.member.head
        live = {k: v.detach().clone() for k, v in head.state_dict().items() if k in self.averaged}
        head.load_state_dict(self.averaged, strict=False)
        try:
            yield
        finally:
            head.load_state_dict(live, strict=False)

    def plan_epoch(self, data: MILData, size: int) -> list[list[Pick]]:
        """This epoch's steps: slides in a fresh random order, `size` per step, bags sampled per slide."""
        ids, max_bags = self.member.train_ids, self.cfg.max_bags
        picks = []
        for i in self.rng.permutation(len(ids)):
            n = data.n_bags(ids[i])
            index = sample_bags(n, max_bags, self.rng)
            picks.append(Pick(ids[i], np.arange(n) if index is None else index, int(i), int(self.member.train_y[i])))
        return [picks[k:k + size] for k in range(0, len(picks), size)]

    def end_epoch(self, epoch: int, sums: np.ndarray, data: MILData, device: torch.device, seconds: float,
                  start: float, progress: Progress | None) -> None:
        """Validate, keep the best weights, log, and decide whether this member stops."""
        member, cfg = self.member, self.cfg
        val = None
        with self.validated_weights():
            if len(member.val_ids):
                val = evaluate(member.head, data, member.val_ids, member.val_y, device=device,
                               class_weights=self.class_weights if cfg.class_weights else None)
            val_auc = auc(member.val_y, val.probs) if val is not None else math.nan
            score = -math.inf if val is None else (-val_auc if self.monitor == "auc" else val.loss)
            if math.isfinite(self.smoothed) and math.isfinite(score):  # exponential moving average over epochs
                score = cfg.smoothing * self.smoothed + (1 - cfg.smoothing) * score
            self.smoothed = score
            if score < self.best_score or val is None:
                self.best_score, self.best_epoch = score, epoch
                self.best_state = copy.deepcopy(member.head.state_dict())
        n = max(sums[2], 1.0)
        log = _EpochLog(epoch + 1, float(sums[0] / n), float(sums[1] / n), val.loss if val else math.nan, val_auc,
                        seconds)
        self.history.append(asdict(log))
        if progress is not None:
            progress("epoch", {**member.context, **asdict(log), "n_epochs": cfg.epochs,
                               "best_epoch": self.best_epoch + 1})
        self.epochs_run = epoch + 1
        stop = epoch + 1 >= cfg.min_epochs and epoch - self.best_epoch >= cfg.patience
        if stop or epoch + 1 >= cfg.epochs:
            self.done, self.seconds = True, time.perf_counter() - start

    def result(self) -> FoldResult:
        return FoldResult(self.best_state, self.best_epoch + 1, self.epochs_run, self.monitor, self.history,
                          self.seconds)
