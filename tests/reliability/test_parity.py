"""Parity is honest: NaN or Inf anywhere fails, a backend that silently returns zeros fails, an empty image set
is an error - even with tolerances so loose that any finite answer would pass.

The real onnxruntime runner is wrapped (its output replaced by zeros / NaN / Inf) and the real ``apply`` runs
the parity stage with it; a control run with the unwrapped runner under the same loose tolerances passes.
"""
from __future__ import annotations

import numpy as np
import pytest

from reidbuild import lockfile
from reidbuild.backends import onnxruntime as ort_backend
from reidbuild.compare import compare
from reidbuild.errors import ImageError
from tests.reliability._util import assert_one_line_error, cli, count

LOOSE = "  rtol: 1.0e+9\n  atol: 1.0e+9\n"


def _loosen(project) -> None:
    m = project.manifest
    m.write_text(m.read_text().replace("  backends: [onnxruntime]\n", "  backends: [onnxruntime]\n" + LOOSE))


def _zeros(out: np.ndarray) -> np.ndarray:
    return np.zeros_like(out)


def _one_nan(out: np.ndarray) -> np.ndarray:
    out = out.copy()
    out[-1, out.shape[1] // 2] = np.nan
    return out


def _one_inf(out: np.ndarray) -> np.ndarray:
    out = out.copy()
    out[0, 3] = np.inf
    return out


def _all_nan(out: np.ndarray) -> np.ndarray:
    return np.full_like(out, np.nan)


CORRUPT = {"all zeros": (_zeros, "all zeros"), "one NaN": (_one_nan, "NaN"), "one Inf": (_one_inf, "NaN/Inf"),
           "all NaN": (_all_nan, "NaN")}


def test_control_the_real_runner_passes_under_loose_tolerances(project):
    _loosen(project)
    code, out, err = cli("apply", project.manifest)
    assert code == 0, err
    assert lockfile.read(project.root / "m.lock").stages["parity.onnxruntime"].status == "ok"


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupted_backend_output_fails_parity_even_with_loose_tolerances(project, monkeypatch, case):
    corrupt, needle = CORRUPT[case]
    real_infer = ort_backend.OnnxRuntimeRunner.infer
    calls = []

    def infer(self, batch):
        calls.append(len(batch))
        return corrupt(np.asarray(real_infer(self, batch)))

    monkeypatch.setattr(ort_backend.OnnxRuntimeRunner, "infer", infer)
    _loosen(project)
    code, out, err = cli("apply", project.manifest)
    assert calls, "the parity stage did not run the wrapped runner"
    assert code == 1, err
    assert "error: " in err and "parity onnxruntime: " in err and needle in err, err
    par = lockfile.read(project.root / "m.lock").stages["parity.onnxruntime"]
    assert par.status == "failed" and par.record["passed"] is False
    code, vout, _ = cli("verify", project.manifest)
    assert code == 1 and "stage parity.onnxruntime is recorded as failed" in vout
    count("parity: corrupted backend outputs caught")


def test_one_image_of_zeros_fails_with_default_tolerances(project, monkeypatch):
    real_infer = ort_backend.OnnxRuntimeRunner.infer

    def infer(self, batch):
        out = np.asarray(real_infer(self, batch)).copy()
        out[0] = 0.0
        return out

    monkeypatch.setattr(ort_backend.OnnxRuntimeRunner, "infer", infer)
    # issue 10 made min_cosine 0.9999 an fp32 default, so the manifest is left as it is and the build forced
    code, out, err = cli("apply", "--force", project.manifest)
    assert code == 1 and "error: " in err and "parity onnxruntime: " in err
    count("parity: corrupted backend outputs caught")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/inf inside compare's neighbour search
@pytest.mark.parametrize("ref_bad", [False, True])
def test_compare_nan_anywhere_is_a_failure(ref_bad):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 16))
    loose = {"rtol": 1e9, "atol": 1e9}
    assert compare(ref, ref.copy(), loose).passed  # control
    for i, j in [(0, 0), (5, 15), (2, 7)]:
        for bad in (np.nan, np.inf, -np.inf):
            r, a = ref.copy(), ref.copy()
            (r if ref_bad else a)[i, j] = bad
            c = compare(r, a, loose)
            assert not c.passed and any("NaN" in f for f in c.failures), c.failures
            assert c.summary()["passed"] is False
            count("parity: NaN/Inf placements caught by compare")


def test_compare_zeros_empty_and_shape_mismatch_fail():
    ref = np.random.default_rng(1).normal(size=(5, 8))
    loose = {"rtol": 1e9, "atol": 1e9}
    assert not compare(ref, np.zeros_like(ref), loose).passed
    assert not compare(np.zeros((0, 8)), np.zeros((0, 8)), loose).passed
    assert not compare(ref, ref[:4], loose).passed
    assert not compare(ref, ref.reshape(-1), loose).passed


def test_empty_image_set_is_an_error(project):
    from reidbuild.images import load_images

    with pytest.raises(ImageError):
        load_images([], 64, 32)
    for pattern in ("nothing/*.png", "imgs/*.jpeg", "cfg"):  # no match; no such files; a folder, not images
        m = project.manifest
        m.write_text(project.manifest.read_text().replace("imgs/*.png", pattern, 1))
        code, out, err = cli("apply", m)
        assert_one_line_error(code, err, 2, "matches no file")
        m.write_text(m.read_text().replace(pattern, "imgs/*.png", 1))
    assert not (project.root / "out" / ".tmp-work").exists()
