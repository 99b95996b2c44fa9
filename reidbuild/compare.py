"""Comparators: how close a backend's features are to the reference, judged against tolerances.

Elementwise (``allclose``: |a - r| <= atol + rtol*|r|), per-image cosine, and retrieval agreement
(the parity images as a small query/gallery set: rank-1 agreement and top-k neighbour overlap).
NaN/Inf, shape mismatches and all-zero outputs always fail: parity must never pass on nothing.

The elementwise test runs in one of two modes: ``normalized`` (the default of parity) compares the
L2-normalised features, which is what re-id matching uses and what fast-reid's deploy scripts save
(``F.normalize``); ``raw`` compares the features as the model outputs them. Cosine and retrieval agreement do
not depend on the features' length, so they are the same in both modes. On failure,
``smallest_tolerances`` says which rtol (at the given atol) and which atol (at the given rtol) would have passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # imported where used: planning a build (a no-op apply) must not pay for numpy
    import numpy as np

TOLERANCE_KEYS = ("rtol", "atol", "min_cosine", "min_rank1", "topk", "min_topk_overlap")
MODES = ("normalized", "raw")
# the default of every fp32 check (onnxruntime, Caffe, an fp32 engine); reidbuild/precision/profiles.py explains
# it and holds the reduced-precision profiles (kept here so planning a build need not import the precision code)
FP32_TOLERANCE: dict[str, Any] = {"rtol": 1e-3, "atol": 1e-5, "min_cosine": 0.9999, "min_rank1": 1.0, "topk": 5,
                                  "min_topk_overlap": 1.0}
# two gallery images whose reference cosine similarities to a query differ by less than this are a tie: either
# is a correct nearest neighbour (float32 noise moves cosines by ~1e-7; distinct people differ by far more)
TIE = 1e-5


@dataclass
class ImageResult:
    index: int
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool


@dataclass
class Comparison:
    images: list[ImageResult]
    max_abs: float
    max_rel: float
    min_cosine: float
    rank1: Optional[float]
    topk_overlap: Optional[float]
    topk: int
    tolerance: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    mode: str = "raw"
    suggested: Optional[dict[str, Optional[float]]] = None  # smallest passing rtol/atol/min_cosine, when failed

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """Compact, JSON-able facts for the lock (floats rounded so the text stays stable and short)."""
        def r(x: Optional[float]) -> Optional[float]:
            return None if x is None else float(f"{x:.6g}")
        return {"passed": self.passed, "images": len(self.images), "max_abs": r(self.max_abs),
                "max_rel": r(self.max_rel), "min_cosine": r(self.min_cosine), "rank1_agreement": r(self.rank1),
                f"top{self.topk}_overlap": r(self.topk_overlap), "failures": self.failures, "compare": self.mode,
                **({"suggested": self.suggested} if self.suggested is not None else {})}

    def suggestion_text(self) -> str:
        """One line: the rtol/atol that would have passed (empty when there is no suggestion)."""
        s = self.suggested
        if not s:
            return ""
        rtol, atol = self.tolerance.get("rtol"), self.tolerance.get("atol")
        parts = [f"rtol={s['rtol']:.2g} (at atol={atol})" if s.get("rtol") is not None else "no rtol (at atol="
                 f"{atol})", f"atol={s['atol']:.2g} (at rtol={rtol})" if s.get("atol") is not None else "no atol"]
        return f"smallest passing tolerance on the {self.mode} features: " + " or ".join(parts)

    def table(self, names: list[str]) -> str:
        rows = [f"{'image':<32} {'max_abs':>10} {'max_rel':>10} {'cosine':>12}  ok"]
        for im in self.images:
            rows.append(f"{names[im.index][-32:]:<32} {im.max_abs:10.3g} {im.max_rel:10.3g} {im.cosine:12.8f}  "
                        f"{'yes' if im.ok else 'NO'}")
        return "\n".join(rows)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import numpy as np

    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / denom
    return np.where(denom > 0, cos, np.where((na == 0) & (nb == 0), 1.0, 0.0))


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as fast-reid's ``F.normalize`` does."""
    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return x / np.where(norm > 0, norm, 1.0)


def _similarities(feats: np.ndarray) -> np.ndarray:
    import numpy as np

    unit = l2_normalize(feats)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    out: np.ndarray = sim
    return out


def retrieval_agreement(reference: np.ndarray, actual: np.ndarray, k: int) -> tuple[Optional[float], Optional[float]]:
    """(rank-1 agreement, mean top-k overlap) using each image as a query against all the others.

    A neighbour the backend picks counts as agreeing when the reference ranks it as high, up to a tie (cosine
    within ``TIE`` of the reference's own pick): near-identical gallery images may swap under float noise.
    """
    import numpy as np

    n = len(reference)
    if n < 3:
        return None, None
    k = min(k, n - 1)
    ref_sim = _similarities(reference)
    act_nn = np.argsort(-_similarities(actual), axis=1, kind="stable")[:, :k]
    ref_sorted = -np.sort(-ref_sim, axis=1)
    hit = np.take_along_axis(ref_sim, act_nn, axis=1)  # the reference's similarity of the backend's picks
    rank1 = float(np.mean(hit[:, 0] >= ref_sorted[:, 0] - TIE))
    overlap = float(np.mean(np.sum(hit >= ref_sorted[:, k - 1:k] - TIE, axis=1) / k))
    return rank1, overlap


def scaled_difference(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - reference| / max |reference|: a difference measured on the output's own scale (inf when the
    reference is all zeros and the actual is not, 0.0 when both are)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    diff = float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - ref), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits (a tolerance to write into a manifest)."""
    if x <= 0.0:
        return 0.0
    value = float(f"{x:.2g}")
    if value >= x:
        return value
    step = 10.0 ** (int(f"{value:.1e}".split("e")[1]) - 1)
    return float(f"{value + step:.2g}")


def smallest_tolerances(reference: np.ndarray, actual: np.ndarray, rtol: Optional[float], atol: Optional[float],
                        mode: str = "raw") -> dict[str, Optional[float]]:
    """The smallest rtol that passes at the given atol, and the smallest atol that passes at the given rtol
    (|a - r| <= atol + rtol*|r| on every value, in ``mode``), rounded up to two digits; None where no value
    can pass (non-finite values, or a difference where the reference is 0 for the rtol)."""
    import numpy as np

    ref, act = in_mode(reference, mode), in_mode(actual, mode)
    if ref.shape != act.shape or ref.size == 0 or not (np.all(np.isfinite(ref)) and np.all(np.isfinite(act))):
        return {"rtol": None, "atol": None}
    rtol, atol = float(rtol or 0.0), float(atol or 0.0)
    diff, mag = np.abs(act - ref), np.abs(ref)
    need_atol = _round_up(float(np.max(diff - rtol * mag)))
    over = diff > atol
    if np.any(over & (mag == 0)):
        need_rtol: Optional[float] = None
    else:
        need_rtol = _round_up(float(np.max((diff[over] - atol) / mag[over], initial=0.0)))
    return {"rtol": need_rtol, "atol": need_atol}


def in_mode(features: np.ndarray, mode: str) -> np.ndarray:
    """The features as a check in ``mode`` judges them elementwise: raw, or L2-normalised per row."""
    import numpy as np

    if mode not in MODES:
        raise ValueError(f"unknown comparison mode {mode!r} (known: {', '.join(MODES)})")
    x = np.asarray(features, dtype=np.float64)
    return l2_normalize(x) if mode == "normalized" and x.ndim == 2 else x


def compare(reference: np.ndarray, actual: np.ndarray, tol: dict[str, Any], mode: str = "raw") -> Comparison:
    """Judge ``actual`` against ``reference`` (both [N, D]); unset tolerance keys are not checked.

    ``mode`` says what rtol/atol (and the reported max_abs/max_rel) apply to: ``raw`` features or their
    ``normalized`` (unit-length) versions; NaN, zeros, cosine and retrieval are judged on the raw features.
    """
    import numpy as np

    tol = {k: tol.get(k) for k in TOLERANCE_KEYS}
    topk = int(tol.get("topk") or 5)
    failures: list[str] = []
    raw_ref = np.asarray(reference, dtype=np.float64)
    raw_act = np.asarray(actual, dtype=np.float64)
    if raw_ref.ndim != 2 or raw_ref.shape != raw_act.shape:
        return Comparison([], float("inf"), float("inf"), -1.0, None, None, topk, tol,
                          [f"shape {raw_act.shape} differs from the reference's {raw_ref.shape}"], mode)
    if len(raw_ref) == 0:
        return Comparison([], float("inf"), float("inf"), -1.0, None, None, topk, tol, ["no images were compared"],
                          mode)
    for what, values in (("the reference features", raw_ref), ("the backend's features", raw_act)):
        rows = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
        if len(rows):
            failures.append(f"{what} contain NaN/Inf for {len(rows)} image(s) (first: #{rows[0]})")
    if not np.any(raw_act) and np.any(raw_ref):
        failures.append("the backend returned all zeros")
    else:
        zero_rows = [i for i in range(len(raw_ref)) if not np.any(raw_act[i]) and np.any(raw_ref[i])]
        if zero_rows:
            failures.append(f"the backend returned all zeros for {len(zero_rows)} image(s) (first: #{zero_rows[0]})")
    ref, act = in_mode(raw_ref, mode), in_mode(raw_act, mode)
    diff = np.abs(act - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(ref) > 0, diff / np.abs(ref), np.where(diff > 0, np.inf, 0.0))
    cos = _cosine_rows(raw_act, raw_ref)
    rtol, atol = tol.get("rtol"), tol.get("atol")
    elem_ok = np.ones_like(diff, dtype=bool)
    if rtol is not None or atol is not None:
        elem_ok = diff <= (atol or 0.0) + (rtol or 0.0) * np.abs(ref)
    min_cos = tol.get("min_cosine")
    images = []
    for i in range(len(ref)):
        ok = bool(np.all(elem_ok[i]) and np.all(np.isfinite(act[i])) and (min_cos is None or cos[i] >= min_cos))
        images.append(ImageResult(i, float(np.nan_to_num(diff[i].max(), nan=np.inf)),
                                  float(np.nan_to_num(rel[i].max(), nan=np.inf)),
                                  float(np.nan_to_num(cos[i], nan=-1.0)), ok))
    bad = int(np.sum(~elem_ok))
    if bad:
        what = " (L2-normalised features)" if mode == "normalized" else ""
        failures.append(f"{bad} of {elem_ok.size} values outside rtol={rtol} atol={atol}{what}")
    worst_cos = float(np.nan_to_num(cos.min(), nan=-1.0))
    if min_cos is not None and not worst_cos >= min_cos:
        failures.append(f"min cosine {worst_cos:.6f} < {min_cos}")
    finite = np.all(np.isfinite(raw_act)) and np.all(np.isfinite(raw_ref))
    rank1, overlap = retrieval_agreement(raw_ref, raw_act, topk) if finite else (0.0, 0.0)
    for key, value, label in (("min_rank1", rank1, "rank-1 agreement"), ("min_topk_overlap", overlap, f"top-{topk} overlap")):
        want = tol.get(key)
        if want is None:
            continue
        if value is None:
            failures.append(f"{label} needs at least 3 images")
        elif value < want:
            failures.append(f"{label} {value:.3f} < {want}")
    suggested = None
    if failures and (rtol is not None or atol is not None):
        suggested = {**smallest_tolerances(raw_ref, raw_act, rtol, atol, mode),
                     "min_cosine": float(np.floor(worst_cos * 1e6) / 1e6)}  # the lowest cosine seen, rounded down
    return Comparison(images, float(np.nan_to_num(diff.max(), nan=np.inf)), float(np.nan_to_num(rel.max(), nan=np.inf)),
                      worst_cos, rank1, overlap, topk, tol, failures, mode, suggested)


def nearest_neighbours(feats: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` most cosine-similar other rows (indices, best first): the retrieval the parity
    checks and the report's retrieval view share."""
    import numpy as np

    k = min(k, max(len(feats) - 1, 0))
    return np.argsort(-_similarities(np.asarray(feats, dtype=np.float64)), axis=1, kind="stable")[:, :k]
