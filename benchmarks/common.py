"""Shared by the benchmarks: hardware description, load, timing, GPU sampling, JSON and markdown output."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def torch_info() -> dict[str, Any]:
    """torch version, intra-op threads and the GPU (name, memory) when CUDA is available."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda_version=torch.version.cuda)
    return info


def hardware() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, Python, numpy, torch (and GPU), niceness, date."""
    mem_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **torch_info(),
        "niceness": os.nice(0),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of `runs` calls of `fn`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


class GpuSampler:
    """Samples GPU utilisation (%) and memory (MiB) with `nvidia-smi` every `interval_s` inside a `with`.

    Does nothing (summary() gives {}) when nvidia-smi is absent or no GPU answers.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_ms = max(50, int(interval_s * 1000))
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        self._proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0",
             f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._thread = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._thread.start()
        return self

    def _read(self, stream: Any) -> None:
        for line in stream:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean": round(float(np.mean(util)), 1), "gpu_util_max": max(util),
                "gpu_mem_max_mib": max(m for _, m in self.samples), "gpu_samples": len(util)}


def table_header(headers: Sequence[str], right: Sequence[bool] | None = None) -> str:
    """The header and separator lines of a GitHub markdown table; `right` marks right-aligned columns."""
    right = right or [False] * len(headers)
    return "| " + " | ".join(headers) + " |\n|" + "|".join("---:" if r else "---" for r in right) + "|"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   right: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; `right` marks right-aligned (numeric) columns."""
    lines = [table_header(headers, right)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table_headers(markdown: str) -> list[list[str]]:
    """The column names of every table in a markdown text (a `|` line followed by a `|---` / `| --- |` line)."""
    lines = markdown.splitlines()
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line, below in itertools.pairwise(lines)
            if line.startswith("|") and below.replace(" ", "").startswith(("|-", "|:-"))]


def run_provenance() -> dict[str, Any]:
    """What wrote a result: the git commit (git_dirty when tracked files had changes) and the exact command."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    argv = sys.argv or [""]
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(root)) if argv[0] and script.is_relative_to(root) else argv[0]
    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join(["python", shown, *argv[1:]])}


STARTED = run_provenance()  # the tree as the script starts (every script imports this module first thing)


def write_results(out_dir: Path, name: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` into `out_dir`, both recording the git commit and the command line the
    script started with (`STARTED`: commits made while it ran do not count), unless the report has its own
    `command` / `git_commit`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**STARTED, **report}  # a script's own record (e.g. merged runs' commands) wins
    dirty = " (with uncommitted changes)" if report["git_dirty"] else ""
    markdown = (markdown.rstrip("\n") + f"\n\nWritten by `{report['command']}` at git commit "
                f"{report['git_commit']}{dirty}.\n")
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
