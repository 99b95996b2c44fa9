"""The run loop's named commit points (``pipeline.add_commit_hook``): they fire in the documented order, and
at each one the files on disk are in the state docs/CONTRACTS.md promises (what a kill -9 there leaves)."""
from __future__ import annotations

from pathlib import Path

import pytest

from reidbuild import lockfile, pipeline
from reidbuild.fsutil import sha256_file
from reidbuild.pipeline import Stage, StageResult, run


def _stages(src: Path, tag: str) -> list[Stage]:
    def a(ctx: pipeline.StageContext) -> StageResult:
        return StageResult({"a.txt": src.read_bytes() + tag.encode()})

    def b(ctx: pipeline.StageContext) -> StageResult:
        return StageResult({"b.txt": ctx.artifact("a.txt").read_bytes() + b"|b",
                            "b2.txt": b"second " + tag.encode()})

    return [Stage("a", a, params={"tag": tag}, inputs={"src": src}, outputs=("a.txt",)),
            Stage("b", b, params={"tag": tag}, deps=("a",), outputs=("b.txt", "b2.txt"))]


def _apply(root: Path, tag: str, **kw: object) -> pipeline.RunOutcome:
    return run(_stages(root / "src.txt", tag), lock_path=root / "m.lock", manifest_entry={"path": "m.yml"},
               output_dir=root / "out", base=root, emit=lambda ev: None, **kw)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "src.txt").write_text("hello")
    return tmp_path


def _on_disk(root: Path) -> dict[str, str]:
    """file -> sha256 the lock on disk records (empty without a lock)."""
    lock = lockfile.read(root / "m.lock")
    return {f: e["sha256"] for _, f, e in lockfile.iter_artifacts(lock)} if lock else {}


def test_commit_points_fire_in_order_and_each_leaves_the_promised_state(root: Path) -> None:
    _apply(root, "old")
    old = _on_disk(root)
    seen: list[tuple[str, str, str]] = []

    def check(point: str, stage: str, file: str) -> None:
        seen.append((point, stage, file))
        locked = _on_disk(root)
        if point == "artifact_replaced":  # the new bytes are in place, the lock still names the old ones
            assert sha256_file(root / "out" / file) != old[file] == locked[file]
        elif point == "lock_synced":  # a complete temp lock with the new entry; the lock itself is unchanged
            temps = list(root.glob(".m.lock.tmp-*"))
            assert len(temps) == 1
            pending = lockfile.read(temps[0])
            assert pending is not None and pending.stages[stage].status == "ok"
            assert all(locked[f] == old[f] for f in pending.stages[stage].outputs)
        elif point in ("lock_written", "stage_done") and stage:  # the lock names exactly the bytes on disk
            for f in lockfile.read(root / "m.lock").stages[stage].outputs:  # type: ignore[union-attr]
                assert locked[f] == sha256_file(root / "out" / f) != old[f]

    remove = pipeline.add_commit_hook(check)
    try:
        _apply(root, "new")
    finally:
        remove()
    assert seen == [("artifact_replaced", "a", "a.txt"), ("lock_synced", "a", "m.lock"),
                    ("lock_written", "a", "m.lock"), ("stage_done", "a", ""),
                    ("artifact_replaced", "b", "b.txt"), ("artifact_replaced", "b", "b2.txt"),
                    ("lock_synced", "b", "m.lock"), ("lock_written", "b", "m.lock"), ("stage_done", "b", ""),
                    ("lock_written", "", "m.lock")]  # the final write finds the lock complete: no temp file
    assert set(pipeline.COMMIT_POINTS) == {p for p, _, _ in seen}


def test_locked_and_no_op_runs_write_nothing_and_only_pass_between_stages(root: Path) -> None:
    _apply(root, "x")
    text = (root / "m.lock").read_text()
    for kw in ({}, {"locked": True}):
        seen: list[tuple[str, str, str]] = []
        remove = pipeline.add_commit_hook(lambda p, s, f, seen=seen: seen.append((p, s, f)))
        try:
            out = _apply(root, "x", **kw)
        finally:
            remove()
        assert out.cached == ["a", "b"]
        written = [("lock_written", "", "m.lock")] if not kw else []  # apply's final write is a no-op
        assert seen == [("stage_done", "a", ""), ("stage_done", "b", "")] + written
        assert (root / "m.lock").read_text() == text


def test_a_removed_hook_is_not_called(root: Path) -> None:
    seen: list[str] = []
    pipeline.add_commit_hook(lambda p, s, f: seen.append(p))()
    _apply(root, "y")
    assert seen == []
