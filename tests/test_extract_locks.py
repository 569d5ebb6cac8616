"""What a user sees around locks: busy slides make extract exit non-zero, --wait waits, expired leases of a dead
host are taken over, Ctrl-C cleans up, `check` names the command that clears stale locks (issue 14 items 5, 13)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mrantool.cli import app
from mrantool.config import ExtractConfig
from mrantool.extract.api import extract
from mrantool.store import FeatureStore
from tests.conftest import tissue_image

TINY = ["--preset", "tiny", "--workers", "0", "--batch-size", "32", "--device", "cpu", "--quiet"]


def foreign_lock(store: Path, slide_id: str, expires_in: float) -> Path:
    """A lock as a process on another host writes it, its lease expiring in `expires_in` seconds."""
    path = store / "locks" / f"{slide_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    path.write_text(json.dumps({"pid": 4242, "host": "other-host", "started": now.isoformat(),
                                "expires": now.timestamp() + expires_in, "ttl": 600, "token": "theirs"}))
    return path


def test_busy_slide_exits_3_and_wait_finishes_it(small_slide: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    FeatureStore.create(store, _identity())
    lock = foreign_lock(store, "disc", expires_in=300)
    result = CliRunner().invoke(app, ["extract", str(small_slide), "--store", str(store), *TINY])
    assert result.exit_code == 3, result.output
    assert "disc: busy" in result.output and "add --wait" in result.output
    threading.Timer(1.0, lock.unlink).start()  # the other extractor finishes without committing
    result = CliRunner().invoke(app, ["extract", str(small_slide), "--store", str(store), "--wait", *TINY])
    assert result.exit_code == 0, result.output
    assert "disc: done" in result.output and FeatureStore.open(store).slide_ids() == ["disc"]


def test_expired_lease_of_a_dead_host_is_taken_over(small_slide: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    FeatureStore.create(store, _identity())
    foreign_lock(store, "disc", expires_in=-1)  # its owner stopped renewing it: dead
    result = CliRunner().invoke(app, ["extract", str(small_slide), "--store", str(store), "--lock-ttl", "60", *TINY])
    assert result.exit_code == 0, result.output
    assert "disc: done" in result.output and not (store / "locks" / "disc.lock").exists()


def test_check_names_the_command_that_clears_stale_locks(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    FeatureStore.create(store, _identity())
    foreign_lock(store, "gone", expires_in=-1)
    result = CliRunner().invoke(app, ["check", str(store)])
    assert f"mrantool check {store} --clear-stale-locks" in result.output
    assert "clear_stale_locks()" not in result.output
    result = CliRunner().invoke(app, ["check", str(store), "--clear-stale-locks"])
    assert "cleared 1 stale lock(s)" in result.output and FeatureStore.open(store).locks() == []


def test_a_slide_committed_while_we_took_its_lock_is_not_redone(small_slide: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.zarr"
    extract(ExtractConfig(slides=[str(small_slide)], store=str(tmp_path / "other.zarr"), preset="tiny", workers=0,
                          device="cpu"))
    done_elsewhere = FeatureStore.open(tmp_path / "other.zarr").slide("disc")
    original = FeatureStore.try_lock

    def commit_then_lock(self: FeatureStore, slide_id: str):  # the other extractor commits just before we lock
        if not self.is_complete(slide_id):
            writer = self.begin_slide(slide_id, done_elsewhere.n_bags, done_elsewhere.provenance)
            writer.write(0, done_elsewhere.coords[:], done_elsewhere.patch_tissue[:], done_elsewhere.patch_emb[:],
                         done_elsewhere.cell_emb[:])
            writer.commit()
        return original(self, slide_id)

    monkeypatch.setattr(FeatureStore, "try_lock", commit_then_lock)
    report = extract(ExtractConfig(slides=[str(small_slide)], store=str(store), preset="tiny", workers=0,
                                   device="cpu"))
    assert [(r.slide_id, r.status) for r in report.results] == [("disc", "skipped")]
    assert report.results[0].message == "completed by another extractor"


def test_ctrl_c_cleans_locks_and_staging_and_says_how_to_resume(tmp_path: Path) -> None:
    from mrantool.slides.writer import write_pyramid_tiff

    slide = tmp_path / "big.tif"
    write_pyramid_tiff(slide, tissue_image(4096, seed=1), mpp=0.5)
    store = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as in an interactive shell: SIGINT handled, even when this test runs under a parent that ignores it
    # (a background job); the trigger is the slide's attempt, not the store's hidden write probe (.tmp.*)
    interactive = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('mrantool.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", interactive, "extract", str(slide), "--store", str(store),
                             "--batch-size", "16", *TINY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    staging = store / "staging"

    def attempt_started() -> bool:
        try:
            return any(not p.name.startswith(".") for p in staging.iterdir())
        except FileNotFoundError:
            return False

    while time.time() < deadline and not attempt_started():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "interrupted" in out and "run the same command again to resume" in out and "Traceback" not in out
    assert not any((store / "staging").iterdir()) and not any((store / "locks").glob("*.lock"))


def _identity() -> dict:
    from mrantool.encoders.registry import create_encoder
    from mrantool.extract.executors.base import store_identity
    from mrantool.tiling.presets import get_preset

    preset = get_preset("tiny")
    return store_identity(preset, create_encoder(preset))
