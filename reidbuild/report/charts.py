"""The report's charts, drawn with matplotlib's Agg/SVG backends and returned as data URIs.

Errors between backends span many orders of magnitude (1e-9 to 1), so every axis is logarithmic and exact
zeros are shown at a floor value, named in the axis label, rather than dropped.
"""
from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure

FLOOR = 1e-12  # where an exact zero error is drawn on a log axis


def configure(scratch: Path) -> None:
    """Import matplotlib with its config and font cache in ``scratch`` (inside the output folder or a temporary
    folder), so drawing the report writes nothing to the user's home or cache folders."""
    if "matplotlib" in sys.modules:
        return
    old = os.environ.get("MPLCONFIGDIR")
    os.environ["MPLCONFIGDIR"] = str(scratch)
    try:
        import matplotlib
        import matplotlib.font_manager  # noqa: F401 - builds the font list now, into ``scratch``
    finally:
        if old is None:
            os.environ.pop("MPLCONFIGDIR", None)
        else:
            os.environ["MPLCONFIGDIR"] = old


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update({"svg.hashsalt": "reidbuild", "svg.fonttype": "path", "font.size": 8})
    import matplotlib.pyplot as plt

    return plt


def _uri(fig: Figure) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _width(n: int) -> float:
    return min(max(3.0 + 0.18 * n, 4.0), 10.0)


def per_image_bars(values: np.ndarray, title: str, ylabel: str, limit: Optional[float], limit_label: str,
                   failed: Optional[list[bool]] = None) -> str:
    """Bars per parity image on a log axis (red: the image failed the check), with the tolerance as a dashed
    line when it has one."""
    plt = _pyplot()
    raw = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=1.0, posinf=1.0)
    vals = np.clip(raw, FLOOR, None)
    if np.any(raw < FLOOR):
        ylabel += f" (below {FLOOR:g} drawn at {FLOOR:g})"
    fig, ax = plt.subplots(figsize=(_width(len(vals)), 2.2))
    over = limit is not None and limit > 0
    bad = failed if failed is not None and len(failed) == len(vals) else [False] * len(vals)
    colors = ["#c0392b" if b else "#2e86c1" for b in bad]
    ax.bar(np.arange(len(vals)), vals, color=colors)
    ax.set_yscale("log")
    if over:
        ax.axhline(limit, color="#7f8c8d", linestyle="--", linewidth=1, label=limit_label)
        ax.legend(loc="upper right", frameon=False)
    ax.set_title(title)
    ax.set_xlabel("parity image #")
    ax.set_ylabel(ylabel)
    return _uri(fig)


def error_histogram(diff: np.ndarray, title: str) -> str:
    """Distribution of element-wise |backend - PyTorch| on log-spaced bins; exact zeros counted apart."""
    plt = _pyplot()
    d = np.abs(np.asarray(diff, dtype=np.float64)).ravel()
    d = d[np.isfinite(d)]
    zeros = int(np.sum(d == 0))
    nz = d[d > 0]
    fig, ax = plt.subplots(figsize=(5.0, 2.2))
    if nz.size:
        lo, hi = np.log10(nz.min()), np.log10(nz.max())
        bins = np.logspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(nz, bins=bins, color="#2e86c1")
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"{title} ({zeros} of {d.size} exactly equal)")
    ax.set_xlabel("|backend - PyTorch| per feature value")
    ax.set_ylabel("count")
    return _uri(fig)


def timeline(stages: list[str], seconds: list[float], cached: list[bool]) -> str:
    """Horizontal bars, one per stage, in build order; stages found up to date in this run are hatched."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 0.3 * len(stages) + 0.8))
    y = np.arange(len(stages))[::-1]
    ax.barh(y, seconds, color=["#bdc3c7" if c else "#27ae60" for c in cached],
            hatch=None, edgecolor="#7f8c8d", linewidth=0.5)
    for yi, c in zip(y, cached):
        if c:
            ax.text(0, yi, " cached", va="center", fontsize=7)
    ax.set_yticks(y, stages)
    ax.set_xlabel("seconds (as recorded in the lock when the stage ran)")
    return _uri(fig)
