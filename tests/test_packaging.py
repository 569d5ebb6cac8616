"""What the package promises about itself: the Python versions it declares, and the benchmark scripts' --help."""

from __future__ import annotations

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
