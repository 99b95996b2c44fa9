"""Tamper and drift detection: ``verify`` and ``apply --locked`` notice a flipped byte in any artifact, a replaced
checkpoint, an edited patch file or config, and a different tool version.

``apply --locked`` is CI mode: it fails (exit 1, lock untouched) when the build would differ from the lock.
A damaged artifact whose inputs are unchanged is rebuilt and proven byte-equal to the lock (the damage is
named on stderr and repaired); anything that changes what would be built is refused.
"""
from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, tiny_manifest, tiny_model, write_checkpoint
from tests.reliability._util import ARTIFACTS, cli, count, sha

ARTIFACT_STAGE = {"tiny.fastreid.json": "load", "tiny.export.onnx": "onnx.export", "tiny.onnx": "onnx.simplify"}


def _locked_refuses(project_root: Path, m: Path, needle: str) -> str:
    lock_before = (project_root / "m.lock").read_bytes()
    arts_before = {n: sha(project_root / "out" / n) for n in ARTIFACTS if (project_root / "out" / n).exists()}
    code, out, err = cli("apply", "--locked", m)
    assert code == 1, err
    assert needle in err, err
    assert (project_root / "m.lock").read_bytes() == lock_before, "--locked rewrote the lock"
    assert {n: sha(project_root / "out" / n) for n in arts_before} == arts_before, "--locked wrote artifacts"
    return err


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte_anywhere_in_any_artifact(project):
    for name in ARTIFACTS:
        art = project.out / name
        good = art.read_bytes()
        for offset in (0, len(good) // 3, len(good) - 1):
            _flip(art, offset)
            code, out, _ = cli("verify", project.manifest)
            assert code == 1, f"{name}@{offset}: {out}"
            assert f"artifact {name} differs from the lock" in out
            art.write_bytes(good)
            count("tamper: single flipped bytes caught by verify")
    code, out, _ = cli("verify", project.manifest)
    assert code == 0, out


@pytest.mark.parametrize("name", ARTIFACTS)
def test_locked_apply_fails_on_a_flipped_byte_and_touches_nothing(project, name):
    art = project.out / name
    _flip(art, len(art.read_bytes()) // 2)
    damaged = sha(art)
    err = _locked_refuses(project.root, project.manifest, f"artifact {name} was modified")
    assert "--locked" in err and sha(art) == damaged  # reported, not silently repaired
    # a normal apply then repairs it, and the result equals the lock again
    code, out, err = cli("apply", project.manifest)
    assert code == 0, err
    assert sha(art) == project.artifacts[name]
    code, out, err = cli("verify", project.manifest)
    assert code == 0, out
    count("tamper: single flipped bytes caught by apply --locked")


def test_flipped_byte_with_a_stale_hash_cache_mtime(project):
    """Same size, same mtime: the content hash still sees it (no size/mtime shortcut across runs)."""
    import os

    art = project.out / "tiny.onnx"
    st = art.stat()
    data = bytearray(art.read_bytes())
    data[12345] ^= 0x80
    art.write_bytes(bytes(data))
    os.utime(art, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, _ = cli("verify", project.manifest)
    assert code == 1 and "artifact tiny.onnx differs from the lock" in out


def test_replaced_checkpoint(tmp_path):
    m = tiny_manifest(tmp_path, weights="model_final.pth")
    write_checkpoint(tiny_model(tmp_path, 7), tmp_path / "model_final.pth")
    code, out, err = cli("apply", m)
    assert code == 0, err
    write_checkpoint(tiny_model(tmp_path, 8), tmp_path / "model_final.pth")  # same layout and size, other weights
    code, out, _ = cli("verify", m)
    assert code == 1 and "input weights model_final.pth changed" in out
    _locked_refuses(tmp_path, m, "stage load differs from the lock")
    count("tamper: replaced checkpoint")


def test_edited_config(project):
    cfg = project.root / "cfg" / "config.yml"
    cfg.write_text(cfg.read_text().replace("NECK_FEAT: before", "NECK_FEAT: after"))
    code, out, _ = cli("verify", project.manifest)
    assert code == 1 and "input config cfg/config.yml changed" in out
    _locked_refuses(project.root, project.manifest, "stage load differs from the lock")
    count("tamper: edited config")


def test_edited_patch_file(tmp_path):
    shutil.copy(REPO / "graph_patches" / "onnx" / "rename_output.yml", tmp_path / "rename.yml")
    m = tiny_manifest(tmp_path)
    m.write_text(m.read_text() + "targets:\n  onnx:\n    patches: [rename.yml]\n")
    code, out, err = cli("apply", m)
    assert code == 0, err
    patch = tmp_path / "rename.yml"
    patch.write_text(patch.read_text().replace("to: feat", "to: embedding"))
    code, out, _ = cli("verify", m)
    assert code == 1 and "input patch[0] rename.yml changed" in out
    err = _locked_refuses(tmp_path, m, "stage onnx.patch differs from the lock")
    assert "inputs changed: patch[0]" in err
    count("tamper: edited patch file")


def _set_locked_tool(lock_path: Path, tool: str, version: str) -> list[str]:
    doc = yaml.safe_load(lock_path.read_text())
    touched = []
    for name, rec in doc["stages"].items():
        if tool in rec.get("tools", {}):
            rec["tools"][tool] = version
            touched.append(name)
    lock_path.write_text("# edited\n" + yaml.safe_dump(doc, sort_keys=True))
    return touched


def test_tool_version_recorded_in_the_lock_differs(project):
    """The lock says the ONNX artifacts were built with another onnx release than the one installed here."""
    here = importlib.metadata.version("onnx")
    touched = _set_locked_tool(project.root / "m.lock", "onnx", "1.0.0")
    assert "onnx.export" in touched
    code, out, _ = cli("verify", project.manifest)
    assert code == 1
    assert f"stage onnx.export: onnx is {here} here, the lock was built with 1.0.0" in out
    _locked_refuses(project.root, project.manifest, "stage onnx.export differs from the lock")
    count("tamper: tool version drift")


def test_tool_version_installed_here_differs(project, monkeypatch):
    """A different onnx install (simulated at the metadata level): fingerprints change, --locked refuses."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "9.9.9" if n == "onnx" else real(n))
    code, out, _ = cli("verify", project.manifest)
    assert code == 1 and "stage onnx.export: onnx is 9.9.9 here, the lock was built with" in out
    err = _locked_refuses(project.root, project.manifest, "stage onnx.export differs from the lock")
    assert "tool versions changed: onnx" in err


def test_same_size_rewrite_with_restored_mtime_after_a_warm_stat_cache(project):
    """apply keeps a stat cache; a rewrite that keeps the size and puts the mtime back must still be caught by
    verify and apply --locked, which never read that cache."""
    import os

    code, out, err = cli("apply", project.manifest)  # warms the stat cache for the copied project
    assert code == 0, err
    assert (project.out / ".reidbuild-hashes.json").is_file()
    art = project.out / "tiny.onnx"
    st = art.stat()
    _flip(art, st.st_size // 2)
    os.utime(art, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert art.stat().st_size == st.st_size and art.stat().st_mtime_ns == st.st_mtime_ns
    code, out, _ = cli("verify", project.manifest)
    assert code == 1 and "artifact tiny.onnx differs from the lock" in out
    _locked_refuses(project.root, project.manifest, "artifact tiny.onnx was modified")
    count("tamper: same-size rewrites with a restored mtime caught by verify and --locked")


def test_a_forged_stat_cache_fools_neither_verify_nor_locked(project):
    """The stat cache is a speed-up for apply, not evidence: a cache entry forged to match a tampered file
    (its stat fields, the lock's hash) changes nothing for verify and apply --locked."""
    import json
    import os

    code, out, err = cli("apply", project.manifest)
    assert code == 0, err
    art = project.out / "tiny.onnx"
    _flip(art, 100)
    state = project.out / ".reidbuild-hashes.json"
    doc = json.loads(state.read_text())
    st = art.stat()
    doc["entries"][str(art.absolute())] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                           st.st_mtime_ns + 10**10, 1, project.artifacts["tiny.onnx"]]
    state.write_text(json.dumps(doc))
    code, out, _ = cli("verify", project.manifest)
    assert code == 1 and "artifact tiny.onnx differs from the lock" in out
    _locked_refuses(project.root, project.manifest, "artifact tiny.onnx was modified")
    os.unlink(state)
