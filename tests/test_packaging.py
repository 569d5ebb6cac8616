"""What the package promises about itself: the Python versions it declares, lint-clean code, and one-way imports."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_code_runs_on_the_declared_minimum_python() -> None:
    """vermin finds the oldest Python each module needs (tomllib is 3.11+); it must not exceed requires-python."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared.startswith(">="), declared
    minimum = declared[2:].strip()
    exe = Path(sys.executable).parent / "vermin"
    result = subprocess.run([str(exe if exe.is_file() else "vermin"), "--no-tips", "--violations", "--eval-annotations",
                             f"--target={minimum}-", "mrantool", "benchmarks", "tests"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_ruff_clean() -> None:
    exe = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(exe if exe.is_file() else "ruff"), "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _imports() -> dict[str, set[str]]:
    """Every mrantool module and the mrantool modules it imports, at the top or inside a function."""
    files = {}
    for path in (ROOT / "mrantool").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*package[:len(package) - node.level + 1], node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                found.update(subs if len(subs) == len(node.names) else [base, *subs])
        graph[name] = set()
        for target in found:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def test_imports_have_no_cycles_even_deferred_ones() -> None:
    """The package's modules import one way (docs/architecture.md); a function-level import counts too."""
    try:
        list(graphlib.TopologicalSorter(_imports()).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_layers_keep_their_contracts() -> None:
    """Models never read slides or stores; the store never imports torch (docs/architecture.md)."""
    graph = _imports()
    for name, targets in graph.items():
        if name.startswith("mrantool.models"):
            assert not any(t.startswith(("mrantool.store", "mrantool.slides")) for t in targets), (name, targets)
    for path in (ROOT / "mrantool" / "store").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(m.split(".")[0] == "torch" for m in modules), path
