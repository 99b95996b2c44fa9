"""Fixtures for the reliability suite: one clean tiny build per session, copied per test."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import tiny_manifest
from tests.reliability._util import ARTIFACTS, COUNTS, VOLATILE, cli, copy_project, sha


@dataclass
class Built:
    root: Path
    manifest: Path
    artifacts: dict[str, str]  # file name -> sha256
    lock_text: str

    @property
    def out(self) -> Path:
        return self.root / "out"


def build(root: Path, seed: int) -> Built:
    m = tiny_manifest(root, weights=f"{{random: {{seed: {seed}}}}}")
    code, out, err = cli("apply", m)
    assert code == 0, err
    arts = {n: sha(root / "out" / n) for n in ARTIFACTS}
    assert sorted(p.name for p in (root / "out").iterdir() if not p.name.startswith(".")) == sorted(ARTIFACTS + VOLATILE)
    return Built(root, m, arts, (root / "m.lock").read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """A clean tiny build (seed 1). Never modify it: use ``project``."""
    return build(tmp_path_factory.mktemp("clean_a"), seed=1)


@pytest.fixture
def project(built, tmp_path) -> Built:
    """A private copy of the clean build, to tamper with."""
    m = copy_project(built.root, tmp_path / "p")
    return Built(m.parent, m, dict(built.artifacts), built.lock_text)


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.write_sep("-", "reliability counts")
        for k in sorted(COUNTS):
            terminalreporter.write_line(f"{k}: {COUNTS[k]}")
