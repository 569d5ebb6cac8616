"""Rich rendering for the CLI: progress bars and result tables. Presentation only."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


@contextmanager
def extract_progress(console: Console, quiet: bool):
    """A callback for the extract pipeline: slides and bags bars with patches/s, or plain log lines when quiet."""
    if quiet:
        def log(event: str, info: dict[str, Any]) -> None:
            if event == "slide_end":
                r = info["result"]
                line = f"{r.slide_id}: {r.status} {r.n_bags} bags {r.seconds:.1f}s {r.message}".rstrip()
                console.print(line, markup=False, highlight=False, soft_wrap=True)
        yield log
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}", markup=False))
    with Progress(*columns, console=console, transient=False) as bar:
        slides = bar.add_task("slides", total=None, rate="")
        bags = bar.add_task("bags", total=0, rate="")
        state: dict[str, Any] = {"patches": 0, "t0": None, "nodes": {}}

        def update(event: str, info: dict[str, Any]) -> None:
            if event == "run_start":
                bar.update(slides, total=info["n_slides"])
            elif event == "slide_start":  # slides may overlap (several encoders): the bar counts all their bags
                total = bar.tasks[bags].total or 0
                bar.update(bags, total=total + info["n_bags"], description=f"bags (last started: {info['slide_id']})")
            elif event == "bags":
                state["t0"] = state["t0"] or time.perf_counter()
                state["patches"] += info["patches"]
                nodes = state["nodes"]
                nodes[info.get("node", "")] = nodes.get(info.get("node", ""), 0) + info["patches"]
                elapsed = max(time.perf_counter() - state["t0"], 1e-6)
                per_node = ", ".join(f"{name} {count / elapsed:.0f}" for name, count in sorted(nodes.items()))
                text = f"{state['patches'] / elapsed:.0f} patches/s" + (f" ({per_node})" if len(nodes) > 1 else "")
                bar.update(bags, advance=info["n"], rate=text)
            elif event == "slide_end":
                bar.update(slides, advance=1)

        yield update


def results_table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A plain rich table; every title, header and cell is shown verbatim (no markup, no emoji codes)."""
    table = Table(title=Text(title))
    for col in columns:
        table.add_column(Text(col), overflow="fold")
    for row in rows:
        table.add_row(*[Text(str(v)) for v in row])
    return table


@contextmanager
def fit_progress(console: Console, quiet: bool):
    """A callback for `fit`: folds and epochs bars with the latest validation loss/AUC, or log lines when quiet."""
    if quiet:
        def log(event: str, info: dict[str, Any]) -> None:
            if event == "note":
                console.print(f"note: {info['message']}", soft_wrap=True, markup=False)
            elif event == "fold_end":
                console.print(f"{info['name']}: best epoch {info['best_epoch']}/{info['epochs_run']} "
                              f"auc {info['auc']:.3f} accuracy {info['accuracy']:.3f}")
        yield log
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}", markup=False))
    with Progress(*columns, console=console, transient=False) as bar:
        folds = bar.add_task("folds", total=None, status="")
        epochs = bar.add_task("epochs", total=None, status="")

        def update(event: str, info: dict[str, Any]) -> None:
            if event == "note":
                console.print(f"note: {info['message']}", soft_wrap=True, markup=False, emoji=False)
            elif event == "start":
                bar.update(folds, total=info["n_folds"])
            elif event == "fold_start":
                bar.reset(epochs, total=None, description=f"epochs of {info['name']}", status="")
            elif event == "step":  # fine-tuning: one training slide
                bar.update(epochs, total=info.get("n_epochs"), status=f"step loss {info['loss']:.3f}")
            elif event == "epoch":
                loss, auc = info.get("val_loss"), info.get("val_auc")
                val = f"val loss {loss:.3f} auc {auc:.3f}" if loss is not None and math.isfinite(loss) else ""
                bar.update(epochs, completed=info["epoch"], total=info["n_epochs"], status=val,
                           description=f"epochs of {info['name']}")  # folds trained together take turns
            elif event == "fold_end":
                bar.update(folds, advance=1, status=f"last auc {info['auc']:.3f}")

        yield update
