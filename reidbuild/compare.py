"""Comparators: how close a backend's features are to the reference, judged against tolerances.

Elementwise (``allclose``: |a - r| <= atol + rtol*|r|), per-image cosine, and retrieval agreement
(the parity images as a small query/gallery set: rank-1 agreement and top-k neighbour overlap).
NaN/Inf, shape mismatches and all-zero outputs always fail: parity must never pass on nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # imported where used: planning a build (a no-op apply) must not pay for numpy
    import numpy as np

TOLERANCE_KEYS = ("rtol", "atol", "min_cosine", "min_rank1", "topk", "min_topk_overlap")


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

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """Compact, JSON-able facts for the lock (floats rounded so the text stays stable and short)."""
        def r(x: Optional[float]) -> Optional[float]:
            return None if x is None else float(f"{x:.6g}")
        return {"passed": self.passed, "images": len(self.images), "max_abs": r(self.max_abs),
                "max_rel": r(self.max_rel), "min_cosine": r(self.min_cosine), "rank1_agreement": r(self.rank1),
                f"top{self.topk}_overlap": r(self.topk_overlap), "failures": self.failures}

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


def _neighbours(feats: np.ndarray, k: int) -> np.ndarray:
    import numpy as np

    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = feats / np.where(norm > 0, norm, 1.0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def retrieval_agreement(reference: np.ndarray, actual: np.ndarray, k: int) -> tuple[Optional[float], Optional[float]]:
    """(rank-1 agreement, mean top-k overlap) using each image as a query against all the others."""
    import numpy as np

    n = len(reference)
    if n < 3:
        return None, None
    k = min(k, n - 1)
    ref_nn = _neighbours(reference.astype(np.float64), k)
    act_nn = _neighbours(actual.astype(np.float64), k)
    rank1 = float(np.mean(ref_nn[:, 0] == act_nn[:, 0]))
    overlap = float(np.mean([len(set(r) & set(a)) / k for r, a in zip(ref_nn, act_nn)]))
    return rank1, overlap


def compare(reference: np.ndarray, actual: np.ndarray, tol: dict[str, Any]) -> Comparison:
    """Judge ``actual`` against ``reference`` (both [N, D]); unset tolerance keys are not checked."""
    import numpy as np

    tol = {k: tol.get(k) for k in TOLERANCE_KEYS}
    topk = int(tol.get("topk") or 5)
    failures: list[str] = []
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != act.shape:
        return Comparison([], float("inf"), float("inf"), -1.0, None, None, topk, tol,
                          [f"shape {act.shape} differs from the reference's {ref.shape}"])
    if len(ref) == 0:
        return Comparison([], float("inf"), float("inf"), -1.0, None, None, topk, tol, ["no images were compared"])
    if not np.all(np.isfinite(ref)):
        failures.append("the reference features contain NaN/Inf")
    if not np.all(np.isfinite(act)):
        failures.append("the backend's features contain NaN/Inf")
    if not np.any(act) and np.any(ref):
        failures.append("the backend returned all zeros")
    else:
        zero_rows = [i for i in range(len(ref)) if not np.any(act[i]) and np.any(ref[i])]
        if zero_rows:
            failures.append(f"the backend returned all zeros for {len(zero_rows)} image(s) (first: #{zero_rows[0]})")
    diff = np.abs(act - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(ref) > 0, diff / np.abs(ref), np.where(diff > 0, np.inf, 0.0))
    cos = _cosine_rows(act, ref)
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
        failures.append(f"{bad} of {elem_ok.size} values outside rtol={rtol} atol={atol}")
    worst_cos = float(np.nan_to_num(cos.min(), nan=-1.0))
    if min_cos is not None and not worst_cos >= min_cos:
        failures.append(f"min cosine {worst_cos:.6f} < {min_cos}")
    rank1, overlap = retrieval_agreement(ref, act, topk) if np.all(np.isfinite(act)) else (0.0, 0.0)
    for key, value, label in (("min_rank1", rank1, "rank-1 agreement"), ("min_topk_overlap", overlap, f"top-{topk} overlap")):
        want = tol.get(key)
        if want is None:
            continue
        if value is None:
            failures.append(f"{label} needs at least 3 images")
        elif value < want:
            failures.append(f"{label} {value:.3f} < {want}")
    return Comparison(images, float(np.nan_to_num(diff.max(), nan=np.inf)), float(np.nan_to_num(rel.max(), nan=np.inf)),
                      worst_cos, rank1, overlap, topk, tol, failures)


def as_dict(c: Comparison) -> dict[str, Any]:
    return asdict(c)


def nearest_neighbours(feats: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` most cosine-similar other rows (indices, best first): the retrieval the parity
    checks and the report's retrieval view share."""
    import numpy as np

    return _neighbours(np.asarray(feats, dtype=np.float64), min(k, max(len(feats) - 1, 0)))
