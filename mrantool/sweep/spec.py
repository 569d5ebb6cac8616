"""sweep.toml: a base fit config, a grid and/or named variants, the baseline and the ranking metric.

```toml
metric = "auc"      # ranks variants; one of auc, accuracy, balanced_accuracy, f1
baseline = "mran"   # a variant name (or a run name); default: the first run
[base]              # FitConfig keys shared by every run (store, labels, folds, epochs, seed, ...)
[grid]              # key -> list; every combination is a run ("options.cells" reaches head options)
[[variant]]         # name = "...", plus overrides of the base; with a grid, each runs at every point
```

Each run's config is base < variant < grid point (head `options` merge key by key). All of them are
validated up front (FitConfig keys and types, fit's ranges, the head's options through `create_head` on a
dummy input size), and every problem is reported in one ConfigError naming its variant or run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError

from mrantool.config import FitConfig, StageConfig, read_toml, validate
from mrantool.errors import ConfigError, MrantoolError
from mrantool.models.registry import create_head
from mrantool.training.metrics import METRICS
from mrantool.training.runs import check_config, resolved_options

OPTIONS = "options"
RESERVED = ("out",)  # set by the sweep for each run
UNHASHED = ("out", "threads", "cache_gb")  # settings that do not change a run's results
# Settings added after sweeps were first written: left out of the hash at their default, so older sweep folders
# still resume.
HASHED_UNLESS_DEFAULT = ("id_column", "label_column")
DUMMY_DIM = 8


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its label, where it comes from, its resolved fit settings (without `out`)."""

    name: str
    variant: str | None  # the [[variant]] name, None for a grid-only sweep
    point: str | None  # the grid point label "k=v,k2=v2", None without a grid
    config: dict[str, Any]
    hash: str

    def fit_config(self, out: str | Path) -> FitConfig:
        """The FitConfig of this run, writing to `out`."""
        return FitConfig(**self.config, out=str(out))


class SweepSpec(StageConfig):
    """The sweep file's top level; `runs()` expands and validates every run."""

    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] = Field(default_factory=dict)
    variant: list[dict[str, Any]] = Field(default_factory=list)
    baseline: str | None = None
    metric: str = "auc"
    _source: str = PrivateAttr(default="<in-memory spec>")

    @property
    def source(self) -> str:
        return self._source

    def runs(self) -> list[RunSpec]:
        """Every run (variants x grid points, in file order); one ConfigError listing all problems."""
        problems = Problems()
        if self.metric not in METRICS:
            problems.add("metric", f"unknown metric {self.metric!r} (use one of {', '.join(METRICS)})")
        base = _flat(self.base, "[base]", problems)
        points = _grid_points(self.grid, problems)
        variants = _variants(self.variant, problems)
        runs: list[RunSpec] = []
        for (vname, overrides), (label, values) in itertools.product(variants, points):
            name = _run_name(vname, label)
            who = f"variant {name!r}" if label is None else f"run {name!r}"
            clash = sorted(set(overrides) & set(values))
            if clash:
                problems.add(who, f"sets {', '.join(clash)}, also swept by the grid (set it in one place)")
                continue
            config = _nested({**base, **overrides, **values})
            run = _check_run(name, vname, label, config, who, problems)
            if run is not None:
                runs.append(run)
        _check_duplicates(runs, problems)
        names = {r.name for r in runs} | {v for v, _ in variants}
        if self.baseline is not None and self.baseline not in names:
            problems.add("baseline", f"{self.baseline!r} is neither a variant nor a run name")
        problems.raise_for(self.source)
        return runs

    def baselines(self, runs: list[RunSpec]) -> dict[str, str]:
        """Run name -> the run it is compared with: the named run, else the baseline variant's run at the
        same grid point; default: the first run."""
        by_name = {r.name: r for r in runs}
        if self.baseline is None or self.baseline in by_name:
            target = self.baseline or runs[0].name
            return {r.name: target for r in runs}
        at_point = {r.point: r.name for r in runs if r.variant == self.baseline}
        return {r.name: at_point[r.point] for r in runs}


def load_spec(path: str | Path, base: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep TOML file (every run is checked; see `SweepSpec.runs`); `base` overrides keys of
    its [base] table."""
    if not Path(path).is_file():
        raise ConfigError(f"Sweep spec {path} does not exist; pass the path of a sweep TOML file "
                          "(see examples/sweep.toml).")
    spec = validate(SweepSpec, read_toml(path), str(path))
    if base:
        spec.base = {**spec.base, **base}
    spec._source = str(path)
    spec.runs()
    return spec


def run_hash(config: dict[str, Any]) -> str:
    """12 hex digits identifying a run's results: its FitConfig with defaults and head defaults filled in,
    without the settings that do not change results (out, threads, cache_gb)."""
    values = FitConfig(**config, out="").model_dump()
    values[OPTIONS] = resolved_options(values["model"], values[OPTIONS])
    for key in UNHASHED:
        values.pop(key)
    for key in HASHED_UNLESS_DEFAULT:
        if values[key] == FitConfig.model_fields[key].default:
            values.pop(key)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Problems:
    """Problems found while checking a spec, grouped by message so one mistake in many runs reads once."""

    def __init__(self) -> None:
        self._items: dict[str, list[str]] = {}

    def add(self, who: str, message: str) -> None:
        self._items.setdefault(message.rstrip(". "), []).append(who)

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_for(self, source: str) -> None:
        """Raise one ConfigError listing every problem, if there are any."""
        if not self._items:
            return
        lines = [f"{_few(whos)}: {message}" for message, whos in self._items.items()]
        raise ConfigError(f"Sweep spec {source} has {len(lines)} problem(s): " + "; ".join(
            f"({i}) {line}" for i, line in enumerate(lines, 1)) + "; fix them and run the sweep again.")


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _flat(table: dict[str, Any], who: str, problems: Problems) -> dict[str, Any]:
    """Overrides as flat keys: `options = {cells = false}` and "options.cells" both become "options.cells"."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if key in RESERVED:
            problems.add(who, f"sets {key!r}, which the sweep chooses for each run (SWEEP/runs/<hash>)")
        elif key == OPTIONS and isinstance(value, dict):
            flat.update({f"{OPTIONS}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _grid_points(grid: dict[str, Any], problems: Problems) -> list[tuple[str | None, dict[str, Any]]]:
    """(label, flat values) of every grid combination; one unlabelled empty point without a grid."""
    axes: dict[str, list[Any]] = {}
    for key, values in _flat(grid, "[grid]", problems).items():
        top = key.split(".", 1)[0]
        if top not in FitConfig.model_fields or (top != key and top != OPTIONS):
            problems.add("[grid]", f"unknown key {key!r} (use FitConfig keys or options.<head option>)")
        elif not isinstance(values, list) or not values:
            problems.add("[grid]", f"{key!r} must be a non-empty list of values, e.g. {key} = [a, b]")
        else:
            axes[key] = values
    if not axes:
        return [(None, {})]
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    return [(",".join(f"{k}={_show(v)}" for k, v in point.items()), point) for point in points]


def _variants(tables: list[dict[str, Any]], problems: Problems) -> list[tuple[str | None, dict[str, Any]]]:
    """(name, flat overrides) of every [[variant]]; one unnamed empty variant when there are none."""
    if not tables:
        return [(None, {})]
    out = []
    seen: set[str] = set()
    for i, table in enumerate(tables, 1):
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str) or not name.strip():
            problems.add(f"[[variant]] #{i}", 'needs a name, e.g. name = "mran-gated"')
            name = f"#{i}"
        elif name in seen:
            problems.add(f"variant {name!r}", "is defined twice (variant names must be unique)")
        seen.add(name)
        out.append((name, _flat(table, f"variant {name!r}", problems)))
    return out


def _run_name(variant: str | None, point: str | None) -> str:
    if point is None:
        return variant or "base"
    return point if variant is None else f"{variant}[{point}]"


def _show(value: Any) -> str:
    """A grid value as in TOML: true/false, numbers, bare strings, compact tables."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", "="))


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat keys back into FitConfig shape: "options.x" -> options = {x = ...}."""
    config: dict[str, Any] = {OPTIONS: {}}
    for key, value in flat.items():
        top, _, rest = key.partition(".")
        if top == OPTIONS and rest:
            config[OPTIONS][rest] = value
        else:
            config[key] = value
    return config


def _check_run(name: str, variant: str | None, point: str | None, config: dict[str, Any], who: str,
               problems: Problems) -> RunSpec | None:
    """The RunSpec when FitConfig, fit's ranges and the head accept `config`; else its problems are added."""
    try:
        cfg = FitConfig(**config, out="")
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            if err["type"] == "extra_forbidden":
                known = ", ".join(k for k in FitConfig.model_fields if k not in RESERVED)
                problems.add(who, f"unknown key {key!r} (known: {known})")
            else:
                problems.add(who, f"{key!r}: {err['msg']}")
        return None
    ok = True
    for check in (lambda: check_config(cfg), lambda: create_head(cfg.model, DUMMY_DIM, 2, **cfg.options)):
        try:
            check()
        except (MrantoolError, TypeError, ValueError) as exc:
            problems.add(who, str(exc))
            ok = False
    return RunSpec(name, variant, point, config, run_hash(config)) if ok else None


def _check_duplicates(runs: Iterable[RunSpec], problems: Problems) -> None:
    """Two runs with one resolved config would share a folder (and compare a run with itself)."""
    by_hash: dict[str, list[str]] = {}
    for run in runs:
        by_hash.setdefault(run.hash, []).append(run.name)
    for names in by_hash.values():
        if len(names) > 1:
            problems.add(f"runs {', '.join(repr(n) for n in names)}", "resolve to the same fit settings "
                         "(make them differ or drop one)")
