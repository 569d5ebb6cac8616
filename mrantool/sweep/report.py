"""Sweep results: results.csv (a row per run and fold), a ranked summary with paired comparisons against the
baseline (summary.md and rows for a rich table), and metric.png (the metric per variant, per-fold spread).

Comparisons pair the folds of two runs that have the same name and the same test slides (fit's splits are a
function of labels, folds, repeats and seed, so variants that keep those have identical folds). The p-value
is two-sided: Wilcoxon signed-rank when at least MIN_WILCOXON folds differ (with fewer its exact p-value
cannot go below 0.05), else a paired t-test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from mrantool.files import atomic_path, atomic_write
from mrantool.training.metrics import METRICS

MIN_WILCOXON = 6
FOLD_COLUMNS = ("best_epoch", "epochs_run", "n_test")
RESULT_COLUMNS = ("variant", "hash", "status", "fold", "repeat", *METRICS, *FOLD_COLUMNS, "error")


@dataclass
class RunOutcome:
    """A run folder as read back: status "ok" (metrics.json), "error" (error.txt) or "missing"."""

    name: str
    hash: str
    status: str
    folds: list[dict[str, Any]] = field(default_factory=list)  # metrics.json "folds" (NaN for null)
    mean: dict[str, float] = field(default_factory=dict)
    sd: dict[str, float] = field(default_factory=dict)
    tests: dict[str, list[str]] = field(default_factory=dict)  # fold name -> test slide ids
    error: str | None = None

    def values(self, metric: str) -> dict[str, float]:
        """Fold name -> metric value."""
        return {f["name"]: f[metric] for f in self.folds}


@dataclass
class Comparison:
    """A variant against its baseline over paired folds: wins/ties/losses, mean difference, p-value."""

    baseline: str
    n: int
    wins: int
    ties: int
    losses: int
    diff: float  # mean of (variant - baseline)
    p: float
    test: str  # "wilcoxon", "paired t" or "none"
    unpaired: int = 0  # folds left out because their test slides differ


@dataclass
class VariantSummary:
    """One run in the ranked summary (rank None for a failed run)."""

    rank: int | None
    outcome: RunOutcome
    comparison: Comparison | None  # None for the baseline itself and failed runs


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=1, default=str) + "\n")


def read_outcome(run_dir: Path, name: str, run_hash: str) -> RunOutcome:
    """metrics.json and splits.json of a finished run, the first line of error.txt of a failed one."""
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        splits = json.loads((run_dir / "splits.json").read_text())
        folds = [{k: math.nan if v is None else v for k, v in fold.items() if k != "history"}
                 for fold in metrics["folds"]]
        return RunOutcome(name, run_hash, "ok", folds, _nan(metrics["mean"]), _nan(metrics["sd"]),
                          {s["name"]: s["test"] for s in splits})
    if (run_dir / "error.txt").is_file():
        return RunOutcome(name, run_hash, "error", error=(run_dir / "error.txt").read_text().splitlines()[0])
    return RunOutcome(name, run_hash, "missing", error="the run did not finish")


def _nan(values: dict[str, Any]) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in values.items()}


def compare(run: RunOutcome, base: RunOutcome, metric: str) -> Comparison:
    """Paired comparison of `run` against `base` over their folds with identical test slides."""
    a, b = run.values(metric), base.values(metric)
    common = [f for f in a if f in b]
    paired = [f for f in common if run.tests.get(f) == base.tests.get(f)]
    finite = [(a[f], b[f]) for f in paired if math.isfinite(a[f]) and math.isfinite(b[f])]
    pairs = np.array(finite, dtype=float).reshape(-1, 2)
    diffs = pairs[:, 0] - pairs[:, 1]
    nonzero = int(np.count_nonzero(diffs))
    p, test = math.nan, "none"
    if len(diffs) >= 2:
        test = "wilcoxon" if nonzero >= MIN_WILCOXON else "paired t"
        if nonzero == 0:
            p = 1.0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                result = stats.wilcoxon(diffs) if test == "wilcoxon" else stats.ttest_rel(*pairs.T)
            p = float(result.pvalue)
    return Comparison(base.name, len(diffs), int((diffs > 0).sum()), len(diffs) - nonzero,
                      int((diffs < 0).sum()), float(diffs.mean()) if len(diffs) else math.nan, p, test,
                      len(common) - len(paired))


def summarize(outcomes: list[RunOutcome], metric: str, baselines: dict[str, str]) -> list[VariantSummary]:
    """Runs ranked by mean `metric` (higher first; NaN, then failed runs last), each compared with its
    baseline run when both finished."""
    by_name = {o.name: o for o in outcomes}
    done = sorted((o for o in outcomes if o.status == "ok"), key=lambda o: _rank_key(o.mean.get(metric)))
    summaries = []
    for rank, outcome in enumerate(done, 1):
        base = by_name[baselines[outcome.name]]
        paired = base is not outcome and base.status == "ok"
        summaries.append(VariantSummary(rank, outcome, compare(outcome, base, metric) if paired else None))
    return summaries + [VariantSummary(None, o, None) for o in outcomes if o.status != "ok"]


def _rank_key(value: float | None) -> float:
    return -value if value is not None and math.isfinite(value) else math.inf


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def summary_rows(summaries: list[VariantSummary], metric: str) -> list[dict[str, str]]:
    """Rows of strings: rank, variant, run hash, folds, mean ± sd of each metric (`metric` first), and the
    paired comparison (Δ, wins/ties/losses, p, test) or the error of a failed run."""
    order = [metric, *(m for m in METRICS if m != metric)]
    rows = []
    for s in summaries:
        o, c = s.outcome, s.comparison
        row = {"rank": str(s.rank or "–"), "variant": o.name, "run": o.hash, "folds": str(len(o.folds))}
        row.update({m: f"{_fmt(o.mean[m])} ± {_fmt(o.sd[m])}" if o.status == "ok" else "–" for m in order})
        if c is not None:
            row.update({f"Δ{metric}": f"{c.diff:+.3f}" if c.n else "–",
                        "W/T/L": f"{c.wins}/{c.ties}/{c.losses}", "p": _p(c.p), "test": c.test,
                        "vs": c.baseline})
        else:
            note = "baseline" if o.status == "ok" else f"{o.status}: {o.error}"
            row.update({f"Δ{metric}": "–", "W/T/L": "–", "p": "–", "test": "–", "vs": note})
        rows.append(row)
    return rows


def result_rows(outcomes: list[RunOutcome]) -> list[dict[str, Any]]:
    """results.csv rows: one per run and fold; one row with the error for a failed or missing run."""
    rows: list[dict[str, Any]] = []
    for o in outcomes:
        if o.status != "ok":
            rows.append({"variant": o.name, "hash": o.hash, "status": o.status, "error": o.error})
        for fold in o.folds:
            rows.append({"variant": o.name, "hash": o.hash, "status": o.status, "fold": fold["fold"],
                         "repeat": fold["repeat"], **{m: f"{fold[m]:.6g}" for m in METRICS},
                         **{k: fold[k] for k in FOLD_COLUMNS}})
    return rows


def write_report(out: Path, outcomes: list[RunOutcome], metric: str, baselines: dict[str, str],
                 source: str) -> tuple[list[VariantSummary], list[str]]:
    """results.csv, summary.md and metric.png in `out`; returns the summary and its notes."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result_rows(outcomes))
    atomic_write(out / "results.csv", buffer.getvalue())
    summaries = summarize(outcomes, metric, baselines)
    notes = _notes(summaries, metric)
    atomic_write(out / "summary.md", _markdown(summaries, metric, source, notes))
    plot_metric(summaries, metric, set(baselines.values()), out / "metric.png")
    return summaries, notes


def _notes(summaries: list[VariantSummary], metric: str) -> list[str]:
    notes = [f"Ranked by mean {metric} over folds (higher is better). Each variant is compared with its "
             f"baseline (column 'vs') over the folds with the same test slides: W/T/L counts the folds where "
             f"its {metric} is higher, equal or lower, Δ is the mean difference, p is two-sided: Wilcoxon "
             f"signed-rank (scipy.stats.wilcoxon) when at least {MIN_WILCOXON} folds differ, otherwise a "
             "paired t-test (scipy.stats.ttest_rel). Folds where either value is NaN (a single-class test "
             "fold) are left out."]
    unpaired = [s.outcome.name for s in summaries if s.comparison and s.comparison.unpaired]
    if unpaired:
        notes.append(f"Some folds of {', '.join(unpaired)} have other test slides than their baseline's (the "
                     "seed, folds, repeats or labels differ) and are not compared.")
    failed = [s.outcome for s in summaries if s.outcome.status != "ok"]
    notes += [f"Run {o.name} ({o.hash}) {o.status}: {o.error} (see runs/{o.hash}/error.txt; re-run the sweep "
              "to retry it)." for o in failed]
    return notes


def _markdown(summaries: list[VariantSummary], metric: str, source: str, notes: list[str]) -> str:
    rows = summary_rows(summaries, metric)
    columns = list(rows[0]) if rows else ["variant"]
    lines = [f"# Sweep summary: {source}", "",
             "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row[c].replace("|", "/") for c in columns) + " |" for row in rows]
    lines += ["", *(f"- {note}" for note in notes), "", f"![{metric} per variant](metric.png)", ""]
    return "\n".join(lines)


def plot_metric(summaries: list[VariantSummary], metric: str, baselines: set[str], path: Path) -> None:
    """Box plot of `metric` per finished variant in rank order, each fold a dot; baselines in orange."""
    ranked = [s.outcome for s in summaries if s.outcome.status == "ok"]
    values = [np.array([v for v in o.values(metric).values() if math.isfinite(v)]) for o in ranked]
    fig = Figure(figsize=(max(5.0, 0.55 * len(ranked) + 2.0), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(1, len(ranked) + 1)
    shown = [i for i, v in enumerate(values) if len(v)]
    if shown:
        boxes = ax.boxplot([values[i] for i in shown], positions=positions[shown], widths=0.6,
                           patch_artist=True, showfliers=False, medianprops={"color": "black"})
        for i, box in zip(shown, boxes["boxes"], strict=True):
            box.set_facecolor("#f4a259" if ranked[i].name in baselines else "#9ecae1")
    for i, v in enumerate(values):
        jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(len(v))
        ax.plot(positions[i] + jitter, v, "o", color="#333333", markersize=3.5, alpha=0.8)
    ax.set_xticks(positions, [o.name for o in ranked], rotation=35, ha="right", fontsize=8)
    ax.set_xlim(0.4, len(ranked) + 0.6)
    ax.set_ylabel(f"{metric} per fold")
    ax.set_title(f"{metric} per variant (ranked; baseline in orange)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=100)
