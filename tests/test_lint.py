"""Lint and types run with the tests: ruff (rules in pyproject.toml) must find nothing in the package, tests, benchmarks
and scripts, and mypy --strict nothing in the package, so `make test` and CI keep the code clean."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "reidbuild", "tests", "benchmarks", "scripts"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_is_clean():
    """mypy --strict on the package (the [tool.mypy] settings in pyproject.toml); the tests are not type-checked."""
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
                        "--config-file", "pyproject.toml"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout + r.stderr
