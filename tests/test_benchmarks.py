"""The benchmark scripts as a user meets them: `--help` works, and each committed result file matches its script."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import table_headers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("common", "__init__"))
# Result files written before their script recorded the git commit and the command (or by an older version of the
# script). The lead re-runs these on a quiet machine (README "Results, measured" gives each command); the marks
# then fail as XPASS and must be removed.
RERUN = {
    "decode": "nice python benchmarks/decode.py",
    "end_to_end": "python benchmarks/end_to_end.py --fit",
    "extract": "nice python benchmarks/extract.py --rounds 3",
    "finetune": "nice -n 10 python benchmarks/finetune.py",
    "fit": "nice -n 10 python benchmarks/fit.py",
    "fit_defaults": "python benchmarks/fit_defaults.py",
    "gpu": "benchmarks/gpu.sh on a machine with a CUDA GPU",
    "mran": "nice python benchmarks/mran.py",
    "mran_defaults": "python benchmarks/mran_defaults.py",
    "mran_levels": "python benchmarks/mran_levels.py --work W (after benchmarks/mran.py --work W [--encoder imagenet])",
    "musk": "nice -n 5 python benchmarks/musk.py --workers 2",
    "retrieval": "nice python benchmarks/retrieval.py",
    "scale": "nice python benchmarks/scale.py",
    "sweep": "nice python benchmarks/sweep.py --repeats 3",
    "viewer": "python benchmarks/viewer.py",
}
OLD_COLUMNS: set[str] = set()  # written by older versions of their scripts (other columns)
NO_RESULTS = {"gpu"}  # never run on a quiet machine (or a GPU)
# re-run by their committed scripts: must pass
RERUN_DONE = {"decode", "end_to_end", "extract", "finetune", "fit", "fit_defaults", "mran", "mran_defaults",
              "mran_levels", "musk", "retrieval", "scale", "sweep", "viewer"}


def stale(name: str, why: str):
    why = "no results committed yet" if name in NO_RESULTS else why
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"{why}; re-run: {RERUN[name]}"))


def test_every_script_has_results_and_a_rerun_command() -> None:
    assert sorted(RERUN) == SCRIPTS
    for name in set(SCRIPTS) - NO_RESULTS:
        assert (RESULTS / f"{name}.json").is_file() and (RESULTS / f"{name}.md").is_file(), name


def has_columns(found: list[list[str]], columns: list[str]) -> bool:
    """A table with these columns; a last entry "..." stands for data-dependent columns after the others."""
    if columns[-1] == "...":
        return any(header[:len(columns) - 1] == columns[:-1] for header in found)
    return columns in found


def test_help_of_every_script_run_from_another_folder(tmp_path: Path) -> None:
    """`python benchmarks/NAME.py --help` as docs/benchmarks.md says (all scripts at once: they import torch)."""
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in SCRIPTS}
    for name, proc in procs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and "usage:" in out, f"{name}: {out[-2000:]}"


@pytest.mark.parametrize("name", [stale(n, "written by an older script") if n in OLD_COLUMNS | NO_RESULTS else n
                                  for n in sorted(RERUN)])
def test_results_have_the_columns_their_script_writes(name: str) -> None:
    tables = importlib.import_module(f"benchmarks.{name}").TABLES
    found = table_headers((RESULTS / f"{name}.md").read_text())
    missing = [columns for columns in tables.values() if not has_columns(found, columns)]
    assert not missing, f"{name}.md lacks the table(s) {missing}; it has {found}"


@pytest.mark.parametrize("name", [n if n in RERUN_DONE else stale(n, "written before results recorded their commit")
                                  for n in sorted(RERUN)])
def test_results_record_the_commit_and_command(name: str) -> None:
    report = json.loads((RESULTS / f"{name}.json").read_text())
    assert len(report.get("git_commit", "")) == 40, report.get("git_commit")
    assert not report.get("git_dirty"), f"{name} was written with uncommitted changes to tracked files"
    assert report.get("command", "").startswith(f"python benchmarks/{name}.py"), report.get("command")
    assert f"Written by `{report['command']}` at git commit {report['git_commit']}" in (
        RESULTS / f"{name}.md").read_text()


def _instances(cells_carry: bool, seed: int = 0) -> dict:
    """40 slides of 16 patches x 9 cells, half positive with one positive cell. The label is written either into
    that cell's own features (a patch averages it away) or only into its patch's features (cells are noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_slides, n_patches, n_cells, dim = 40, 16, 9, 8
    cells = rng.normal(size=(n_slides, n_patches, n_cells, dim))
    cell_y = np.zeros((n_slides, n_patches, n_cells), int)
    bags = {f"s{i}": i % 2 for i in range(n_slides)}
    for i in range(1, n_slides, 2):
        p, c = rng.integers(n_patches), rng.integers(n_cells)
        cell_y[i, p, c] = 1
        if cells_carry:
            cells[i, p, c, 0] += 4.0
    patches = cells.mean(2) + rng.normal(scale=0.3, size=(n_slides, n_patches, dim))
    if not cells_carry:
        patches[..., 0] += 4.0 * cell_y.max(2)
    slides = np.array(list(bags))
    return {"patch_x": patches.reshape(-1, dim), "patch_y": cell_y.max(2).ravel(),
            "patch_slide": np.repeat(slides, n_patches), "cell_x": cells.reshape(-1, dim), "cell_y": cell_y.ravel(),
            "cell_patch": np.repeat(np.arange(n_slides * n_patches), n_cells),
            "cell_slide": np.repeat(slides, n_patches * n_cells), "bags": bags}


@pytest.mark.parametrize("cells_carry", [True, False])
def test_level_probes_find_the_level_that_carries_the_label(cells_carry: bool) -> None:
    """benchmarks/mran_levels.py: whichever level holds the label gets the higher bag ceiling and cell AUC."""
    from benchmarks.mran_levels import probe_levels

    found = probe_levels(_instances(cells_carry))
    cell_wins = found["cell"]["bag_auc"] > found["patch"]["bag_auc"]
    localises = found["cell"]["instance_auc"] > found["patch_probe_at_cells"]["instance_auc"]
    assert cell_wins == cells_carry and localises == cells_carry, found


def test_results_record_the_commit_the_script_started_at(tmp_path: Path) -> None:
    """A benchmark runs for an hour while work goes on: its files name the tree it started from, not the one
    there when it writes (once a commit made mid-run was recorded)."""
    code = ("import subprocess, sys\n"
            "from pathlib import Path\n"
            "from benchmarks import common\n"
            "real = common.run_provenance\n"
            "common.run_provenance = lambda: {**real(), 'git_commit': 'f' * 40}  # as if HEAD moved mid-run\n"
            "common.write_results(Path(sys.argv[1]), 'probe', {}, '# probe\\n')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True, timeout=120)
    report = json.loads((tmp_path / "probe.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert report["git_commit"] == head and report["git_commit"] != "f" * 40
