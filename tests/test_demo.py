"""The README's main job: `reidbuild apply manifests/demo.yml` builds ONNX + Caffe and passes parity."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_demo_manifest_builds_and_passes_parity_on_caffe(tmp_path):
    for d in ("configs", "manifests", "test_data"):
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("*.lock"))
    m = tmp_path / "manifests" / "demo.yml"
    r = CliRunner().invoke(main, ["apply", str(m)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "outputs" / "demo"
    assert {"demo.onnx", "demo.prototxt", "demo.caffemodel"} <= {p.name for p in out.iterdir()}
    lock = lockfile.read(tmp_path / "manifests" / "demo.lock")
    for check in ("parity.onnxruntime", "parity.caffe"):
        rec = lock.stages[check]
        assert rec.status == "ok" and rec.record["passed"] and rec.record["images"] == 12, check
        assert rec.params["tolerance"]["rtol"] == 1e-3 and rec.params["tolerance"]["atol"] == 1e-5
    _check_report_and_rebuild(tmp_path, m, r.stdout)
    from reidbuild.backends.caffe import available

    runtime = lock.stages["parity.caffe"].record["backend"]["runtime"]
    if available("pycaffe") is not None:
        assert runtime == "opencv"
        pytest.skip(f"Caffe parity ran on OpenCV's importer: {available('pycaffe')}")
    assert runtime == "pycaffe"  # the reference Caffe runtime verified the demo's artifacts


@pytest.mark.parametrize("dialect", ["bvlc", "ceil_mode"])
def test_odd_input_size_and_batch_3_prototxt_pass_caffe_parity(tmp_path, dialect):
    """67x33 makes every stride-2 stage round; batch 3 in the prototxt with 5 images exercises chunking."""
    from tests.helpers import tiny_manifest

    m = tiny_manifest(tmp_path, height=67, width=33)
    m.write_text(m.read_text().replace("backends: [onnxruntime]", "backends: [onnxruntime, caffe]")
                 + f"targets:\n  caffe:\n    dialect: {dialect}\n    batch_size: 3\n")
    r = CliRunner().invoke(main, ["apply", str(m)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    rec = lockfile.read(tmp_path / "m.lock").stages["parity.caffe"]
    assert rec.status == "ok" and rec.record["images"] == 5 and rec.record["max_abs"] < 1e-4
    import re

    dims = [int(d) for d in re.findall(r"dim: (\d+)", (tmp_path / "out" / "tiny.prototxt").read_text())[:4]]
    assert dims == [3, 3, 67, 33]  # the input blob: N from targets.caffe.batch_size


def _check_report_and_rebuild(root: Path, m: Path, apply_stdout: str) -> None:
    """apply ends by naming the report; it loads in Chromium; `verify --rebuild` reproduces every artifact."""
    import json
    import re

    from tests import browser

    report = root / "outputs" / "demo" / "demo.report.html"
    assert apply_stdout.rstrip().splitlines()[-1] == f"report: {report}"
    if browser.chromium() is not None:  # the browser tests proper live in tests/report
        page = browser.load(report, root / "demo.png")
        assert page.errors == [] and re.search(r'id="verdict"[^>]*>PASS<', page.dom)
        assert 'id="retrieval-caffe"' in page.dom and 'id="retrieval-onnxruntime"' in page.dom
        assert page.dom.count('class="chart"') == 2 * 3 + 1  # cosine, max-abs, histogram per check; timeline
    r = CliRunner().invoke(main, ["verify", "--rebuild", "--json", "--quiet", str(m)], catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["ok"], doc
    verdicts = {a["file"]: a["verdict"] for a in doc["artifacts"]}
    assert verdicts.pop("demo.report.html") == "equivalent"  # records run times; same results
    assert set(verdicts.values()) == {"identical"} and len(verdicts) >= 7, verdicts
