"""The local executor: slides -> bag regions (DataLoader workers) -> encoder (one pass: patches + cells) -> store.

The main process plans slides a few ahead in a thread (fingerprint, lock, thumbnail, tissue, bag grid), a batch
sampler feeds bag items slide after slide so workers are already reading the next slide while the current one is
encoded, and a writer thread streams finished batches into the store (a slide is never held whole in RAM). A
slide becomes visible only at its atomic commit; a bad slide is recorded in the store and the run goes on. A full
disk or a store made read-only stops the run with one sentence; the slides committed before are kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from mrantool.encoders.registry import PatchEncoder
from mrantool.errors import MrantoolError
from mrantool.extract.dataset import BagItem, BagRegions, collate_bags
from mrantool.extract.executors.base import (
    BatchEncoder,
    Claim,
    ExtractReport,
    Ledger,
    Plan,
    Progress,
    plan_source,
    store_write_error,
    uninterrupted,
)
from mrantool.extract.inputs import SlideInput
from mrantool.slides.cache import SlideCache
from mrantool.slides.mpp_table import MppTable
from mrantool.store.reader import FeatureStore
from mrantool.store.schema import hostname
from mrantool.tiling.presets import Preset

PLAN_AHEAD = 2  # slides planned ahead of the one being encoded
MAX_PENDING_WRITES = 4  # batches queued for the writer thread (bounds RAM)


class LocalExecutor:
    """Runs extraction for a list of slides into one store, in this process and its DataLoader workers."""

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
        cache: SlideCache | None = None,
        progress: Progress | None = None,
        provenance_extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.preset = preset
        self.geometry = preset.geometry
        self.encode = BatchEncoder(encoder, preset, device, channels_last, compile)
        self.bags_per_batch = max(1, batch_size // self.geometry.n_patches)
        self.workers = workers
        self.slide_mpp = slide_mpp
        self.mpp_table = mpp_table
        self.min_tissue = min_tissue
        self.cache = cache or SlideCache()
        self.progress = progress or (lambda event, info: None)
        self.provenance_extra = provenance_extra or {}  # slide_id -> extra provenance keys

    def _plan(self, ledger: Ledger, index: int, item: SlideInput) -> tuple[Claim, Plan] | None:
        claim = ledger.claim(index, item)
        if claim is None:
            return None
        try:
            return claim, plan_source(item, claim.fingerprint, self.geometry, cache=self.cache,
                                      slide_mpp=self.slide_mpp, min_tissue=self.min_tissue, mpp_table=self.mpp_table,
                                      extra=self.provenance_extra.get(item.slide_id))
        except MrantoolError as exc:
            ledger.fail(claim, str(exc))
        except Exception as exc:  # an unexpected reader failure must not stop the run
            ledger.fail(claim, f"{item.path}: {type(exc).__name__}: {exc}")
        return None

    def run(self, slides: list[SlideInput]) -> ExtractReport:
        self.progress("run_start", {"n_slides": len(slides)})
        report = ExtractReport()
        ledger = Ledger(self.store, report, self.progress)
        started = time.perf_counter()
        try:
            self._run(slides, ledger, report)
        except KeyboardInterrupt:
            report.interrupted = True
        except OSError as exc:  # a full disk or a store made read-only mid-run: stop, keep what is committed
            raise store_write_error(exc, self.store) from None
        finally:
            ledger.close()
        report.seconds = time.perf_counter() - started
        return report

    def _run(self, slides: list[SlideInput], ledger: Ledger, report: ExtractReport) -> None:
        planned: dict[int, tuple[Claim, Plan]] = {}

        def batches() -> Iterator[list[BagItem]]:
            with ThreadPoolExecutor(1, thread_name_prefix="plan") as pool:
                futures: list[Future | None] = [pool.submit(self._plan, ledger, i, s)
                                                for i, s in enumerate(slides[:PLAN_AHEAD])]
                for i in range(len(slides)):
                    if i + PLAN_AHEAD < len(slides):
                        futures.append(pool.submit(self._plan, ledger, i + PLAN_AHEAD, slides[i + PLAN_AHEAD]))
                    outcome = futures[i].result()  # type: ignore[union-attr]
                    futures[i] = None
                    if outcome is None:
                        continue
                    planned[i] = outcome
                    coords, mpp = outcome[1].coords, outcome[1].slide_mpp
                    for start in range(0, len(coords), self.bags_per_batch):
                        yield [BagItem(i, b, int(coords[b, 0]), int(coords[b, 1]), mpp)
                               for b in range(start, min(len(coords), start + self.bags_per_batch))]

        dataset = BagRegions([self.cache.path_for(s.path) for s in slides], self.geometry)
        loader = DataLoader(
            dataset,
            batch_sampler=batches(),
            num_workers=self.workers,
            collate_fn=collate_bags,
            pin_memory=self.encode.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            multiprocessing_context="fork" if self.workers else None,
        )
        writers: dict[int, Any] = {}
        written: dict[int, int] = {}
        failed: set[int] = set()
        node = hostname()
        with ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
            pending: list[Future] = []
            last_tick = time.perf_counter()  # a slide's time starts when the loader starts waiting for its bags
            for batch in loader:
                for item, message in batch["errors"]:
                    if item.slide_index not in failed:
                        failed.add(item.slide_index)
                        self._drain(pending, 0)
                        writers.pop(item.slide_index, None)
                        ledger.fail(planned[item.slide_index][0], message)
                if batch["patches"] is None:
                    continue
                index = batch["items"][0].slide_index
                if index in failed:
                    continue
                claim, plan = planned[index]
                patch_emb, cell_emb = self.encode(batch["patches"])
                if index not in writers:
                    with uninterrupted():  # a Ctrl-C waits for the attempt's zarr metadata (see uninterrupted)
                        writers[index] = ledger.begin(claim, plan)
                    written[index] = 0
                    claim.started = last_tick
                    self.progress("slide_start", {"slide_id": claim.slide.slide_id, "n_bags": len(plan.coords)})
                n = len(batch["items"])
                start = batch["items"][0].bag_index
                cell_tissue = np.minimum(plan.cell_tissue[start:start + n], batch["not_glass"].numpy())
                with uninterrupted():  # the first submit starts the write thread: interrupted, it is never joined
                    pending.append(write_pool.submit(
                        writers[index].write, start, plan.coords[start:start + n],
                        plan.patch_tissue[start:start + n], patch_emb, cell_emb, cell_tissue))
                pending = self._drain(pending, MAX_PENDING_WRITES)
                written[index] += n
                report.n_patches += n * self.geometry.n_patches
                self.progress("bags", {"n": n, "patches": n * self.geometry.n_patches, "node": node})
                if written[index] == len(plan.coords):
                    pending = self._drain(pending, 0)
                    with uninterrupted():
                        self._commit(ledger, claim, plan, writers.pop(index))
                last_tick = time.perf_counter()
            self._drain(pending, 0)

    @staticmethod
    def _drain(pending: list[Future], keep: int) -> list[Future]:
        while len(pending) > keep:
            pending.pop(0).result()
        return pending

    def _commit(self, ledger: Ledger, claim: Claim, plan: Plan, writer: Any) -> None:
        seconds = time.perf_counter() - claim.started
        try:
            writer.commit(timings={**plan.provenance["timings"], "encode_write_s": round(seconds, 3)})
        except MrantoolError as exc:
            ledger.fail(claim, str(exc))
            return
        ledger.done(claim, len(plan.coords), seconds)
