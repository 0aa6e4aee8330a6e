"""The house style is checked, not only written down: ruff over the code, mypy (strict) over ``app/``.

Both read their settings from ``pyproject.toml`` (``[tool.ruff.lint]``, ``[tool.mypy]``) and run as the CI runs them,
from the repository root with the interpreter of the test run; they come with the ``test`` extra and skip with a
reason where they are not installed. Neither leaves files in the repository: ruff runs without its cache, mypy keeps
its cache in the system temp folder.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF_PATHS = ("app", "tests", "scripts", "benchmarks")


def _run(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it comes with the test extra: pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_ruff_finds_nothing() -> None:
    r = _run("ruff", "check", "--no-cache", "--output-format", "concise", *RUFF_PATHS, timeout=300)
    assert r.returncode == 0, f"ruff check {' '.join(RUFF_PATHS)} failed:\n{r.stdout}\n{r.stderr}"


@pytest.mark.slow
def test_mypy_strict_finds_nothing_in_app() -> None:
    cache = Path(tempfile.gettempdir()) / "vald-md-mypy-cache"
    r = _run("mypy", "--cache-dir", str(cache), "app", timeout=900)
    assert r.returncode == 0, f"mypy app failed:\n{r.stdout}\n{r.stderr}"
