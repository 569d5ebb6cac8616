"""Sweeps: spec expansion and validation, parallel runs on a tiny store, crash records, resume, the report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mrantool.errors import ConfigError
from mrantool.store import FeatureStore, make_identity
from mrantool.sweep.report import MIN_WILCOXON, RunOutcome, compare
from mrantool.sweep.runner import run_sweep
from mrantool.sweep.spec import SweepSpec, load_spec

N_SLIDES, N_BAGS, GRID, CELLS, DIM = 12, 2, 2, 2, 16
P, C = GRID * GRID, CELLS * CELLS
BASE = """
[base]
store = "{store}"
labels = "{labels}"
folds = 2
epochs = 2
min_epochs = 1
lr = 0.005
max_bags = 2
device = "cpu"
seed = 3
"""
VARIANTS = """
metric = "auc"
baseline = "mran"
{base}
[[variant]]
name = "mran"
model = "mran"

[[variant]]
name = "mran-no-cells"
model = "mran"
options.cells = false

[[variant]]
name = "abmil"
model = "abmil"
options = {{hidden = 16, attn_dim = 8}}

[[variant]]
name = "crash"
model = "mean"
device = "cuda:99"
"""


def write_store(path: Path) -> Path:
    """A tiny store with cells; odd slides carry a signal along the first feature dimensions."""
    identity = make_identity(encoder="toy", weights="random-init", transforms={}, embed_dim=DIM,
                             geometry={"bag_px": 64, "mpp": 1.0, "grid": GRID, "cells": CELLS}, preset=None,
                             has_cells=True)
    store = FeatureStore.create(path, identity)
    rng = np.random.default_rng(0)
    provenance = {"source": "generated", "fingerprint": None, "mpp": 1.0, "level0_size": [128, 64],
                  "bag_size_l0": 64}
    for i in range(N_SLIDES):
        cells = np.abs(rng.normal(0, 0.5, (N_BAGS, P, C, DIM))).astype(np.float32)
        cells[0, :, 0, :4] += 2.0 * (i % 2)
        writer = store.begin_slide(f"s{i:02d}", N_BAGS, provenance)
        writer.write(0, np.zeros((N_BAGS, 2)), np.ones((N_BAGS, P), np.float32), cells.mean(axis=2), cells)
        writer.commit()
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    store = write_store(root / "s.zarr")
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i:02d},{'tumour' if i % 2 else 'normal'}\n"
                                                    for i in range(N_SLIDES)))
    base = BASE.format(store=store, labels=labels)
    spec = root / "sweep.toml"
    spec.write_text(VARIANTS.format(base=base))
    return {"root": root, "base": base, "spec": spec, "labels": labels}


@pytest.fixture(scope="module")
def swept(cohort: dict) -> dict:
    events: list[tuple[str, dict]] = []
    out = cohort["root"] / "SWEEP"
    result = run_sweep(cohort["spec"], out, workers=2, progress=lambda e, info: events.append((e, info)))
    return {"result": result, "out": out, "events": events}


def status(result) -> dict[str, str]:
    return {r.name: r.status for r in result.runs}


def test_sweep_runs_every_variant_in_workers(swept: dict) -> None:
    result, out = swept["result"], swept["out"]
    assert status(result) == {"mran": "ran", "mran-no-cells": "ran", "abmil": "ran", "crash": "error"}
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    for run in runs[:3]:
        assert (out / "runs" / run["hash"] / "metrics.json").is_file()  # a normal fit run folder
        assert (out / "runs" / run["hash"] / "fold_1" / "model.safetensors").is_file()
    # same seed/folds/labels => identical test folds for every variant (paired comparisons are valid)
    tests = [[s["test"] for s in json.loads((out / "runs" / r["hash"] / "splits.json").read_text())]
             for r in runs[:3]]
    assert tests[0] == tests[1] == tests[2]
    rows = read_csv(out / "results.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and {(r["variant"], r["fold"]) for r in ok} == {
        (v, f) for v in ("mran", "mran-no-cells", "abmil") for f in ("0", "1")}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["hash"] for r in ok)
    table = result.table()
    assert [row["rank"] for row in table[:3]] == ["1", "2", "3"] and table[3]["variant"] == "crash"
    base_row = next(row for row in table if row["variant"] == "mran")
    other = next(row for row in table if row["variant"] == "abmil")
    assert base_row["vs"] == "baseline" and other["vs"] == "mran" and other["test"] in ("paired t", "none")
    assert sum(map(int, other["W/T/L"].split("/"))) == 2
    summary = (out / "summary.md").read_text()
    assert "| rank | variant |" in summary and "paired t-test" in summary and "abmil" in summary
    assert (out / "metric.png").read_bytes()[:4] == b"\x89PNG"
    events = [e for e, _ in swept["events"]]
    assert events[0] == "start" and events.count("run_end") == 4 and events[-1] == "end"
    assert swept["events"][0][1]["workers"] == 2 and swept["events"][0][1]["threads"] >= 1


def test_crashing_run_is_recorded_and_others_finish(swept: dict) -> None:
    result, out = swept["result"], swept["out"]
    crash = next(r for r in result.runs if r.name == "crash")
    assert "cuda" in crash.error.lower()  # no CUDA here, or no device 99 where there is
    error_file = out / "runs" / crash.hash / "error.txt"
    assert error_file.read_text().startswith(crash.error) and "Traceback" in error_file.read_text()
    assert not (out / "runs" / crash.hash / "metrics.json").exists()
    row = next(r for r in read_csv(out / "results.csv") if r["variant"] == "crash")
    assert row["status"] == "error" and row["error"] == crash.error
    assert result.count("ran") == 3


def test_rerun_redoes_only_unfinished_runs(swept: dict, tmp_path: Path, cohort: dict) -> None:
    out = tmp_path / "SWEEP"
    shutil.copytree(swept["out"], out)
    hashes = {r.name: r.hash for r in swept["result"].runs}
    (out / "runs" / hashes["abmil"] / "metrics.json").unlink()  # as if killed before abmil finished
    metrics = {n: out / "runs" / hashes[n] / "metrics.json" for n in ("mran", "mran-no-cells")}
    mtimes = {n: path.stat().st_mtime_ns for n, path in metrics.items()}
    result = run_sweep(cohort["spec"], out, workers=1)
    assert status(result) == {"mran": "skipped", "mran-no-cells": "skipped", "abmil": "ran", "crash": "error"}
    assert {n: path.stat().st_mtime_ns for n, path in metrics.items()} == mtimes
    assert len([r for r in read_csv(out / "results.csv") if r["status"] == "ok"]) == 6
    finished = {s.outcome.name for s in result.summary if s.outcome.status == "ok"}  # skipped runs count too
    assert finished == {"mran", "mran-no-cells", "abmil"}


def test_bad_spec_fails_fast_listing_every_problem(cohort: dict, tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('metric = "auc"\nbaseline = "nope"\n' + cohort["base"] + """
[grid]
lr = 0.01
[[variant]]
name = "typo"
lrr = 0.1
[[variant]]
name = "no-such-head"
model = "mrann"
[[variant]]
name = "bad-option"
model = "abmil"
options.cells = false
[[variant]]
name = "bad-type"
epochs = "ten"
""")
    with pytest.raises(ConfigError) as info:
        run_sweep(spec, tmp_path / "OUT", workers=2)
    message = str(info.value)
    for part in ("variant 'typo': unknown key 'lrr'", "variant 'no-such-head': unknown model 'mrann'",
                 "variant 'bad-option': head 'abmil' has no option 'cells'", "variant 'bad-type': 'epochs'",
                 "'lr' must be a non-empty list", "'nope' is neither a variant nor a run name", str(spec)):
        assert part in message, part
    assert not (tmp_path / "OUT").exists()  # nothing ran
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_data_problems_are_found_before_any_run(cohort: dict, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(cohort["labels"].read_text() + "ghost,tumour\n")
    spec = SweepSpec(base={"store": str(cohort["root"] / "s.zarr"), "labels": str(labels), "folds": 2},
                     variant=[{"name": "a", "model": "mean"}, {"name": "b", "model": "max"}])
    with pytest.raises(ConfigError, match=r"'a', 'b': Labels file .*'ghost'"):
        run_sweep(spec, tmp_path / "OUT")
    assert not (tmp_path / "OUT").exists()


def test_grid_times_variants_and_hashes(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text("""
baseline = "m"
[base]
store = "s.zarr"
labels = "l.csv"
options = {t = 0.2}
[grid]
lr = [0.001, 0.0001]
"options.cells" = [true, false]
[[variant]]
name = "m"
model = "mran"
[[variant]]
name = "g"
model = "mran"
options.attention = "gated"
""")
    spec = load_spec(spec_file)
    runs = spec.runs()
    assert len(runs) == 8 and runs[0].name == "m[lr=0.001,options.cells=true]"
    assert runs[-1].name == "g[lr=0.0001,options.cells=false]"
    assert runs[-1].config["options"] == {"t": 0.2, "attention": "gated", "cells": False}
    assert len({r.hash for r in runs}) == 8
    baselines = spec.baselines(runs)
    assert baselines["g[lr=0.0001,options.cells=false]"] == "m[lr=0.0001,options.cells=false]"
    # defaults filled in and result-neutral settings do not change the hash
    same = SweepSpec(base={"store": "s.zarr", "labels": "l.csv", "model": "mran", "options": {"t": 0.1},
                           "threads": 1, "cache_gb": 1.0}).runs()[0]
    plain = SweepSpec(base={"store": "s.zarr", "labels": "l.csv"}).runs()[0]
    assert same.hash == plain.hash and plain.name == "base"
    clash = SweepSpec(base={"store": "s", "labels": "l"}, grid={"lr": [0.1, 0.2]},
                      variant=[{"name": "v", "lr": 1}])
    with pytest.raises(ConfigError, match="also swept by the grid"):
        clash.runs()
    twins = SweepSpec(base={"store": "s", "labels": "l"}, variant=[{"name": "a"}, {"name": "b", "seed": 0}])
    with pytest.raises(ConfigError, match="resolve to the same fit settings"):
        twins.runs()


def outcome(name: str, values: list[float], tests: list[list[str]] | None = None) -> RunOutcome:
    folds = [{"name": f"fold_{k}", "fold": k, "repeat": 0, "auc": v} for k, v in enumerate(values)]
    tests = tests or [[f"s{k}"] for k in range(len(values))]
    return RunOutcome(name, name, "ok", folds, tests={f"fold_{k}": t for k, t in enumerate(tests)})


def test_paired_comparison_picks_the_test() -> None:
    base = outcome("base", [0.5, 0.6, 0.7, 0.8, 0.9])
    few = compare(outcome("v", [0.6, 0.6, 0.8, 0.9, 1.0]), base, "auc")
    assert (few.wins, few.ties, few.losses, few.n, few.test) == (4, 1, 0, 5, "paired t")
    assert few.diff == pytest.approx(0.08) and 0 < few.p < 0.1
    n = MIN_WILCOXON + 2
    base = outcome("base", list(np.linspace(0.5, 0.8, n)))
    many = compare(outcome("v", list(np.linspace(0.5, 0.8, n) + np.linspace(0.01, 0.08, n))), base, "auc")
    assert many.test == "wilcoxon" and many.wins == n and many.p == pytest.approx(2 / 2**n)
    base = outcome("b", [0.5, 0.6, 0.7, 0.8, 0.9])
    nan_fold = compare(outcome("v", [float("nan"), 0.6, 0.7, 0.8, 0.9]), base, "auc")
    assert nan_fold.n == 4 and nan_fold.ties == 4 and nan_fold.p == 1.0
    moved = compare(outcome("v", [0.5, 0.6], [["s0"], ["x"]]), outcome("b", [0.4, 0.5]), "auc")
    assert moved.n == 1 and moved.unpaired == 1 and moved.test == "none"


def test_resume_is_keyed_by_content_not_paths(cohort: dict, tmp_path: Path) -> None:
    """An edited labels.csv or a re-extracted store at the same paths used to reuse the stale finished runs."""
    store = tmp_path / "s.zarr"
    shutil.copytree(Path(cohort["spec"]).parent / "s.zarr", store)
    labels = tmp_path / "labels.csv"
    labels.write_text(Path(cohort["labels"]).read_text())
    spec = tmp_path / "sweep.toml"
    spec.write_text(BASE.format(store=store, labels=labels).replace("epochs = 2", "epochs = 1")
                    + '[[variant]]\nname = "mean"\nmodel = "mean"\n')
    out = tmp_path / "SWEEP"
    assert status(run_sweep(spec, out)) == {"mean": "ran"}
    assert status(run_sweep(spec, out)) == {"mean": "skipped"}
    rows = labels.read_text().splitlines()
    rows[1], rows[2] = rows[1].replace("normal", "tumour"), rows[2].replace("tumour", "normal")
    labels.write_text("\n".join(rows) + "\n")
    edited = run_sweep(spec, out)
    assert status(edited) == {"mean": "ran"} and "changed since they ran" in edited.notes[0]
    fs = FeatureStore.open(store, writable=True)  # re-extract one slide: same id, new commit
    old = fs.slide("s00")
    writer = fs.begin_slide("s00", old.n_bags, old.provenance)
    writer.write(0, old.coords[:], old.patch_tissue[:], old.patch_emb[:], old.cell_emb[:])
    writer.commit()
    assert status(run_sweep(spec, out)) == {"mean": "ran"}
    assert status(run_sweep(spec, out)) == {"mean": "skipped"}


def test_a_group_that_fails_where_its_runs_succeed_alone_is_reported(cohort: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of one group are retried one by one when the group fails; when every one of them then trains, the
    failure was the grouping's (once: heads with buffers of different shapes), which the sweep's notes say."""
    from mrantool.sweep import worker

    def grouped_fails(cfgs, *args, **kwargs):
        if len(cfgs) > 1:
            raise RuntimeError("stack expects each tensor to be equal size")
        return fit_many(cfgs, *args, **kwargs)

    fit_many = worker.fit_many
    monkeypatch.setattr(worker, "fit_many", grouped_fails)
    spec = tmp_path / "sweep.toml"
    spec.write_text(cohort["base"] + '[[variant]]\nname = "a"\nmodel = "mean"\n\n'
                    '[[variant]]\nname = "b"\nmodel = "mean"\nlr = 0.01\n')
    result = run_sweep(spec, tmp_path / "SWEEP", workers=1)
    assert status(result) == {"a": "ran", "b": "ran"}
    assert "2 run(s) (a, b) trained one by one" in result.notes[0]
    assert "stack expects each tensor" in result.notes[0] and "mrantool bug" in result.notes[0]
    monkeypatch.undo()
    clean = run_sweep(spec, tmp_path / "AGAIN", workers=1)  # the group trains: nothing to report
    assert status(clean) == {"a": "ran", "b": "ran"} and not any("one by one" in note for note in clean.notes)
