"""What every executor shares: the per-slide ledger (skip, lock, re-check, commit or record, release), the slide
planning step, the batch encoder and the run report. An executor only decides where reading and encoding run.

Executor interface: `run(slides: list[SlideInput]) -> ExtractReport`, emitting progress events run_start
{n_slides}, slide_start {slide_id, n_bags}, bags {n, patches, node}, slide_end {result}.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mrantool.encoders.registry import PatchEncoder
from mrantool.errors import FileSystemError, MrantoolError
from mrantool.extract.inputs import SlideInput, id_problem
from mrantool.files import os_error_message
from mrantool.slide_ids import slide_id_problem
from mrantool.slides.cache import SlideCache, remote_fingerprint
from mrantool.slides.mpp_table import MppTable
from mrantool.slides.reader import open_slide
from mrantool.store.fingerprint import file_fingerprint
from mrantool.store.locks import SlideLock
from mrantool.store.reader import FeatureStore
from mrantool.store.schema import hostname
from mrantool.tiling.presets import Geometry, Preset
from mrantool.tiling.slide_plan import plan_slide
from mrantool.urls import is_remote

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class SlideResult:
    """What happened to one slide in a run."""

    slide_id: str
    path: Path | str
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
    interrupted: bool = False

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def busy(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "busy"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


class Executor(Protocol):
    """Runs extraction of a list of slides into one store."""

    def run(self, slides: list[SlideInput]) -> ExtractReport: ...


@dataclass
class Claim:
    """A slide this run holds the lock of and will extract."""

    index: int
    slide: SlideInput
    fingerprint: dict[str, Any]
    lock: SlideLock
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Plan:
    """A slide's bags and provenance, measured on its thumbnail."""

    slide_mpp: float
    coords: np.ndarray
    patch_tissue: np.ndarray
    cell_tissue: np.ndarray
    provenance: dict[str, Any]


def source_fingerprint(source: str | Path) -> dict[str, Any]:
    """{size, etag} of a slide on object storage, {size, mtime_ns, sha256_first_mib} of a local one."""
    return remote_fingerprint(str(source)) if is_remote(source) else file_fingerprint(source)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done (main thread only), where an interrupt would leave a thread writing
    while the clean-up that follows (abort, abandon the attempt) deletes the attempt, leaving half of it behind:
    zarr runs a store call as a coroutine on its own I/O thread, which goes on when the waiting main thread is
    interrupted; a thread pool's first submit starts its worker, which an interrupted start leaves unjoined."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def store_write_error(exc: OSError, store: FeatureStore) -> FileSystemError:
    """An OS failure while writing the store (a full disk, a store made read-only) as the one sentence that stops
    the run: the slides committed before it are kept."""
    return FileSystemError(os_error_message(exc, "write to store", store.path))


def plan_source(slide: SlideInput, fingerprint: dict[str, Any], geometry: Geometry, *, cache: SlideCache,
                slide_mpp: float | None, min_tissue: float, mpp_table: MppTable | None = None,
                extra: dict[str, Any] | None = None) -> Plan:
    """Fetch the slide (remote slides go through the cache), find its tissue and place its bags. The slide's own
    mpp (from `--mpp-csv`) wins over `slide_mpp` (`--mpp`), which wins over the file's metadata. `extra`: more
    provenance keys for this slide (e.g. labels_seen_by_encoder)."""
    started = time.perf_counter()
    local = cache.fetch(slide.path, fingerprint)
    given = slide.mpp or slide_mpp
    explain = mpp_table.explain_missing(slide.slide_id, slide.path) if mpp_table else nullcontext()
    with explain, open_slide(local, mpp=given) as opened:
        sp = plan_slide(opened, geometry, min_tissue)
        provenance = {
            "source": str(slide.path) if is_remote(slide.path) else str(Path(slide.path).resolve()),
            "fingerprint": fingerprint, "mpp": geometry.mpp, "slide_mpp": opened.mpp,
            "slide_mpp_source": "mpp table" if slide.mpp else "--mpp" if given else "metadata",
            "reader": opened.backend, "level0_size": list(opened.dimensions), "bag_size_l0": sp.plan.bag_size_l0,
            "read_level": sp.read_level, "n_candidate_bags": sp.plan.n_candidates, "min_tissue": min_tissue,
            "host": hostname(), **(extra or {}), "timings": {"plan_s": round(time.perf_counter() - started, 3)},
        }
        return Plan(opened.mpp, sp.plan.coords, sp.plan.patch_tissue, sp.plan.cell_tissue, provenance)


class Ledger:
    """The per-slide protocol every executor follows, written once.

    claim(): fail a slide whose id cannot go into the store (mrantool.slide_ids; recorded in the store only when
    the id can name a failure record); skip a slide already complete (and whole) for this file; take its lock
    (busy when another extractor holds it); re-check completeness under the lock (the other extractor may have
    committed it meanwhile). done() / fail() release the lock after the commit or after recording the failure;
    close() aborts open writers and releases every lock still held (an interrupted run leaves neither locks nor
    staging).
    """

    def __init__(self, store: FeatureStore, report: ExtractReport, progress: Progress) -> None:
        self.store = store
        self.report = report
        self.progress = progress
        self.held: dict[int, Claim] = {}
        self.writers: dict[int, Any] = {}

    def _end(self, result: SlideResult) -> SlideResult:
        self.report.results.append(result)
        self.progress("slide_end", {"result": result})
        return result

    def claim(self, index: int, slide: SlideInput) -> Claim | None:
        """A Claim, or None after reporting the slide as skipped, busy or failed."""
        problem = id_problem(slide.slide_id, self.store.case_twin)
        if problem:
            if slide_id_problem(slide.slide_id) is None:
                self.store.record_failure(slide.slide_id, str(slide.path), problem)
            self._end(SlideResult(slide.slide_id, slide.path, "failed", message=problem))
            return None
        try:
            fingerprint = source_fingerprint(slide.path)
        except MrantoolError as exc:
            self.store.record_failure(slide.slide_id, str(slide.path), str(exc))
            self._end(SlideResult(slide.slide_id, slide.path, "failed", message=str(exc)))
            return None
        if self.store.is_complete(slide.slide_id, fingerprint):
            self._end(SlideResult(slide.slide_id, slide.path, "skipped", message="already complete"))
            return None
        lock = self.store.try_lock(slide.slide_id)
        if lock is None:
            self._end(SlideResult(slide.slide_id, slide.path, "busy", message="another extractor holds its lock"))
            return None
        if self.store.is_complete(slide.slide_id, fingerprint):  # committed by another extractor meanwhile
            lock.release()
            self._end(SlideResult(slide.slide_id, slide.path, "skipped", message="completed by another extractor"))
            return None
        claim = Claim(index, slide, fingerprint, lock)
        self.held[index] = claim
        return claim

    def begin(self, claim: Claim, plan: Plan) -> Any:
        """A writer for the claimed slide (local executors); close() aborts it if the run stops."""
        writer = self.store.begin_slide(claim.slide.slide_id, len(plan.coords), plan.provenance, lock=claim.lock)
        self.writers[claim.index] = writer
        return writer

    def done(self, claim: Claim, n_bags: int, seconds: float) -> SlideResult:
        """The slide was committed: release its lock."""
        self.writers.pop(claim.index, None)
        self.held.pop(claim.index, None)
        claim.lock.release()
        return self._end(SlideResult(claim.slide.slide_id, claim.slide.path, "done", n_bags, seconds))

    def fail(self, claim: Claim, message: str) -> SlideResult:
        """Abort the slide's writer, record the failure in the store, release the lock."""
        writer = self.writers.pop(claim.index, None)
        if writer is not None:
            writer.abort()
        self.held.pop(claim.index, None)
        self.store.record_failure(claim.slide.slide_id, str(claim.slide.path), message)
        claim.lock.release()
        return self._end(SlideResult(claim.slide.slide_id, claim.slide.path, "failed", message=message))

    def close(self) -> None:
        """Abort every open writer and release every lock still held (after an interrupt or a crash)."""
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        for claim in self.held.values():
            self.store.backend.abandon_attempts(claim.slide.slide_id)
            claim.lock.release()
        self.held.clear()


class BatchEncoder:
    """Bag patches (B, P, h, w, 3) uint8 -> patch (B, P, D) and cell (B, P, C, D) float16 arrays, one forward."""

    def __init__(self, encoder: PatchEncoder, preset: Preset, device: str = "cpu", channels_last: bool = True,
                 compile: bool = False) -> None:
        self.device = torch.device(device)
        self.preset = preset
        self.encoder = encoder.eval().to(self.device)
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self._forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder
        self._mean = torch.tensor(preset.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(preset.std, device=self.device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
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
