"""Fixtures for the reliability suite: one clean tiny build per session, copied per test."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import tiny_manifest
from tests.reliability import _util
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


def pytest_collection_modifyitems(session, config, items):
    """Note which reliability modules run whole (test_counts.py checks their floors) and run test_counts.py last,
    after the tests whose counts it adds up."""
    whole = not config.option.keyword and not config.option.markexpr and not any("::" in str(a) for a in config.args)
    _util.WHOLE_MODULES.clear()
    if whole:
        _util.WHOLE_MODULES.update(Path(str(i.fspath)).name for i in items if "reliability" in Path(str(i.fspath)).parts)
    items.sort(key=lambda i: Path(str(i.fspath)).name == "test_counts.py")


def pytest_deselected(items):
    for i in items:  # a deselected test of a module means that module did not run whole
        _util.DESELECTED_MODULES.add(Path(str(i.fspath)).name)


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.write_sep("-", "reliability counts")
        for k in sorted(COUNTS):
            terminalreporter.write_line(f"{k}: {COUNTS[k]}")
