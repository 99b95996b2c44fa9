"""Comparators must fail on anything that is not the same features: NaN, zeros, drift, reordering."""
from __future__ import annotations

import numpy as np

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
