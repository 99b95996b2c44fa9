"""The report's charts as hand-written SVG: bars per parity image, an error histogram and the stage timeline.

Errors between backends span many orders of magnitude (1e-9 to 1), so value axes are logarithmic with decade
ticks, and exact zeros are drawn at a floor value named in the axis label rather than dropped. Each function
returns one ``<svg>`` element that the page inlines: its text stays real text (selectable, searchable,
printed sharp), nothing is fetched, and the same input gives the same bytes (no ids, no timestamps,
coordinates rounded to 0.01 px). Drawing them takes milliseconds where a plotting library took about a second
per report, most of it spent importing.

Text widths are estimated (0.6 em per character, more than sans-serif fonts need), so labels get room to
spare whatever font the reader's browser picks.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

FLOOR = 1e-12  # where an exact zero error is drawn on a log axis
FONT = 11  # px, tick labels and axis titles
TITLE_FONT = 12
BLUE, RED, GREEN, GREY, AXIS, GRID = "#2e86c1", "#c0392b", "#27ae60", "#bdc3c7", "#7f8c8d", "#e5e8e8"
MINUS = "\u2212"  # the typographic minus of exponents
HIST_BINS = 40


def _num(x: float) -> str:
    """A coordinate with at most two decimals and no trailing zeros: stable bytes and small pages."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _esc(s: object) -> str:
    """XML-escaped text or attribute value (titles carry user file names: ``<``, ``&`` and quotes)."""
    return html.escape(str(s), quote=True)


def _width_of(s: str, size: float = FONT) -> float:
    """Estimated rendered width of ``s`` in px."""
    return 0.6 * size * len(s)


def _fit(s: str, px: float, size: float = FONT) -> str:
    """``s`` cut with an ellipsis so it fits ``px`` (the full text stays in the chart's tooltip)."""
    keep = int(px / (0.6 * size))
    return s if len(s) <= keep else s[:max(keep - 1, 1)] + "\u2026"


@dataclass
class _Svg:
    """One chart being drawn: its size and its elements in drawing order."""

    width: float
    height: float
    label: str
    parts: list[str] = field(default_factory=list)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, cls: str, tip: str = "") -> None:
        body = f"<title>{_esc(tip)}</title></rect>" if tip else "/>"
        self.parts.append(f'<rect class="{cls}" x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" '
                          f'fill="{fill}"' + (">" + body if tip else body))

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = AXIS, cls: str = "", dash: bool = False) -> None:
        extra = (f' class="{cls}"' if cls else "") + (' stroke-dasharray="5 3"' if dash else "")
        self.parts.append(f'<line{extra} x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" '
                          f'stroke="{color}"/>')

    def text(self, x: float, y: float, s: str, anchor: str = "middle", size: float = FONT, cls: str = "",
             rotate: bool = False, markup: str = "") -> None:
        """``s`` escaped (plus ``markup``, already SVG) at (x, y); ``rotate`` turns it to read bottom-up."""
        extra = (f' class="{cls}"' if cls else "") + (f' font-size="{_num(size)}"' if size != FONT else "")
        extra += f' transform="rotate(-90 {_num(x)} {_num(y)})"' if rotate else ""
        self.parts.append(f'<text{extra} x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}">{_esc(s)}{markup}</text>')

    def done(self) -> str:
        return (f'<svg class="chart" width="{_num(self.width)}" height="{_num(self.height)}" '
                f'viewBox="0 0 {_num(self.width)} {_num(self.height)}" font-family="sans-serif" font-size="{FONT}" '
                f'role="img" aria-label="{_esc(self.label)}"><title>{_esc(self.label)}</title>'
                '<rect width="100%" height="100%" fill="#fff"/>' + "".join(self.parts) + "</svg>")


@dataclass(frozen=True)
class _Plot:
    """The plotting area inside a chart, in px (y grows downwards)."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class _Scale:
    """Values onto px: ``lo``..``hi`` (log10 of the values on a log scale) onto ``p0``..``p1``."""

    lo: float
    hi: float
    p0: float
    p1: float
    log: bool

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.p0 + (t - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def per_unit(self) -> float:
        """Px per decade (log) or per unit (linear)."""
        return abs(self.p1 - self.p0) / (self.hi - self.lo)


def _decades(lo_value: float, hi_value: float, room: float = 0.2) -> tuple[int, int]:
    """Whole decades spanning the positive range, the smallest value at least ``room`` decade above the bottom
    (its bar stays visible); a single value or equal values get a decade of their own."""
    eps = 1e-9  # log10 of an exact power of ten can come out a hair off
    lo = math.floor(math.log10(lo_value) - room + eps)
    hi = math.ceil(math.log10(hi_value) - eps)
    return lo, max(hi, lo + 1)


def _step(candidates_px: float, need_px: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... whose multiple of ``candidates_px`` is at least ``need_px``:
    label every step-th tick so that labels never overlap."""
    k = 1
    while k * candidates_px < need_px and candidates_px > 0:
        k = k * 5 // 2 if str(k)[0] == "2" else k * 2
    return k


def _power(d: int) -> str:
    """Superscript markup for the exponent of a ``10^d`` tick label."""
    exp = (MINUS + str(-d)) if d < 0 else str(d)
    return f'<tspan dy="-4" font-size="8">{exp}</tspan>'


def _log_axis(svg: _Svg, plot: _Plot, scale: _Scale, vertical: bool) -> None:
    """Decade ticks labelled 10^d (thinned to fit), minor ticks at 2..9 when there is room, light grid lines."""
    ppd = scale.per_unit()
    step = _step(ppd, 2 * FONT if vertical else _width_of("10-10") + 8)
    for d in range(math.ceil(scale.lo - 1e-9), math.floor(scale.hi + 1e-9) + 1):
        labelled = d % step == 0
        if not labelled and ppd < 4:  # dozens of decades: a tick for each would be a grey smear
            continue
        p = scale(10.0 ** d)
        tick = 5 if labelled else 3
        if vertical:
            svg.line(plot.left - tick, p, plot.left, p, cls="tick")
        else:
            svg.line(p, plot.bottom, p, plot.bottom + tick, cls="tick")
        if labelled:
            if vertical:
                svg.line(plot.left, p, plot.right, p, GRID)
                svg.text(plot.left - 7, p + 4, "10", anchor="end", cls="decade", markup=_power(d))
            else:
                svg.line(p, plot.top, p, plot.bottom, GRID)
                svg.text(p, plot.bottom + 18, "10", cls="decade", markup=_power(d))
    if ppd < 30:
        return
    for d in range(math.floor(scale.lo), math.ceil(scale.hi)):
        for m in range(2, 10):
            t = d + math.log10(m)
            if scale.lo <= t <= scale.hi:
                p = scale(10.0 ** t)
                if vertical:
                    svg.line(plot.left - 3, p, plot.left, p)
                else:
                    svg.line(p, plot.bottom, p, plot.bottom + 3)


def _frame(svg: _Svg, plot: _Plot, title: str, xlabel: str, ylabel: Sequence[str]) -> None:
    """Axis lines, the chart title above and the axis titles (``ylabel``: one or two lines, read bottom-up)."""
    svg.line(plot.left, plot.top, plot.left, plot.bottom, cls="axis")
    svg.line(plot.left, plot.bottom, plot.right, plot.bottom, cls="axis")
    svg.text(svg.width / 2, 16, _fit(title, svg.width - 8, TITLE_FONT), size=TITLE_FONT, cls="title")
    svg.text((plot.left + plot.right) / 2, svg.height - 6, xlabel, cls="xlabel")
    mid = (plot.top + plot.bottom) / 2
    for i, line in enumerate(ylabel):
        svg.text(12 + 13 * i, mid, line, cls="ylabel", rotate=True, size=FONT if i == 0 else FONT - 1)


def _ylabel_lines(label: str, room: float) -> list[str]:
    """The y axis title on one line, or split before its parenthesis when it would not fit ``room`` px."""
    if _width_of(label) <= room or " (" not in label:
        return [label]
    head, _, tail = label.partition(" (")
    return [head, "(" + tail]


def _note(svg: _Svg, plot: _Plot, text: str) -> None:
    svg.text((plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2, text, cls="note")


def _chart_width(n: int) -> float:
    """Bar chart width in px: grows with the number of images, from 384 to 960."""
    return 96 * min(max(3.0 + 0.18 * n, 4.0), 10.0)


def _index_ticks(svg: _Svg, plot: _Plot, n: int) -> None:
    """Ticks under each image's bar, labelled with its index every few images so labels never overlap."""
    slot = (plot.right - plot.left) / max(n, 1)
    step = _step(slot, _width_of(str(max(n - 1, 0))) + 8)
    for i in range(0, n, step):
        x = plot.left + (i + 0.5) * slot
        svg.line(x, plot.bottom, x, plot.bottom + 4, cls="tick")
        svg.text(x, plot.bottom + 16, str(i), cls="index")


def _legend(svg: _Svg, plot: _Plot, label: str) -> None:
    """The tolerance line's key, right-aligned in its own row between the title and the plot, where no bar
    can run into it."""
    x0 = plot.right - _width_of(label) - 26
    y = plot.top - 8
    svg.line(x0, y - 4, x0 + 18, y - 4, AXIS, dash=True)
    svg.text(x0 + 22, y, label, anchor="start", cls="legend-label")


def per_image_bars(values: np.ndarray, title: str, ylabel: str, limit: Optional[float], limit_label: str,
                   failed: Optional[list[bool]] = None) -> str:
    """Bars per parity image on a log axis (red: the image failed the check), with the tolerance as a dashed
    line when it has one. NaN and +inf are drawn at 1 (a broken output), values below FLOOR (zero, -inf)
    at FLOOR, and the axis title says so."""
    raw = np.asarray(values, dtype=np.float64).ravel()
    vals = np.clip(np.nan_to_num(raw, nan=1.0, posinf=1.0), FLOOR, None)
    if np.any(np.nan_to_num(raw, nan=1.0, posinf=1.0) < FLOOR):
        ylabel += f" (below {FLOOR:g} drawn at {FLOOR:g})"
    n = len(vals)
    bad = failed if failed is not None and len(failed) == n else [False] * n
    line = limit is not None and math.isfinite(limit) and limit > 0
    known = [float(v) for v in vals] + ([float(limit)] if line and limit is not None else [])
    lo, hi = _decades(min(known), max(known)) if known else (-1, 0)
    svg = _Svg(_chart_width(n), 240, title)
    top = 42 if line else 28  # a row for the legend
    lines = _ylabel_lines(ylabel, 240 - top - 40)
    plot = _Plot(20 + 13 * len(lines) + 34, top, svg.width - 12, 240 - 40)
    ys = _Scale(lo, hi, plot.bottom, plot.top, log=True)
    _log_axis(svg, plot, ys, vertical=True)
    slot = (plot.right - plot.left) / max(n, 1)
    bar = min(0.8 * slot, 48.0)
    for i, (v, r, b) in enumerate(zip(vals, raw, bad)):
        x, y = plot.left + (i + 0.5) * slot, ys(float(v))
        tip = f"image {i}: {float(r):.3g}" + (" (failed)" if b else "")
        svg.rect(x - bar / 2, y, bar, plot.bottom - y, RED if b else BLUE, "bar failed" if b else "bar", tip)
    if line and limit is not None:
        svg.line(plot.left, ys(limit), plot.right, ys(limit), AXIS, cls="limit", dash=True)
        _legend(svg, plot, limit_label)
    if n == 0:
        _note(svg, plot, "no values")
    _index_ticks(svg, plot, n)
    _frame(svg, plot, title, "parity image #", lines)
    return svg.done()


def _histogram_bins(nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of HIST_BINS log-spaced bins from the smallest to the largest non-zero value (a decade
    from the value when all are equal); the outer edges are the values themselves, so none falls outside."""
    lo, hi = math.log10(float(nz.min())), math.log10(float(nz.max()))
    edges = np.logspace(lo, hi if hi > lo else lo + 1, HIST_BINS + 1)
    edges[0] = min(edges[0], float(nz.min()))
    edges[-1] = max(edges[-1], float(nz.max()))
    counts, _ = np.histogram(nz, bins=edges)
    return counts, edges


def error_histogram(diff: np.ndarray, title: str) -> str:
    """Distribution of element-wise |backend - PyTorch| on log-spaced bins (log x, log count); exact zeros are
    counted apart, in the title. Non-finite differences are left out, as they have no place on the axis."""
    d = np.abs(np.asarray(diff, dtype=np.float64)).ravel()
    d = d[np.isfinite(d)]
    zeros = int(np.sum(d == 0))
    nz = d[d > 0]
    svg = _Svg(480, 240, f"{title} ({zeros} of {d.size} exactly equal)")
    plot = _Plot(20 + 13 + 34, 28, 480 - 16, 240 - 40)
    if nz.size:
        counts, edges = _histogram_bins(nz)
        xlo, xhi = _decades(float(edges[0]), float(edges[-1]), room=0.0)
        xs = _Scale(xlo, xhi, plot.left, plot.right, log=True)
    else:
        counts, edges, xs = np.zeros(0, np.int64), np.zeros(1), _Scale(-1, 0, plot.left, plot.right, log=True)
    top = max(math.ceil(math.log10(max(int(counts.max(initial=1)), 1)) - 1e-9), 1)
    ys = _Scale(math.log10(0.5), top, plot.bottom, plot.top, log=True)  # a count of 1 still shows
    _log_axis(svg, plot, ys, vertical=True)
    _log_axis(svg, plot, xs, vertical=False)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c > 0:
            x0, x1, y = xs(float(a)), xs(float(b)), ys(float(c))
            gap = 0.5 if x1 - x0 > 2 else 0.0  # a white seam between neighbouring bins
            svg.rect(x0, y, x1 - x0 - gap, plot.bottom - y, BLUE, "bar", f"{int(c)} values in [{a:.3g}, {b:.3g}]")
    if not nz.size:
        _note(svg, plot, "no non-zero differences")
    _frame(svg, plot, svg.label, "|backend - PyTorch| per feature value", ["count"])
    return svg.done()


def _linear_ticks(svg: _Svg, plot: _Plot, scale: _Scale, step: float) -> None:
    """Ticks, labels and grid lines every ``step`` along a linear x axis starting at 0."""
    for k in range(int(round(scale.hi / step)) + 1):
        v = k * step
        x = scale(v)
        svg.line(x, plot.top, x, plot.bottom, GRID)
        svg.line(x, plot.bottom, x, plot.bottom + 5, cls="tick")
        svg.text(x, plot.bottom + 17, f"{round(v, 9):g}", cls="seconds")


def _nice_step(top: float) -> float:
    """A 1, 2 or 5 times a power of ten step giving about five ticks up to ``top`` (> 0)."""
    raw = top / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))


def timeline(stages: list[str], seconds: list[float], cached: list[bool]) -> str:
    """Horizontal bars, one per stage, in build order from the top; stages found up to date in this run are
    grey and marked "cached" (their time is the one the lock recorded when they ran)."""
    secs = [s if math.isfinite(s) and s > 0 else 0.0 for s in (float(x) for x in seconds)]
    row, n = 22, len(stages)
    left = min(max((_width_of(s) for s in stages), default=0) + 16, 220)
    svg = _Svg(576, 10 + row * max(n, 1) + 40, "stage timeline")
    plot = _Plot(left, 10, 576 - 50, svg.height - 40)  # the right margin leaves room for "cached"
    step = _nice_step(max(secs, default=0.0) or 1.0)
    top = step * max(math.ceil(max(secs, default=0.0) / step - 1e-9), 1)
    xs = _Scale(0.0, top, plot.left, plot.right, log=False)
    _linear_ticks(svg, plot, xs, step)
    for i, (name, s, c) in enumerate(zip(stages, secs, cached)):
        y = plot.top + i * row
        tip = f"{name}: {s:g} s" + (" (cached)" if c else "")
        svg.rect(plot.left, y + 4, xs(s) - plot.left, row - 8, GREY if c else GREEN, "bar cached" if c else "bar", tip)
        svg.text(plot.left - 6, y + row / 2 + 4, _fit(name, left - 12), anchor="end", cls="stage")
        if c:
            svg.text(xs(s) + 4, y + row / 2 + 4, "cached", anchor="start", size=FONT - 1, cls="cached")
    if n == 0:
        _note(svg, plot, "no timed stages")
    svg.line(plot.left, plot.top, plot.left, plot.bottom, cls="axis")
    svg.line(plot.left, plot.bottom, plot.right, plot.bottom, cls="axis")
    svg.text((plot.left + plot.right) / 2, svg.height - 6, "seconds (as recorded in the lock when the stage ran)",
             cls="xlabel")
    return svg.done()
