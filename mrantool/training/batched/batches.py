"""Padded batches of slides for several members at once, prepared ahead in a background thread.

A step gives each member the same number of slides (a short batch is filled with copies that weigh 0). Bags
come from `MILData.read` in the source's dtype (float16 from a store) and stay float16 until the device: on
CUDA everything a step needs (features, masks, labels, weights) is gathered into pinned host memory and copied
without blocking, so the training loop never waits for a host-to-device copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from mrantool.training.data import MILData

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Pick:
    """One slide of a batch: its bags `index` (None: all), its position in the member's list, its label (0 when
    unknown) and whether it counts (False for the copies that fill a short batch)."""

    slide_id: str
    index: np.ndarray | None
    position: int
    label: int = 0
    real: bool = True


@dataclass
class Batch:
    """Tensors on the device with leading (members, slides) dimensions; `picks[g][s]` says what is where."""

    patches: Tensor  # (G, S, n_bags, P, D) float32 (or the source's own values, e.g. uint8 pixels (..., h, w, 3))
    cells: Tensor | None  # (G, S, n_bags, P, C, D) float32
    mask: Tensor  # (G, S, n_bags, P) bool; padding False
    cell_mask: Tensor | None  # (G, S, n_bags, P, C) bool when cells are loaded and some slide masks cells
    labels: Tensor  # (G, S) int64
    weights: Tensor  # (G, S) 1 for real slides, 0 for fillers
    full: bool  # no fillers: every weight is 1
    picks: list[list[Pick]]
    n_bags: np.ndarray  # (G, S) bags of each slide in the batch
    n_patches: np.ndarray  # (G, S) patches per bag of each slide (differs only between in-memory bags)


def fill(picks: Sequence[Pick], size: int) -> list[Pick]:
    """`picks` completed to `size` with copies of the first one that do not count."""
    first = picks[0]
    return list(picks) + [Pick(first.slide_id, first.index, first.position, first.label, False)] * (size - len(picks))


def collate(data: MILData, picks: Sequence[Sequence[Pick]], device: torch.device, cells: bool) -> Batch:
    """Read and pad the slides of every member (all with the same number of picks) into one `Batch`."""
    reads = [[_read(data, pick, cells) for pick in row] for row in picks]
    g, s = len(reads), len(reads[0])
    n_bags = np.array([[r[0].shape[0] for r in row] for row in reads])
    n_patches = np.array([[r[0].shape[1] for r in row] for row in reads])
    item = reads[0][0][0].shape[2:]  # what one patch is: (D,), or (h, w, 3) pixels
    dtype = np.result_type(*(r[0].dtype for row in reads for r in row))
    pin = device.type == "cuda"
    patches = _zeros((g, s, int(n_bags.max()), int(n_patches.max()), *item), dtype, pin)
    mask = _zeros(patches.shape[:4], np.bool_, pin)
    cell_array = cell_mask = None
    if reads[0][0][1] is not None:
        cell_array = _zeros((*patches.shape[:4], *reads[0][0][1].shape[2:]), dtype, pin)
        masks = [r[3] for row in reads for r in row if r[3] is not None]
        if masks:  # bool flags, or float tissue fractions (tissue_weights)
            cell_mask = _zeros(cell_array.shape[:5], np.result_type(*masks), pin)
    for i, row in enumerate(reads):
        for j, (x, c, m, cm) in enumerate(row):
            n, p = x.shape[:2]
            patches.numpy()[i, j, :n, :p] = x
            mask.numpy()[i, j, :n, :p] = m
            if cell_array is not None:
                cell_array.numpy()[i, j, :n, :p] = c
            if cell_mask is not None:
                cell_mask.numpy()[i, j, :n, :p] = True if cm is None else cm
    labels, weights = _zeros((g, s), np.int64, pin), _zeros((g, s), np.float32, pin)
    labels.numpy()[:] = [[pick.label for pick in row] for row in picks]
    weights.numpy()[:] = [[pick.real for pick in row] for row in picks]
    return Batch(patches=_to(patches, device), cells=None if cell_array is None else _to(cell_array, device),
                 mask=mask.to(device, non_blocking=pin),
                 cell_mask=None if cell_mask is None else cell_mask.to(device, non_blocking=pin),
                 labels=labels.to(device, non_blocking=pin),
                 weights=weights.to(device, non_blocking=pin), full=all(p.real for row in picks for p in row),
                 picks=[list(row) for row in picks], n_bags=n_bags, n_patches=n_patches)


def _read(data: MILData, pick: Pick,
          cells: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    index = np.arange(data.n_bags(pick.slide_id)) if pick.index is None else pick.index
    patches, cell_values = data.read(pick.slide_id, index, cells=cells)
    cell_mask = None if cell_values is None else data.cell_mask(pick.slide_id)
    return patches, cell_values, data.mask(pick.slide_id)[index], None if cell_mask is None else cell_mask[index]


def _zeros(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> Tensor:
    """A zeroed host tensor (pinned for CUDA copies) whose `.numpy()` view is filled in place."""
    return torch.zeros(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=pin)


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy to the device without blocking from pinned memory, then float32 there (features; integer pixels
    stay as they are, 4x smaller, for the model that normalises them)."""
    tensor = tensor.to(device, non_blocking=device.type == "cuda")
    return tensor.float() if tensor.is_floating_point() else tensor


class Prefetcher(Generic[T, R]):
    """`make(item)` for each item of `items`, computed `depth` items ahead in a daemon thread, yielded in order.

    An exception in the thread is raised at the consumer's next item; closing early (break) stops the thread.
    With `threaded` False the items are made in the consumer's thread: for cheap items (bags already in RAM
    on a CPU) the hand-over between threads would cost more than it saves.
    """

    def __init__(self, make: Callable[[T], R], items: Sequence[T], depth: int = 2, threaded: bool = True) -> None:
        self.make, self.items, self.threaded = make, list(items), threaded
        self.queue: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="mrantool-prefetch")

    def _run(self) -> None:
        for item in self.items:
            if self.stop.is_set():
                return
            try:
                result: tuple[bool, object] = (True, self.make(item))
            except BaseException as exc:  # handed to the consumer
                result = (False, exc)
            while not self.stop.is_set():
                try:
                    self.queue.put(result, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not result[0]:
                return

    def __iter__(self) -> Iterator[R]:
        if not self.threaded:
            yield from map(self.make, self.items)
            return
        self.thread.start()
        try:
            for _ in self.items:
                ok, value = self.queue.get()
                if not ok:
                    raise value  # type: ignore[misc]
                yield value  # type: ignore[misc]
        finally:
            self.stop.set()
            self.thread.join()
