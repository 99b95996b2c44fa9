"""Pipeline semantics with small real stages: caching, staleness, drift, unavailable/skip, failures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from reidbuild import lockfile
from reidbuild.errors import CheckFailed, Unavailable
from reidbuild.pipeline import Planner, Stage, StageResult, run
from reidbuild.fsutil import HashCache


class Chain:
    """Three stages a -> b -> c, each writing bytes derived from its params and upstream file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src.txt"
        self.src.write_text("hello")
        self.params = {"a": 1, "b": 2, "c": 3}
        self.b_output_depends_on_param = True
        self.c_available = None
        self.c_fails = None

    def stages(self) -> list[Stage]:
        def a(ctx):
            return StageResult({"a.txt": self.src.read_bytes() + str(self.params["a"]).encode()})

        def b(ctx):
            up = ctx.artifact("a.txt").read_bytes()
            extra = str(self.params["b"]).encode() if self.b_output_depends_on_param else b""
            return StageResult({"b.txt": up + b"|" + extra}, {"note": "b ran"})

        def c(ctx):
            return StageResult({"c.txt": ctx.artifact("b.txt").read_bytes() + b"|c"}, failed=self.c_fails)

        return [
            Stage("a", a, params={"p": self.params["a"]}, inputs={"src": self.src}, outputs=("a.txt",)),
            Stage("b", b, params={"p": self.params["b"]}, deps=("a",), outputs=("b.txt",)),
            Stage("c", c, params={"p": self.params["c"]}, deps=("b",), outputs=("c.txt",),
                  available=lambda: self.c_available),
        ]

    def apply(self, **kw):
        events = []
        out = run(self.stages(), lock_path=self.root / "m.lock", manifest_entry={"path": "m.yml"},
                  output_dir=self.root / "out", base=self.root, emit=events.append, **kw)
        return out, events


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path)


def test_second_apply_runs_nothing(chain):
    first, _ = chain.apply()
    assert first.ran == ["a", "b", "c"]
    text = (chain.root / "m.lock").read_text()
    second, _ = chain.apply()
    assert second.ran == [] and second.cached == ["a", "b", "c"]
    assert (chain.root / "m.lock").read_text() == text


def test_param_change_reruns_only_downstream(chain):
    chain.apply()
    chain.params["b"] = 5
    out, _ = chain.apply()
    assert out.ran == ["b", "c"] and out.cached == ["a"]


def test_identical_upstream_bytes_stop_the_rerun(chain):
    chain.b_output_depends_on_param = False
    chain.apply()
    chain.params["b"] = 7
    out, _ = chain.apply()
    assert out.ran == ["b"] and out.cached == ["a", "c"]


def test_input_file_change_reruns_everything(chain):
    chain.apply()
    chain.src.write_text("changed")
    out, _ = chain.apply()
    assert out.ran == ["a", "b", "c"]


def test_deleted_and_modified_artifacts_are_rebuilt(chain):
    chain.apply()
    (chain.root / "out" / "b.txt").unlink()
    out, _ = chain.apply()
    assert out.ran == ["b"]
    (chain.root / "out" / "c.txt").write_bytes(b"tampered")
    plans = Planner(chain.stages(), lockfile.read(chain.root / "m.lock"), chain.root / "out", chain.root,
                    HashCache()).plan()
    assert [p.reasons for p in plans][2] == ["artifact c.txt was modified"]
    out, _ = chain.apply()
    assert out.ran == ["c"]
    assert (chain.root / "out" / "c.txt").read_bytes() != b"tampered"


def test_plan_marks_downstream_of_stale_as_stale(chain):
    chain.apply()
    chain.params["a"] = 9
    plans = Planner(chain.stages(), lockfile.read(chain.root / "m.lock"), chain.root / "out", chain.root,
                    HashCache()).plan()
    assert plans[0].reasons == ["parameters changed: p"]
    assert "upstream stage(s) a will run first" in plans[1].reasons[0]
    assert plans[2].stale


def test_locked_reports_drift_and_keeps_lock(chain):
    chain.apply()
    lock_before = (chain.root / "m.lock").read_bytes()
    (chain.root / "out" / "a.txt").unlink()
    out, _ = chain.apply(locked=True)  # same inputs: rebuilt bytes equal the lock
    assert out.ran == ["a"] and not out.drift
    chain.params["a"] = 2
    with pytest.raises(CheckFailed, match="stage a differs from the lock"):
        chain.apply(locked=True)
    assert (chain.root / "m.lock").read_bytes() == lock_before


def test_locked_without_lock_fails(chain):
    with pytest.raises(CheckFailed, match="no lock file"):
        chain.apply(locked=True)


def test_unavailable_stops_or_is_recorded_skipped(chain):
    chain.c_available = "TensorRT is not installed"
    with pytest.raises(Unavailable, match="TensorRT is not installed"):
        chain.apply()
    lock = lockfile.read(chain.root / "m.lock")
    assert set(lock.stages) == {"a", "b"}  # what ran before the stop is committed
    out, _ = chain.apply(skip_unavailable=True)
    assert out.skipped == ["c"]
    assert lockfile.read(chain.root / "m.lock").stages["c"].status == "skipped"
    chain.c_available = None
    out, _ = chain.apply()
    assert out.ran == ["c"]  # a skipped stage is stale until it really ran


def test_failed_check_is_recorded_and_rerun(chain):
    chain.c_fails = "parity failed"
    out, _ = chain.apply()
    assert out.failed == ["c: parity failed"]
    assert lockfile.read(chain.root / "m.lock").stages["c"].status == "failed"
    chain.c_fails = None
    out, _ = chain.apply()
    assert out.ran == ["c"]


def test_lock_is_sorted_plain_text(chain):
    chain.apply()
    text = (chain.root / "m.lock").read_text()
    assert text.startswith("# reidbuild lock file")
    assert text.index("  a:") < text.index("  b:") < text.index("  c:")
    rec = lockfile.read(chain.root / "m.lock").stages["a"]
    assert rec.inputs["src"]["path"] == "src.txt" and rec.inputs["src"]["size"] == 5
    assert rec.outputs["a.txt"]["path"] == "out/a.txt"


def test_symlink_planted_in_output_dir_is_replaced_not_followed(chain, tmp_path):
    chain.apply()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    target = chain.root / "out" / "b.txt"
    target.unlink()
    os.symlink(outside, target)
    out, _ = chain.apply()
    assert "b" in out.ran
    assert outside.read_text() == "precious"
    assert not target.is_symlink()


def test_corrupt_lock_is_a_clear_error(chain):
    (chain.root / "m.lock").write_text("version: 1\nstages:\n  a: 3\n")
    from reidbuild.errors import InputError

    with pytest.raises(InputError, match="lock file is corrupt"):
        chain.apply()
