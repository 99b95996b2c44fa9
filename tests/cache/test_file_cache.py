"""The shared cache on a folder (file://): restore instead of build, integrity, concurrent pushes, gc and ls."""
from __future__ import annotations

import ast
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from click.testing import CliRunner

from reidbuild.cache import open_store
from reidbuild.cli import main
from reidbuild.pipeline import Stage, StageResult, run
from reidbuild.provenance import RUN_RECORD, OriginTracker, origins, public_url, write_run_record
from tests.helpers import tiny_manifest, tree

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def apply_in_fresh_process(*args: str) -> tuple[int, str, str, list[str]]:
    """`reidbuild apply` in a new interpreter; also returns which of torch, onnx and onnxruntime it imported."""
    # the command ends the process itself once its atexit handlers ran (reidbuild.launch.exit_now): the probe
    # is one of them, registered first so that it runs last
    code = ("import atexit, runpy, sys\nsys.argv = ['reidbuild', 'apply'] + sys.argv[1:]\n"
            "atexit.register(lambda: print('HEAVY', [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules],"
            " file=sys.stderr))\n"
            "runpy.run_module('reidbuild.cli', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    heavy = next(line for line in r.stderr.splitlines() if line.startswith("HEAVY "))[6:]
    return r.returncode, r.stdout, r.stderr, ast.literal_eval(heavy)


TRT = """\
targets:
  tensorrt: {mode: fp32, batch_size: 1}
"""


def test_second_clone_restores_everything_byte_identical(tmp_path):
    cache = f"file://{tmp_path / 'cache'}"
    first, second = tiny_manifest(tmp_path / "a", extra=TRT), tiny_manifest(tmp_path / "b", extra=TRT)
    code, out, err = cli("apply", str(first), "--cache", cache, "--skip-unavailable", "--json")
    assert code == 0, err
    built = json.loads(out)
    assert built["ran"] == ["load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report"]
    assert not built["restored"]
    code, out, err, heavy = apply_in_fresh_process(str(second), "--cache", cache, "--skip-unavailable", "--json")
    assert code == 0, err
    assert heavy == [], "a restore needs none of the model libraries"
    again = json.loads(out)
    assert again["ran"] == [] and again["restored"] == built["ran"]
    assert not [e for e in again["events"] if e["kind"] == "start"], "a stage ran instead of being restored"
    assert "restored from cache" in err
    assert again["skipped"] == ["tensorrt.engine"]  # no TensorRT here: no environment, so no key to look up
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    # byte-identical locks: a restore records the builder's run times, so the restored report matches too
    assert (tmp_path / "a" / "m.lock").read_bytes() == (tmp_path / "b" / "m.lock").read_bytes()
    # ... and the provenance lives in the run record next to the artifacts: built there, restored here
    assert origins(tmp_path / "a" / "out") == dict.fromkeys(built["ran"], "built")
    record = json.loads((tmp_path / "b" / "out" / RUN_RECORD).read_text())["stages"]
    assert again["provenance"] == str(tmp_path / "b" / "out" / RUN_RECORD)
    entries = {e.stage: e.key for e in open_store(cache).entries()}
    for stage in built["ran"]:
        assert record[stage]["origin"] == "restored" and record[stage]["cache"] == cache
        assert record[stage]["key"] == entries[stage] and record[stage]["pushed"]
    # the restored clone is a normal up-to-date build: verify passes, a third apply does nothing and keeps
    # the record of where the bytes came from
    assert cli("verify", str(second))[0] == 0
    code, out, _ = cli("apply", str(second), "--cache", cache, "--skip-unavailable", "--json")
    assert json.loads(out)["cached"] == built["ran"]
    assert json.loads((tmp_path / "b" / "out" / RUN_RECORD).read_text())["stages"] == record
    # the text summary says so too
    (tmp_path / "b" / "out" / "tiny.onnx").unlink()
    code, out, _ = cli("apply", str(second), "--cache", cache, "--skip-unavailable")
    assert code == 0 and f"restored from cache {cache}: onnx.simplify (each artifact's origin:" in out
    assert origins(tmp_path / "b" / "out")["onnx.simplify"] == "restored"


# ----------------------------------------------------------------- small stages: fast, exact semantics


def stages(root: Path, calls: list[str], env: dict | None = None) -> list[Stage]:
    src = root / "src.txt"
    if not src.exists():
        src.write_text("person")

    def a(ctx):
        calls.append("a")
        return StageResult({"a.bin": src.read_bytes() * 1000}, {"note": "a", "value": 0.1})

    def b(ctx):
        calls.append("b")
        return StageResult({"b.bin": ctx.artifact("a.bin").read_bytes()[::-1]}, {"note": "b"})

    engine = Stage("e", lambda ctx: (calls.append("e"), StageResult({"e.plan": os.urandom(64)}))[1], deps=("b",),
                   outputs=("e.plan",), reproducible=False, environment=(lambda: env) if env else None)
    return [Stage("a", a, params={"p": 1}, inputs={"src": src}, outputs=("a.bin",)),
            Stage("b", b, deps=("a",), outputs=("b.bin",)), engine]


def apply(root: Path, url: str, calls: list[str], env: dict | None = None, **kw):
    events = []
    store = open_store(url, **kw)
    out = run(stages(root, calls, env), lock_path=root / "m.lock", manifest_entry={"path": "m.yml"},
              output_dir=root / "out", base=root, emit=events.append, store=store)
    return out, events, store


def clone(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def test_force_runs_instead_of_restoring(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    apply(clone(tmp_path, "a"), url, [])
    calls: list[str] = []
    root = clone(tmp_path, "b")
    out = run(stages(root, calls), lock_path=root / "m.lock", manifest_entry={"path": "m.yml"},
              output_dir=root / "out", base=root, emit=lambda ev: None, store=open_store(url), force=True)
    assert out.restored == [] and calls == ["a", "b", "e"]


def test_corrupt_blob_is_never_used_rebuilt_and_reported(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    apply(clone(tmp_path, "a"), url, [])
    blob = next(p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file() and p.stat().st_size == 6000)
    blob.write_bytes(b"x" * 6000)  # same size, wrong bytes
    calls: list[str] = []
    out, events, store = apply(clone(tmp_path, "b"), url, calls)
    assert calls[:1] == ["a"] and "a" in out.ran and "a" not in out.restored
    assert any("corrupt" in p for p in store.problems)
    assert any(e.kind == "warn" and "corrupt" in e.message for e in events)
    assert (tmp_path / "b" / "out" / "a.bin").read_bytes() == b"person" * 1000
    assert blob.read_bytes() == b"person" * 1000, "the rebuilt stage repairs the blob"


def test_damaged_entry_is_ignored_and_reported(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    apply(clone(tmp_path, "a"), url, [])
    for p in (tmp_path / "cache" / "actions").rglob("*.json"):
        p.write_text("{not json")
    calls: list[str] = []
    out, _, store = apply(clone(tmp_path, "b"), url, calls)
    assert out.restored == [] and calls[:2] == ["a", "b"]
    assert any("damaged" in p for p in store.problems)


def test_non_reproducible_stage_keyed_by_environment(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    a10 = {"gpu": "NVIDIA A10", "compute_capability": "8.6", "tensorrt": "10.3.0", "cuda_runtime": "12.4"}
    apply(clone(tmp_path, "a"), url, [], env=a10)
    calls: list[str] = []
    out, _, _ = apply(clone(tmp_path, "b"), url, calls, env=a10)
    assert out.restored == ["a", "b", "e"] and calls == []
    assert (tmp_path / "a" / "out" / "e.plan").read_bytes() == (tmp_path / "b" / "out" / "e.plan").read_bytes()
    calls = []
    out, _, _ = apply(clone(tmp_path, "c"), url, calls, env={**a10, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    assert out.restored == ["a", "b"] and calls == ["e"], "an engine from another GPU must not be restored"
    calls = []
    out, _, _ = apply(clone(tmp_path, "d"), url, calls, env=None)
    assert out.restored == ["a", "b"] and calls == ["e"], "no environment here: the engine is not shareable"


def test_concurrent_pushes_of_the_same_entry(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    roots = [clone(tmp_path, f"r{i}") for i in range(4)]
    barrier = threading.Barrier(len(roots))
    errors: list[BaseException] = []

    def build(root: Path) -> None:
        try:
            barrier.wait()
            apply(root, url, [])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(r,)) for r in roots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    calls: list[str] = []
    out, _, store = apply(clone(tmp_path, "after"), url, calls)
    assert out.restored == ["a", "b"] and calls == ["e"] and store.problems == []


def test_ls_and_gc(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    apply(clone(tmp_path, "a"), url, [])
    code, out, _ = cli("cache", "ls", "--cache", url, "--json")
    rows = json.loads(out)["entries"]
    assert code == 0 and sorted(r["stage"] for r in rows) == ["a", "b"]
    assert {r["stage"]: r["bytes"] for r in rows} == {"a": 6000, "b": 6000}
    # age entry "a" and every blob by 10 days; "b" stays fresh, and so does the blob it names
    old = (dt.datetime.now() - dt.timedelta(days=10)).timestamp()
    entry_a = next(r["key"] for r in rows if r["stage"] == "a")
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file() and (p.parent.parent.name == "blobs" or p.stem == entry_a):
            os.utime(p, (old, old))
    code, out, _ = cli("cache", "gc", "--cache", url, "--keep-days", "7", "--json")
    assert code == 0 and json.loads(out) | {"cache": None} == {
        "cache": None, "entries_removed": 1, "blobs_removed": 1, "bytes_freed": 6000}
    code, out, _ = cli("cache", "ls", "--cache", url, "--json")
    assert [r["stage"] for r in json.loads(out)["entries"]] == ["b"]
    calls: list[str] = []
    out_, _, _ = apply(clone(tmp_path, "b"), url, calls)
    assert calls == ["a", "e"] and out_.restored == ["b"]


def test_cache_required_and_bad_url(tmp_path):
    m = tiny_manifest(tmp_path)
    code, _, err = cli("apply", str(m), "--cache", "nosuchscheme://x/y")
    assert code == 2 and "--cache nosuchscheme://x/y" in err and "Traceback" not in err


def test_run_record_names_each_origin_and_keeps_it_while_the_bytes_stay(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    apply(clone(tmp_path, "a"), url, [])
    root = clone(tmp_path, "b")

    def go() -> dict:
        store = open_store(url)
        tracker = OriginTracker(lambda ev: None)
        run(stages(root, []), lock_path=root / "m.lock", manifest_entry={"path": "m.yml"}, output_dir=root / "out",
            base=root, emit=tracker, store=store)
        path = write_run_record(root / "out", root / "m.lock", tracker, url, store.restored_from, {})
        return json.loads(path.read_text())["stages"]

    first = go()
    assert {k: v["origin"] for k, v in first.items()} == {"a": "restored", "b": "restored", "e": "built"}
    assert first["a"]["key"] == next(e.key for e in open_store(url).entries() if e.stage == "a")
    assert first["e"]["host"] and "cache" not in first["e"]
    assert go() == first, "an up-to-date stage keeps the origin of its bytes"
    (root / "out" / RUN_RECORD).unlink()
    assert {k: v["origin"] for k, v in go().items()} == dict.fromkeys("abe", "unknown")
    assert public_url("s3://KEY:SECRET@bucket/team") == "s3://bucket/team" and public_url(url) == url
