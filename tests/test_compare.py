"""Comparators must fail on anything that is not the same features: NaN, zeros, drift, reordering."""
from __future__ import annotations

import numpy as np
import pytest

from reidbuild.compare import compare, retrieval_agreement

FP32 = {"rtol": 1e-3, "atol": 1e-6}


def feats(n=8, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_identical_passes_and_reports():
    r = feats()
    c = compare(r, r.copy(), {**FP32, "min_cosine": 0.9999, "min_rank1": 1.0, "min_topk_overlap": 1.0})
    assert c.passed and c.max_abs == 0 and c.min_cosine > 0.99999 and c.rank1 == 1.0 and c.topk_overlap == 1.0


def test_small_drift_outside_tolerance_fails_with_count():
    r = feats()
    a = r.copy()
    a[3, 5] += 1e-2
    c = compare(r, a, FP32)
    assert not c.passed and "1 of 128 values outside" in c.failures[0]
    assert [im.ok for im in c.images].count(False) == 1 and not c.images[3].ok


def test_nan_is_failure_not_pass():
    r = feats()
    a = r.copy()
    a[0, 0] = np.nan
    c = compare(r, a, {"min_cosine": 0.5})
    assert not c.passed and any("NaN" in f for f in c.failures)


def test_all_zero_backend_fails_even_with_loose_tolerance():
    r = feats()
    c = compare(r, np.zeros_like(r), {"atol": 100.0})
    assert not c.passed and "all zeros" in " ".join(c.failures)


def test_shape_mismatch_and_empty():
    assert not compare(feats(), feats()[:, :8], FP32).passed
    assert not compare(np.zeros((0, 4)), np.zeros((0, 4)), FP32).passed


def test_cosine_threshold():
    r = feats()
    a = r + np.random.default_rng(1).normal(scale=0.3, size=r.shape)
    c = compare(r, a, {"min_cosine": 0.999})
    assert not c.passed and "min cosine" in c.failures[0]


def test_retrieval_agreement_detects_shuffled_features():
    r = feats(n=10)
    assert retrieval_agreement(r, r, 5) == (1.0, 1.0)
    shuffled = r[np.random.default_rng(3).permutation(10)]
    rank1, overlap = retrieval_agreement(r, shuffled, 5)
    assert rank1 < 0.5 and overlap < 0.8
    c = compare(r, shuffled, {"min_rank1": 0.9})
    assert not c.passed


def test_retrieval_needs_three_images():
    r = feats(n=2)
    c = compare(r, r, {"min_rank1": 0.9})
    assert not c.passed and "at least 3 images" in c.failures[0]


def test_one_all_zero_image_fails_even_with_loose_tolerance():
    r = feats()
    a = r.copy()
    a[2] = 0
    c = compare(r, a, {"atol": 1e9})
    assert not c.passed and "all zeros for 1 image(s) (first: #2)" in " ".join(c.failures)


# ---------------------------------------------------------------- issue 10: modes and suggested tolerances


def test_normalized_mode_judges_direction_not_length():
    """What re-id matching uses: a backend whose features are 1% longer matches in normalized mode only."""
    r = feats()
    longer = r * 1.01
    assert compare(r, longer, FP32, mode="normalized").passed
    c = compare(r, longer, FP32, mode="raw")
    assert not c.passed and c.mode == "raw" and c.summary()["compare"] == "raw"


def test_normalized_mode_still_fails_a_changed_value():
    r = feats()
    a = r.copy()
    a[3, 5] += 1e-2
    c = compare(r, a, FP32, mode="normalized")
    assert not c.passed and "(L2-normalised features)" in c.failures[0]


def test_smallest_tolerances_are_the_smallest_that_pass():
    from reidbuild.compare import smallest_tolerances

    r = feats()
    a = r + np.random.default_rng(5).normal(scale=1e-4, size=r.shape)
    for mode in ("raw", "normalized"):
        c = compare(r, a, FP32, mode=mode)
        assert not c.passed and c.suggested == {**smallest_tolerances(r, a, 1e-3, 1e-6, mode),
                                                "min_cosine": pytest.approx(c.min_cosine, abs=1e-6)}
        s = c.suggested
        assert compare(r, a, {"rtol": s["rtol"], "atol": 1e-6}, mode=mode).passed
        assert compare(r, a, {"rtol": 1e-3, "atol": s["atol"]}, mode=mode).passed
        # two significant digits, rounded up: 20% less fails
        assert not compare(r, a, {"rtol": 1e-3, "atol": s["atol"] * 0.8}, mode=mode).passed
        assert "smallest passing tolerance" in c.suggestion_text() and c.summary()["suggested"] == s


def test_smallest_tolerances_none_where_nothing_passes():
    from reidbuild.compare import smallest_tolerances

    r = feats().astype(np.float64)
    r[0, 0] = 0.0
    a = r.copy()
    a[0, 0] = 1e-3  # a difference where the reference is exactly 0: no rtol helps
    assert smallest_tolerances(r, a, 1e-3, 1e-6) == {"rtol": None, "atol": 0.001}
    a[1, 1] = np.nan
    assert smallest_tolerances(r, a, 1e-3, 1e-6) == {"rtol": None, "atol": None}


def test_passing_check_has_no_suggestion():
    r = feats()
    c = compare(r, r.copy(), FP32, mode="normalized")
    assert c.passed and c.suggested is None and "suggested" not in c.summary() and c.suggestion_text() == ""


def test_retrieval_ties_are_not_disagreements():
    """Two near-identical gallery images: float noise may swap them; either is the right nearest neighbour."""
    import reidbuild.compare as cmp

    rng = np.random.default_rng(7)
    r = rng.normal(size=(10, 16))
    r[2] = r[0] + 0.3 * rng.normal(size=16)  # image 0's nearest neighbour ...
    r[4] = r[2] + 1e-7 * rng.normal(size=16)  # ... and its near twin
    a = r.copy()
    a[2] += 1e-5 * (r[0] - r[2])  # noise moves one twin a hair closer to query 0, the other away
    a[4] -= 1e-5 * (r[0] - r[4])
    assert retrieval_agreement(r, a, 3) == (1.0, 1.0)
    saved = cmp.TIE
    try:
        cmp.TIE = 0.0  # control: without the tie margin the swap counts as a disagreement
        assert retrieval_agreement(r, a, 3)[0] < 1.0
    finally:
        cmp.TIE = saved
    shuffled = r[np.random.default_rng(3).permutation(10)]
    assert retrieval_agreement(r, shuffled, 3)[0] < 0.5  # real reordering is still caught


def test_scaled_difference_is_relative_to_the_output_scale():
    from reidbuild.compare import scaled_difference

    ref = np.array([[3.5e9, -1.0e9], [2.0, 0.0]])
    assert scaled_difference(ref, ref + 4.4e4) == pytest.approx(4.4e4 / 3.5e9)
    assert scaled_difference(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
    assert scaled_difference(np.zeros((2, 2)), np.ones((2, 2))) == float("inf")
