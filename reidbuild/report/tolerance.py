"""The smallest tolerances that would have let a failed parity check pass.

A stop-gap until ``reidbuild.compare`` records them in the lock (parity record ``suggested``); the report
prefers the lock's values and only computes them here for locks written before that.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


def suggested_tolerances(reference: np.ndarray, actual: np.ndarray, tol: dict[str, Any]) -> dict[str, Optional[float]]:
    """Per allclose bound (|a - r| <= atol + rtol*|r|): the smallest rtol at the check's atol and the smallest
    atol at its rtol, and the lowest cosine seen (the min_cosine that would pass)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.abs(np.asarray(actual, dtype=np.float64) - ref)
    if diff.size == 0 or not np.all(np.isfinite(diff)):
        return {"rtol": None, "atol": None, "min_cosine": None}
    rtol, atol = float(tol.get("rtol") or 0.0), float(tol.get("atol") or 0.0)
    atol_needed = float(np.max(diff - rtol * np.abs(ref)))
    over = diff - atol
    scale = np.abs(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(over > 0, np.where(scale > 0, over / scale, np.inf), 0.0)
    rtol_needed = float(np.max(ratio))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(actual, axis=1)
    cos = np.sum(ref * actual, axis=1) / np.where(norms > 0, norms, 1.0)
    return {"rtol": _up(rtol_needed), "atol": _up(max(atol_needed, 0.0)), "min_cosine": _down(float(cos.min()))}


def _up(x: float) -> Optional[float]:
    """Round up to 2 significant digits, so the printed value itself passes."""
    if not np.isfinite(x):
        return None
    if x <= 0:
        return 0.0
    exp = np.floor(np.log10(x)) - 1
    return float(f"{np.ceil(x / 10 ** exp) * 10 ** exp:.2g}")


def _down(x: float) -> float:
    return float(np.floor(x * 1e8) / 1e8)
