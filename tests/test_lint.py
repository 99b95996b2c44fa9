"""Lint runs with the tests: ruff (rules in pyproject.toml) must find nothing in the package, tests, benchmarks
and scripts, so `make test` and CI keep the code clean."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "reidbuild", "tests", "benchmarks", "scripts"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
