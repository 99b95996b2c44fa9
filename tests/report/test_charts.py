"""The report's hand-drawn SVG charts: well-formed XML, one bar per value in the right colour, log axes whose
decade labels sit where the values are, the tolerance line at its value, escaped text, the same bytes for the
same input, and no failure on the inputs a broken build produces (zeros, NaN, inf, nothing, 500 images)."""
from __future__ import annotations

import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from reidbuild.report import charts
from tests.helpers import REPO

TOL = 0.02  # coordinates are written with two decimals


def wide(label: str) -> float:
    """A generous width of ``label`` in px at the charts' font size (sans-serif digits are about 0.55 em)."""
    return 0.6 * charts.FONT * len(label)


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "svg" and root.get("class") == "chart"
    return root


def bars(root: ET.Element) -> list[dict]:
    out = []
    for r in root.iter("rect"):
        if (r.get("class") or "").split()[:1] == ["bar"]:
            out.append({"x": float(r.get("x")), "y": float(r.get("y")), "w": float(r.get("width")),
                        "h": float(r.get("height")), "fill": r.get("fill"), "cls": r.get("class"),
                        "tip": r.findtext("title")})
    return out


def decades(root: ET.Element, vertical: bool) -> dict[int, float]:
    """Exponent -> pixel position of each labelled decade tick (y on the value axis, x on a log x axis)."""
    out = {}
    for t in root.iter("text"):
        if t.get("class") != "decade" or (t.get("text-anchor") == "end") != vertical:
            continue
        assert t.text == "10"
        exp = int(t.find("tspan").text.replace("\u2212", "-"))
        out[exp] = float(t.get("y")) - 4 if vertical else float(t.get("x"))
    return out


def texts(root: ET.Element, cls: str) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter("text") if t.get("class") == cls]


def bottom_of(root: ET.Element) -> float:
    """The y of the x axis line (where bars stand)."""
    lines = [ln for ln in root.iter("line") if ln.get("class") == "axis" and ln.get("y1") == ln.get("y2")]
    assert len(lines) == 1
    return float(lines[0].get("y1"))


def test_one_bar_per_image_red_for_the_failed_ones():
    values = np.array([1e-3, 1e-6, 2e-5, 1e-9, 4e-4])
    failed = [True, False, False, False, True]
    root = parse(charts.per_image_bars(values, "t", "max abs error", 1e-4, "atol", failed))
    b = bars(root)
    assert len(b) == 5
    assert [x["x"] for x in b] == sorted(x["x"] for x in b)  # in image order, left to right
    assert [x["fill"] for x in b] == [charts.RED if f else charts.BLUE for f in failed]
    assert [x["cls"] == "bar failed" for x in b] == failed
    assert b[0]["tip"] == "image 0: 0.001 (failed)" and b[1]["tip"] == "image 1: 1e-06"
    assert texts(root, "index") == ["0", "1", "2", "3", "4"]
    assert texts(root, "xlabel") == ["parity image #"] and texts(root, "ylabel") == ["max abs error"]


def test_bar_heights_follow_log10_and_the_decade_labels():
    values = np.array([1e-3, 1e-6, 3e-5, 1e-9])
    root = parse(charts.per_image_bars(values, "t", "err", None, "atol"))
    b, ticks, base = bars(root), decades(root, vertical=True), bottom_of(root)
    assert all(abs(x["y"] + x["h"] - base) < TOL for x in b)  # all stand on the axis
    assert b[0]["h"] > b[2]["h"] > b[1]["h"] > b[3]["h"] > 0
    per_decade = (b[0]["h"] - b[1]["h"]) / 3
    assert per_decade > 5
    for x, v in zip(b, values):
        assert abs((x["h"] - b[1]["h"]) - per_decade * (math.log10(v) + 6)) < 3 * TOL
    # the bar of 1e-3 reaches the tick labelled 10^-3 and the one of 1e-6 the tick 10^-6
    assert abs(b[0]["y"] - ticks[-3]) < TOL and abs(b[1]["y"] - ticks[-6]) < TOL
    assert abs((ticks[-9] - ticks[-3]) - 6 * per_decade) < 3 * TOL


def test_tolerance_line_sits_at_its_value_with_a_legend():
    root = parse(charts.per_image_bars(np.array([1e-6, 1e-2]), "t", "err", 3e-5, "atol", [False, True]))
    (line,) = [ln for ln in root.iter("line") if ln.get("class") == "limit"]
    ticks = decades(root, vertical=True)
    expected = ticks[-5] + (math.log10(3e-5) + 5) * (ticks[-4] - ticks[-5])
    assert line.get("y1") == line.get("y2") and abs(float(line.get("y1")) - expected) < 3 * TOL
    assert line.get("stroke-dasharray")
    assert texts(root, "legend-label") == ["atol"]
    for limit in (None, 0.0, float("nan")):
        root = parse(charts.per_image_bars(np.array([1e-6, 1e-2]), "t", "err", limit, "atol"))
        assert not [ln for ln in root.iter("line") if ln.get("class") == "limit"] and not texts(root, "legend-label")


def test_the_limit_is_inside_the_axis_even_above_every_value():
    root = parse(charts.per_image_bars(np.array([1e-9, 1e-8]), "t", "err", 1e-3, "atol"))
    (line,) = [ln for ln in root.iter("line") if ln.get("class") == "limit"]
    ticks = decades(root, vertical=True)
    assert min(ticks.values()) - TOL <= float(line.get("y1")) <= max(ticks.values()) + TOL
    assert -3 in ticks


def test_zeros_nan_and_inf_are_drawn_where_the_axis_title_says():
    values = np.array([0.0, np.nan, np.inf, -np.inf, 1e-6, -1e-16])
    root = parse(charts.per_image_bars(values, "t", "1 - cosine", 1e-4, "1 - min_cosine"))
    b, ticks = bars(root), decades(root, vertical=True)
    assert len(b) == 6
    floor_y, one_y = ticks[-12], ticks[0]
    assert [abs(x["y"] - floor_y) < TOL for x in b] == [True, False, False, True, False, True]
    assert abs(b[1]["y"] - one_y) < TOL and abs(b[2]["y"] - one_y) < TOL  # NaN and +inf: drawn at 1
    assert b[1]["tip"] == "image 1: nan" and b[0]["tip"] == "image 0: 0"
    assert " ".join(texts(root, "ylabel")) == "1 - cosine (below 1e-12 drawn at 1e-12)"
    # no value under the floor: the axis title stays as given
    root = parse(charts.per_image_bars(np.array([1e-6]), "t", "1 - cosine", 1e-4, "x"))
    assert texts(root, "ylabel") == ["1 - cosine"]


@pytest.mark.parametrize("values", [[], [1e-3], [2e-5] * 5, [0.0] * 4, [np.nan] * 3, [1e-30, 1e30]])
def test_degenerate_inputs_give_a_chart_with_at_least_one_decade(values):
    root = parse(charts.per_image_bars(np.array(values, dtype=np.float64), "t", "err", 1e-3, "atol"))
    b, ticks = bars(root), decades(root, vertical=True)
    assert len(b) == len(values) and len(ticks) >= 2
    assert all(x["h"] > 0 for x in b)  # the smallest bar still shows
    if not values:
        assert texts(root, "note") == ["no values"]


def test_equal_values_get_a_decade_of_their_own():
    root = parse(charts.per_image_bars(np.full(4, 1e-3), "t", "err", None, "atol"))
    assert sorted(decades(root, vertical=True)) == [-4, -3]
    assert len({x["h"] for x in bars(root)}) == 1


def test_500_images_thin_bars_and_labels_that_do_not_overlap():
    rng = np.random.default_rng(0)
    values = 10 ** rng.uniform(-9, -3, 500)
    root = parse(charts.per_image_bars(values, "t", "err", 1e-4, "atol", list(values > 1e-4)))
    assert float(root.get("width")) == 960  # the width cap
    b = bars(root)
    assert len(b) == 500 and 0 < b[0]["w"] < 2
    assert sum(x["fill"] == charts.RED for x in b) == int(np.sum(values > 1e-4))
    labels = [t for t in root.iter("text") if t.get("class") == "index"]
    xs = [float(t.get("x")) for t in labels]
    assert 5 <= len(labels) < 60 and labels[0].text == "0"
    gaps = np.diff(xs)
    assert gaps.min() > wide("499")  # estimated label width: room to spare


def test_width_grows_with_the_number_of_images_and_is_capped():
    widths = [float(parse(charts.per_image_bars(np.full(n, 1e-5), "t", "e", None, "a")).get("width"))
              for n in (1, 12, 30, 40, 200)]
    assert widths[0] == 384 and widths[0] < widths[1] < widths[2] and widths[3] == widths[4] == 960


def test_text_is_escaped_and_real_text():
    title = 'run <b>"a&b"</b> \'x\''
    svg = charts.per_image_bars(np.array([1e-5, 2e-5]), title, "err <1>", 1e-4, "a&b")
    root = parse(svg)
    assert "<b>" not in svg and "&lt;b&gt;&quot;a&amp;b&quot;&lt;/b&gt;" in svg
    assert texts(root, "title") == [title] and root.findtext("title") == title
    assert texts(root, "ylabel") == ["err <1>"] and texts(root, "legend-label") == ["a&b"]
    hist = parse(charts.error_histogram(np.array([1e-5, 0.0]), title))
    assert texts(hist, "title") == [f"{title} (1 of 2 exactly equal)"]
    tl = charts.timeline(['<stage&"1">'], [1.0], [False])
    assert texts(parse(tl), "stage") == ['<stage&"1">']


def test_same_input_same_bytes():
    rng = np.random.default_rng(3)
    v = 10 ** rng.uniform(-8, -2, 20)
    d = rng.normal(size=(4, 64)) * 1e-5
    make = [lambda: charts.per_image_bars(v, "t", "e", 1e-4, "atol", [bool(x > 1e-3) for x in v]),
            lambda: charts.error_histogram(d, "h"), lambda: charts.timeline(["a", "b"], [1.5, 0.2], [False, True])]
    for f in make:
        a, b = f(), f()
        assert a == b and " id=" not in a


def test_histogram_has_40_log_spaced_bins_and_log_counts():
    # 1000 values at 1e-6, 10 at 1e-4 and one at 1e-2: the first, a middle and the last of 40 bins
    diff = np.concatenate([np.full(1000, 1e-6), np.full(10, -1e-4), [1e-2], np.zeros(7), [np.nan, np.inf]])
    root = parse(charts.error_histogram(diff, "e"))
    assert texts(root, "title") == ["e (7 of 1018 exactly equal)"]
    b, ys, xs = bars(root), decades(root, vertical=True), decades(root, vertical=False)
    assert len(b) == 3
    assert [int(x["tip"].split()[0]) for x in b] == [1000, 10, 1]
    assert abs(b[0]["y"] - ys[3]) < TOL and abs(b[1]["y"] - ys[1]) < TOL and abs(b[2]["y"] - ys[0]) < TOL
    assert b[2]["h"] > 0  # a single value still shows
    # log x: 40 bins of equal width over 4 decades; the first starts at 1e-6, the last ends at 1e-2
    per_decade = (xs[-2] - xs[-6]) / 4
    assert abs(b[0]["x"] - xs[-6]) < TOL and abs(b[2]["x"] + b[2]["w"] + 0.5 - xs[-2]) < TOL
    assert abs(b[0]["w"] + 0.5 - per_decade / 10) < 2 * TOL
    assert abs(b[1]["x"] - (xs[-6] + 2 * per_decade)) < 2 * TOL  # 1e-4 opens bin 20 of 40


def test_histogram_counts_every_non_zero_value():
    rng = np.random.default_rng(1)
    diff = rng.normal(size=(12, 512)) * 1e-6
    diff[0, :5] = 0
    root = parse(charts.error_histogram(diff, "e"))
    b = bars(root)
    assert 20 < len(b) <= 40
    assert sum(int(x["tip"].split()[0]) for x in b) == diff.size - 5
    assert texts(root, "title") == [f"e (5 of {diff.size} exactly equal)"]


@pytest.mark.parametrize("diff", [[], [0.0, 0.0], [3e-7], [1e-4] * 10, [np.nan, np.inf], [3e-7, 5e-7]])
def test_histogram_edge_cases(diff):
    root = parse(charts.error_histogram(np.array(diff, dtype=np.float64), "e"))
    nz = [x for x in diff if np.isfinite(x) and x != 0]
    b = bars(root)
    assert sum(int(x["tip"].split()[0]) for x in b) == len(nz)
    assert len(decades(root, vertical=False)) >= 2 and len(decades(root, vertical=True)) >= 2
    assert texts(root, "note") == ([] if nz else ["no non-zero differences"])


def test_timeline_in_build_order_cached_grey_and_marked():
    stages, secs, cached = ["load", "onnx.export", "parity.caffe"], [2.0, 0.5, 1.0], [False, True, False]
    root = parse(charts.timeline(stages, secs, cached))
    b = bars(root)
    assert texts(root, "stage") == stages
    assert [x["y"] for x in b] == sorted(x["y"] for x in b)  # first stage on top
    assert [x["fill"] for x in b] == [charts.GREEN, charts.GREY, charts.GREEN]
    assert texts(root, "cached") == ["cached"]
    assert abs(b[0]["w"] / b[1]["w"] - 4) < 0.01 and abs(b[0]["w"] / b[2]["w"] - 2) < 0.01
    assert texts(root, "xlabel") == ["seconds (as recorded in the lock when the stage ran)"]
    labels = [float(t) for t in texts(root, "seconds")]
    assert labels[0] == 0 and labels[-1] >= 2.0


@pytest.mark.parametrize("secs", [[], [0.0], [float("nan"), 1.0], [1e-4, 1e4]])
def test_timeline_edge_cases(secs):
    names = [f"s{i}" for i in range(len(secs))]
    root = parse(charts.timeline(names, secs, [False] * len(secs)))
    assert len(bars(root)) == len(secs) and all(x["w"] >= 0 for x in bars(root))
    assert texts(root, "note") == ([] if secs else ["no timed stages"])


def test_decade_labels_are_thinned_so_they_do_not_overlap():
    root = parse(charts.per_image_bars(np.array([1e-30, 1e30]), "t", "err", None, "atol"))
    ys = sorted(decades(root, vertical=True).values())
    assert 3 <= len(ys) < 20 and min(np.diff(ys)) >= charts.FONT * 1.5  # 61 decades, a label every few
    diff = np.array([1e-15, 1e-1])
    xs = sorted(decades(parse(charts.error_histogram(diff, "h")), vertical=False).values())
    assert len(xs) >= 3 and min(np.diff(xs)) > wide("10-15")


def test_drawing_imports_no_plotting_library():
    """The charts are reidbuild's own SVG: importing a plotting library cost the report stage about a second."""
    code = ("import sys, numpy as np\nfrom reidbuild.report import charts\n"
            "charts.per_image_bars(np.array([1e-5]), 't', 'e', 1e-4, 'a'); charts.error_histogram(np.ones(3), 'h')\n"
            "charts.timeline(['a'], [1.0], [False])\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'pyparsing', 'PIL')]\nassert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
