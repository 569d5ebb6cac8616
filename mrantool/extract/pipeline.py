"""Extraction: slides -> bag regions (DataLoader workers) -> encoder (one pass: patches + cells) -> store.

The main process plans slides a few ahead in a thread (thumbnail, tissue, bag grid, lock), a batch sampler feeds
bag items slide after slide so workers are already reading the next slide while the current one is encoded, and a
writer thread streams finished batches into the store (a slide is never held whole in RAM). A slide becomes visible
only at its atomic commit; a bad slide is recorded in the store and the run goes on.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mrantool.encoders.registry import PatchEncoder
from mrantool.errors import FileSystemError, LockedError, MrantoolError
from mrantool.extract.dataset import BagItem, BagRegions, collate_bags
from mrantool.extract.inputs import SlideInput, id_problem
from mrantool.files import os_error_message
from mrantool.slide_ids import slide_id_problem
from mrantool.slides.mpp_table import MppTable
from mrantool.slides.reader import open_slide
from mrantool.store.fingerprint import file_fingerprint
from mrantool.store.reader import FeatureStore
from mrantool.tiling.presets import Preset
from mrantool.tiling.slide_plan import plan_slide

PLAN_AHEAD = 2  # slides planned ahead of the one being encoded
MAX_PENDING_WRITES = 4  # batches queued for the writer thread (bounds RAM)


@dataclass
class SlideResult:
    """What happened to one slide in a run."""

    slide_id: str
    path: Path
    status: str  # done | skipped (already complete) | busy (another extractor) | failed
    n_bags: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class ExtractReport:
    """The run's per-slide results and totals."""

    results: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0
    n_patches: int = 0

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


@dataclass
class _Planned:
    index: int
    slide: SlideInput
    slide_mpp: float
    coords: np.ndarray
    patch_tissue: np.ndarray
    provenance: dict[str, Any]
    lock: Any
    started: float


Progress = Callable[[str, dict[str, Any]], None]


def store_identity(preset: Preset, encoder: PatchEncoder, cells: bool = True) -> dict[str, Any]:
    """What makes two slides' features comparable: the encoder, its weights and transforms, and the geometry."""
    ident = encoder.identity()
    return {
        "encoder": ident["hub"] if ident["weights"].startswith("pretrained") else ident["arch"],
        "weights": ident["weights"],
        "transforms": {k: ident[k] for k in ("input_px", "mean", "std", "tokens", "feature_index", "model_kwargs")},
        "embed_dim": int(encoder.embed_dim),
        "geometry": preset.geometry.to_dict(),
        "preset": preset.name,
        "has_cells": cells,
    }


class Extractor:
    """Runs extraction for a list of slides into one store."""

    def __init__(
        self,
        store: FeatureStore,
        preset: Preset,
        encoder: PatchEncoder,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        workers: int = 2,
        slide_mpp: float | None = None,
        mpp_table: MppTable | None = None,
        min_tissue: float = 0.1,
        channels_last: bool = True,
        compile: bool = False,
        progress: Progress | None = None,
        provenance_extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.preset = preset
        self.geometry = preset.geometry
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self._forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder
        self.bags_per_batch = max(1, batch_size // self.geometry.n_patches)
        self.workers = workers
        self.slide_mpp = slide_mpp
        self.mpp_table = mpp_table
        self.min_tissue = min_tissue
        self.progress = progress or (lambda event, info: None)
        mean = torch.tensor(preset.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(preset.std, device=self.device).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean, std
        self.provenance_extra = provenance_extra or {}  # slide_id -> extra provenance keys

    # -- planning (runs in a helper thread, a few slides ahead) -------------------------------------------------
    def _plan(self, index: int, item: SlideInput) -> _Planned | SlideResult:
        started = time.perf_counter()
        problem = id_problem(item.slide_id, self.store.case_twin)
        if problem:
            return SlideResult(item.slide_id, item.path, "failed", message=problem)
        try:
            fingerprint = file_fingerprint(item.path)
        except OSError:
            return SlideResult(item.slide_id, item.path, "failed", message=f"{item.path} cannot be read; check it.")
        if self.store.is_complete(item.slide_id, fingerprint):
            return SlideResult(item.slide_id, item.path, "skipped", message="already complete")
        try:
            lock = self.store.try_lock(item.slide_id)
        except LockedError:
            lock = None
        if lock is None:
            return SlideResult(item.slide_id, item.path, "busy", message="another extractor holds its lock")
        given = item.mpp or self.slide_mpp
        explain = self.mpp_table.explain_missing(item.slide_id, item.path) if self.mpp_table else nullcontext()
        try:
            with explain, open_slide(item.path, mpp=given) as slide:
                sp = plan_slide(slide, self.geometry, self.min_tissue)
                provenance = {
                    "source": str(Path(item.path).resolve()),
                    "fingerprint": fingerprint,
                    "mpp": self.geometry.mpp,
                    "slide_mpp": slide.mpp,
                    "slide_mpp_source": "mpp table" if item.mpp else "--mpp" if given else "metadata",
                    "reader": slide.backend,
                    "level0_size": list(slide.dimensions),
                    "bag_size_l0": sp.plan.bag_size_l0,
                    "read_level": sp.read_level,
                    "n_candidate_bags": sp.plan.n_candidates,
                    "min_tissue": self.min_tissue,
                    "host": socket.gethostname(),
                }
                mpp = slide.mpp
        except MrantoolError as exc:
            lock.release()
            return SlideResult(item.slide_id, item.path, "failed", message=str(exc))
        except Exception as exc:  # an unexpected reader failure must not stop the run
            lock.release()
            return SlideResult(item.slide_id, item.path, "failed", message=f"{item.path}: {type(exc).__name__}: {exc}")
        provenance.update(self.provenance_extra.get(item.slide_id, {}))
        provenance["timings"] = {"plan_s": round(time.perf_counter() - started, 3)}
        return _Planned(index, item, mpp, sp.plan.coords, sp.plan.patch_tissue, provenance, lock, started)

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self, slides: list[SlideInput]) -> ExtractReport:
        self.progress("run_start", {"n_slides": len(slides)})
        report = ExtractReport()
        started = time.perf_counter()
        planned: dict[int, _Planned] = {}

        def batches() -> Iterator[list[BagItem]]:
            with ThreadPoolExecutor(1, thread_name_prefix="plan") as pool:
                futures: list[Future] = [pool.submit(self._plan, i, s) for i, s in enumerate(slides[:PLAN_AHEAD])]
                for i in range(len(slides)):
                    if i + PLAN_AHEAD < len(slides):
                        futures.append(pool.submit(self._plan, i + PLAN_AHEAD, slides[i + PLAN_AHEAD]))
                    outcome = futures[i].result()
                    futures[i] = None  # type: ignore[call-overload]
                    if isinstance(outcome, SlideResult):
                        if outcome.status == "failed" and slide_id_problem(outcome.slide_id) is None:
                            self.store.record_failure(outcome.slide_id, str(outcome.path), outcome.message)
                        report.results.append(outcome)
                        self.progress("slide_end", {"result": outcome})
                        continue
                    planned[i] = outcome
                    n = len(outcome.coords)
                    for start in range(0, n, self.bags_per_batch):
                        yield [
                            BagItem(i, b, int(outcome.coords[b, 0]), int(outcome.coords[b, 1]), outcome.slide_mpp)
                            for b in range(start, min(n, start + self.bags_per_batch))
                        ]

        dataset = BagRegions([s.path for s in slides], self.geometry)
        loader = DataLoader(
            dataset,
            batch_sampler=batches(),
            num_workers=self.workers,
            collate_fn=collate_bags,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            multiprocessing_context="fork" if self.workers else None,
        )
        writers: dict[int, Any] = {}
        try:
            self._loop(loader, planned, writers, report)
        except OSError as exc:  # a full disk or a store made read-only mid-run: stop, keep what is committed
            for index, writer in writers.items():
                writer.abort()
                planned[index].lock.release()
            raise FileSystemError(os_error_message(exc, "write to store", self.store.path)) from None
        report.seconds = time.perf_counter() - started
        return report

    def _loop(self, loader: DataLoader, planned: dict[int, _Planned], writers: dict[int, Any],
              report: ExtractReport) -> None:
        """Encode every batch and stream it to its slide's writer; commit each slide when its last bag is in."""
        written: dict[int, int] = {}
        failed: set[int] = set()
        with ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
            pending: list[Future] = []
            last_tick = time.perf_counter()  # a slide's time starts when the loader starts waiting for its bags
            for batch in loader:
                for item, message in batch["errors"]:
                    if item.slide_index not in failed:
                        failed.add(item.slide_index)
                        self._fail(planned[item.slide_index], writers.pop(item.slide_index, None), message, report)
                if batch["patches"] is None:
                    continue
                index = batch["items"][0].slide_index
                if index in failed:
                    continue
                p = planned[index]
                patch_emb, cell_emb = self._encode(batch["patches"])
                if index not in writers:
                    writers[index] = self.store.begin_slide(p.slide.slide_id, len(p.coords), p.provenance)
                    written[index] = 0
                    p.started = last_tick
                    self.progress("slide_start", {"slide_id": p.slide.slide_id, "n_bags": len(p.coords)})
                bag_ids = [it.bag_index for it in batch["items"]]
                start = bag_ids[0]
                pending.append(write_pool.submit(
                    writers[index].write, start, p.coords[start:start + len(bag_ids)],
                    p.patch_tissue[start:start + len(bag_ids)], patch_emb, cell_emb,
                ))
                pending = self._drain(pending, MAX_PENDING_WRITES)
                written[index] += len(bag_ids)
                report.n_patches += len(bag_ids) * self.geometry.n_patches
                self.progress("bags", {"n": len(bag_ids), "patches": len(bag_ids) * self.geometry.n_patches})
                if written[index] == len(p.coords):
                    pending = self._drain(pending, 0)
                    self._commit(p, writers.pop(index), report)
                last_tick = time.perf_counter()
            self._drain(pending, 0)

    @staticmethod
    def _drain(pending: list[Future], keep: int) -> list[Future]:
        while len(pending) > keep:
            pending.pop(0).result()
        return pending

    @torch.inference_mode()
    def _encode(self, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, P, h, w, 3) uint8 -> patch (B, P, D) and cell (B, P, C, D) float16 arrays."""
        b, p = patches.shape[:2]
        x = patches.to(self.device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2).float()
        px = self.preset.input_px
        if x.shape[-1] != px:
            x = torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            patch, cells = self._forward(x)
        patch = patch.float().reshape(b, p, -1).to(torch.float16).cpu().numpy()
        cells = cells.float().reshape(b, p, cells.shape[1], -1).to(torch.float16).cpu().numpy()
        return patch, cells

    def _commit(self, p: _Planned, writer: Any, report: ExtractReport) -> None:
        seconds = time.perf_counter() - p.started
        try:
            writer.commit(timings={**p.provenance["timings"], "encode_write_s": round(seconds, 3)})
        except MrantoolError as exc:
            self._fail(p, writer, str(exc), report)
            return
        p.lock.release()
        result = SlideResult(p.slide.slide_id, p.slide.path, "done", len(p.coords), seconds)
        report.results.append(result)
        self.progress("slide_end", {"result": result})

    def _fail(self, p: _Planned, writer: Any, message: str, report: ExtractReport) -> None:
        if writer is not None:
            writer.abort()
        self.store.record_failure(p.slide.slide_id, str(p.slide.path), message)
        p.lock.release()
        result = SlideResult(p.slide.slide_id, p.slide.path, "failed", message=message)
        report.results.append(result)
        self.progress("slide_end", {"result": result})
