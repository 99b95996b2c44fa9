"""verify --rebuild and a shared cache: audited by default (a planted entry fails it), restored from only with
--trust-cache (and then reported as restored, not reproduced)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

from reidbuild.cache import open_store
from reidbuild.cli import main
from tests.helpers import tiny_manifest

STAGES = ["load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report"]


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def plant(url: str, stage: str) -> str:
    """Do what anyone with write access to the cache can: point the stage's entry at other, intact bytes (here
    its ONNX model with one weight changed). Returns the planted file's name."""
    store = open_store(url)
    entry_key = next(e.key for e in store.entries() if e.stage == stage)
    entry = store.read_entry(entry_key)
    fname = next(iter(entry["outputs"]))
    model = onnx.load_from_string(store.fs.cat_file(store.blob_path(entry["outputs"][fname]["sha256"])))
    init = next(t for t in model.graph.initializer if numpy_helper.to_array(t).size > 100)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += np.float32(0.5)
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    data = model.SerializeToString()
    digest = store.push_blobs({fname: data}, None)[fname]
    entry["outputs"][fname] = {"sha256": digest, "size": len(data)}
    store.fs.pipe_file(store.entry_path(entry_key), json.dumps(entry).encode())
    return fname


def test_verify_rebuild_audits_the_cache_and_trusts_it_only_when_asked(tmp_path):
    url = f"file://{tmp_path / 'cache'}"
    m = tiny_manifest(tmp_path / "p")
    assert cli("apply", str(m), "--cache", url)[0] == 0

    # REIDBUILD_CACHE set (as on a CI runner): every stage is still rebuilt here, and the cache is audited
    code, out, err = cli("verify", str(m), "--rebuild", env={"REIDBUILD_CACHE": url})
    assert code == 0, out + err
    assert all(f"==> {s}: running" in err for s in STAGES) and "restored from cache" not in err
    # the byte-reproducible ones: parity results and the report are float/timing facts, not compared bytewise
    assert "the cache agrees for all 3 stage(s) it holds" in out

    # an honest cache, trusted: nothing runs, and nothing is claimed as reproduced
    code, out, err = cli("verify", str(m), "--rebuild", "--cache", url, "--trust-cache", "--json")
    rep = json.loads(out)
    assert code == 0 and "==> " not in err
    assert rep["counts"]["restored"] == len(rep["artifacts"]) and rep["counts"]["identical"] == 0
    code, out, _ = cli("verify", str(m), "--rebuild", "--cache", url, "--trust-cache")
    assert "0 artifact(s) reproduced" in out and "restored from the cache (not rebuilt" in out

    # a planted entry: intact blobs, wrong bytes for the fingerprint
    fname = plant(url, "onnx.simplify")
    code, out, err = cli("verify", str(m), "--rebuild", "--cache", url)
    assert code == 1 and "Traceback" not in err
    assert f"CACHE MISMATCH stage onnx.simplify: {fname}" in out
    assert "the cache holds other bytes than this rebuild for 1 stage(s)" in err
    # trusted, the planted bytes are restored and differ from the lock: caught, as the first difference
    code, out, err = cli("verify", str(m), "--rebuild", "--cache", url, "--trust-cache")
    assert code == 1 and "stage onnx.simplify is the first whose output differs" in err

    code, _, err = cli("verify", str(m), "--rebuild", "--trust-cache", env={"REIDBUILD_CACHE": ""})
    assert code == 2 and "--trust-cache needs --rebuild and a cache" in err
