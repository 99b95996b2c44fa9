from __future__ import annotations

import pytest

from reidbuild.compare import TOLERANCE_KEYS
from reidbuild.precision.profiles import default_tolerance


def test_profiles_have_every_key_and_the_issue_values():
    for check in ("onnxruntime", "caffe", "tensorrt", "onnx_fp16", "onnx_int8", "tensorrt_fp16", "tensorrt_int8"):
        assert set(default_tolerance(check)) == set(TOLERANCE_KEYS)
    fp32 = default_tolerance("tensorrt")
    # issue 10: fp32 keeps the old procedure's rtol/atol (applied to L2-normalised features by the parity stage)
    # and also checks cosine and full rank-1/top-5 agreement
    assert (fp32["rtol"], fp32["atol"], fp32["min_cosine"]) == (1e-3, 1e-5, 0.9999)
    assert (fp32["min_rank1"], fp32["topk"], fp32["min_topk_overlap"]) == (1.0, 5, 1.0)
    fp16, int8 = default_tolerance("onnx_fp16"), default_tolerance("onnx_int8")
    assert fp16["min_cosine"] == 0.999 and int8["min_cosine"] == 0.99
    assert fp16["topk"] == int8["topk"] == 5
    assert fp16["min_rank1"] >= int8["min_rank1"] and fp16["min_topk_overlap"] >= int8["min_topk_overlap"]
    assert fp16["rtol"] is None and int8["atol"] is None  # reduced precision is not judged elementwise


def test_profiles_are_copies_and_unknown_checks_fail():
    default_tolerance("onnx_int8")["min_cosine"] = 0.0
    assert default_tolerance("onnx_int8")["min_cosine"] == 0.99
    with pytest.raises(ValueError, match="no default tolerance"):
        default_tolerance("onnx_bf16")
