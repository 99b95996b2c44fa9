"""The HTML parity report: written by apply as a locked artifact, by `reidbuild report`, and checked in a real
headless Chromium (no console error, not blank, key sections present) for a passing and a failing build."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reidbuild import featurefile, lockfile
from reidbuild.cli import main
from reidbuild.compare import compare
from tests import browser
from tests.helpers import REPO, tiny_manifest, write

# the head's output after the BN neck, so the graph keeps a BatchNormalization (the backbone's fold into convs)
NECK_AFTER = "NECK_FEAT: after"
# a broken build: the patch drops the output normalisation (the BN neck) from the exported graph
DROP_NORM = """\
format: onnx
description: broken on purpose - drops the BN neck that normalises the output features
ops:
  - op: remove_node
    select: {type: BatchNormalization}
"""


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def project(root: Path, broken: bool) -> Path:
    m = tiny_manifest(root)
    cfg = root / "cfg" / "config.yml"
    cfg.write_text(cfg.read_text().replace("NECK_FEAT: before", NECK_AFTER))
    if broken:
        write(root / "drop_norm.yml", DROP_NORM)
        m.write_text(m.read_text() + "targets:\n  onnx:\n    patches: [drop_norm.yml]\n")
    return m


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    root = tmp_path_factory.mktemp("pass")
    m = project(root, broken=False)
    code, _, err = cli("apply", str(m))
    assert code == 0, err
    return root, m


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail")
    m = project(root, broken=True)
    code, _, err = cli("apply", str(m))
    assert code == 1 and "parity onnxruntime" in err, err
    return root, m


@pytest.fixture
def chromium_present():
    """The browser is part of the test set-up (`make test` installs it): missing, these tests fail, not skip."""
    if browser.chromium() is None:
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it) or apt-get install chromium")


needs_chromium = pytest.mark.usefixtures("chromium_present")


def test_report_is_a_locked_artifact_rebuilt_only_when_results_change(passing):
    root, m = passing
    lock = lockfile.read(root / "m.lock")
    assert list(lock.stages)[-1] == "report"
    rec = lock.stages["report"]
    assert rec.status == "ok" and set(rec.outputs) == {"tiny.report.html"}
    assert rec.outputs["tiny.report.html"]["reproducible"] is False
    assert all(r.seconds is not None and r.seconds >= 0 for r in lock.stages.values())
    features = featurefile.load(root / "out" / "tiny.parity.onnxruntime.npz")
    assert features["reference"].shape == features["actual"].shape == (5, 512)
    assert list(features["images"]) == [f"im{i}.png" for i in range(5)]
    # a no-op apply leaves it cached; a changed tolerance changes the parity results, so it is rebuilt
    code, _out, err = cli("apply", str(m))
    assert code == 0 and "report: up to date" in err
    m.write_text(m.read_text().replace("backends: [onnxruntime]", "backends: [onnxruntime]\n  rtol: 2.0e-3"))
    try:
        code, _, err = cli("apply", str(m))
        assert code == 0 and "==> report: running" in err, err
        assert "rtol=0.002" in (root / "out" / "tiny.report.html").read_text()
    finally:
        m.write_text(m.read_text().replace("\n  rtol: 2.0e-3", ""))
        assert cli("apply", str(m))[0] == 0


def test_noop_apply_imports_neither_torch_nor_pil(passing):
    _root, m = passing
    code = ("import sys; from reidbuild.cli import main\n"
            "try:\n    main(['apply', sys.argv[1]])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "bad = [x for x in ('torch', 'PIL') if x in sys.modules]\nassert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code, str(m)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_report_command_writes_the_page_without_rebuilding(passing, tmp_path):
    root, m = passing
    before = {p.name: p.stat().st_mtime_ns for p in (root / "out").iterdir()}
    lock_text = (root / "m.lock").read_text()
    target = tmp_path / "r.html"
    code, out, err = cli("report", str(m), "--output", str(target))
    assert code == 0, err
    assert out.strip() == str(target) and target.stat().st_size > 10_000
    assert {p.name: p.stat().st_mtime_ns for p in (root / "out").iterdir()} == before
    assert (root / "m.lock").read_text() == lock_text
    # refuses to overwrite the locked artifact
    code, _, err = cli("report", str(m), "--output", str(root / "out" / "tiny.report.html"))
    assert code == 2 and "an artifact the lock records" in err


@needs_chromium
def test_passing_report_in_headless_chromium(passing, tmp_path):
    root, _ = passing
    page = browser.load(root / "out" / "tiny.report.html", tmp_path / "pass.png")
    assert page.errors == [], page.errors
    assert browser.pixel_stddev(page.screenshot) > 20
    dom = page.dom
    assert re.search(r'id="verdict"[^>]*>PASS<', dom)
    for key in ('id="summary"', 'id="check-onnxruntime"', 'id="retrieval-onnxruntime"', 'id="timeline"',
                'id="artifacts"', 'id="environment"', "tiny.onnx", "max_abs"):
        assert key in dom, key
    assert dom.count('class="chart"') >= 4  # cosine, max-abs, histogram per check + the timeline
    assert dom.count('class="thumb ') >= 5 * (1 + 2 * 4)  # 5 queries: the query and two top-4 rows each
    assert "http://" not in dom and "https://" not in dom  # self-contained


@needs_chromium
def test_failing_report_names_the_minimal_tolerances(failing, tmp_path):
    root, _m = failing
    page = browser.load(root / "out" / "tiny.report.html", tmp_path / "fail.png")
    assert page.errors == [], page.errors
    assert browser.pixel_stddev(page.screenshot) > 20
    assert re.search(r'id="verdict"[^>]*>FAIL<', page.dom)
    minimal = re.search(r'class="minimal-tolerances">smallest tolerances that would pass: ([^<]*)<', page.dom)
    assert minimal, page.dom[:2000]
    values = dict(kv.split("=") for kv in minimal.group(1).split(", "))
    assert {"rtol", "atol", "min_cosine"} <= set(values)
    # the named tolerances really are enough (each on its own), and the configured ones are not
    f = featurefile.load(root / "out" / "tiny.parity.onnxruntime.npz")
    params = lockfile.read(root / "m.lock").stages["parity.onnxruntime"].params
    tol, mode = params["tolerance"], params["compare"]  # issue 10: the check's comparison mode
    assert not compare(f["reference"], f["actual"], tol, mode).passed
    # the fp32 default also checks cosine (issue 10), so the suggested min_cosine goes with either bound
    cos = {"min_cosine": float(values["min_cosine"])}
    assert compare(f["reference"], f["actual"], {**tol, **cos, "rtol": float(values["rtol"])}, mode).passed
    assert compare(f["reference"], f["actual"], {**tol, **cos, "atol": float(values["atol"])}, mode).passed


@needs_chromium
def test_the_console_check_catches_errors(tmp_path):
    """The browser helper must see a page's console errors and broken images, or the tests above prove nothing."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><p>x</p><img src="missing.png"><script>console.error("boom")</script></body></html>')
    page = browser.load(bad, tmp_path / "bad.png")
    assert any("boom" in e for e in page.errors), page.errors
    assert any("missing.png" in e for e in page.errors), page.errors
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert browser.pixel_stddev(browser.load(blank, tmp_path / "blank.png").screenshot) < 1


def test_retrieval_view_marks_the_neighbours_a_backend_changed(tmp_path):
    """Six images in two groups of three; the backend swaps images 1 and 4 between groups, so their queries'
    neighbours (and the other queries' neighbours 1 and 4) differ from PyTorch's and are framed."""
    from reidbuild.report.collect import CheckData, ReportData
    from reidbuild.report.render import embedded_data, render

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    ref = np.stack([centres[i // 3] + 0.01 * rng.normal(size=16) for i in range(6)]).astype(np.float32)
    act = ref.copy()
    act[[1, 4]] = ref[[4, 1]]
    names = [f"p{i}.png" for i in range(6)]
    check = CheckData("onnxruntime", "failed", {"rtol": 1e-3, "atol": 1e-6, "topk": 2},
                      {"failures": ["rank-1 agreement 0.333 < 1.0"]}, names, ref, act,
                      {"rtol": 2.0, "atol": 1.0, "min_cosine": 0.5})
    data = ReportData("toy", "m.yml", {"config": "c.yml"}, {"onnx": {}}, [check], [], [], {"tools": {}, "runtimes": {},
                      "report written on": "test"}, {}, (64, 32))
    page = render(data)
    rows = re.findall(r"<tr><td><span class=\"thumb query\" title=\"(p\d)\.png\".*?</tr>", page)
    assert rows == [f"p{i}" for i in range(6)]
    moved = re.findall(r'<td class="(?:pass|fail)">(\d+)</td></tr>', page)
    ref_nn, act_nn = check.neighbours(2)
    expected = [sum(1 for j in act_nn[q] if j not in set(ref_nn[q])) for q in range(6)]
    assert [int(x) for x in moved] == expected and sum(expected) > 0
    assert page.count('class="thumb differs"') == sum(expected)
    assert "FAIL" in page and "rtol=2, atol=1, min_cosine=0.5" in page
    assert embedded_data(page)["checks"][0]["suggested"] == {"rtol": 2.0, "atol": 1.0, "min_cosine": 0.5}


def test_max_error_chart_shows_what_the_check_judged(passing):
    """The per-image max |error| bars are of the features the check's atol applied to (L2-normalised in the
    default mode), so the largest bar is the check's own max_abs, not the raw features' error."""
    root, _ = passing
    rec = lockfile.read(root / "m.lock").stages["parity.onnxruntime"].record
    assert rec["compare"] == "normalized"
    page = (root / "out" / "tiny.report.html").read_text()
    chart = re.search(r'aria-label="onnxruntime: per-image max \|error\| \(L2-normalised features\)".*?</svg>',
                      page, re.S)
    assert chart is not None, "no max-error chart of normalised features for parity.onnxruntime"
    bars = [float(v) for v in re.findall(r"<title>image \d+: ([^<( ]+)", chart.group(0))]
    assert len(bars) == len(rec["per_image"])
    assert max(bars) == pytest.approx(rec["max_abs"], rel=0.01)
