"""HTML for the parity report: one self-contained, printable page (inline CSS, no scripts, charts as
inline SVG, thumbnails as data URIs).

Sections carry stable ids (summary, check-<name>, retrieval-<name>, timeline, artifacts, environment) that
the browser test and readers' tools can rely on. The build's result facts are also embedded as JSON
(``<script type="application/json" id="reidbuild-report-data">``, data only, never executed): two reports of
the same results carry the same block even when their timings differ (``verify --rebuild`` compares it).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..compare import in_mode
from . import charts
from .collect import CheckData, ReportData

MAX_QUERIES = 24  # retrieval rows per check: enough to see a pattern, small enough to print
DATA_ID = "reidbuild-report-data"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f6f7}.pass{color:#1e8449;font-weight:bold}.fail{color:#c0392b;font-weight:bold}.skip{color:#7f8c8d}
.verdict{font-size:1.3em;padding:.3em .8em;display:inline-block;border-radius:4px}
.verdict.pass{background:#d5f5e3}.verdict.fail{background:#fadbd8}
.charts svg{max-width:100%;height:auto;margin:.3em .6em .3em 0;vertical-align:top}
.ret td{vertical-align:middle}
.thumb{display:inline-block;margin:1px;border:3px solid transparent;text-align:center;font-size:.7em}
.thumb img{display:block}.thumb.differs{border-color:#c0392b}.thumb.query{border-color:#2e86c1}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
@media print{body{max-width:none;margin:0}h2{page-break-after:avoid}section.check{page-break-inside:avoid}}
"""


def render(data: ReportData) -> str:
    """The whole page for ``data``."""
    parts = [f"<h1>reidbuild parity report: {_e(data.name)}</h1>", _summary(data)]
    for check in data.checks:
        parts.append(_check_section(check, data))
    parts += [_timeline(data), _artifacts(data), _environment(data)]
    blob = json.dumps(data.summary(), sort_keys=True, default=str).replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(data.name)}: {'PASS' if data.passed else 'FAIL'} - reidbuild report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script type=\"application/json\" id=\"{DATA_ID}\">{blob}</script>\n</body></html>\n")


def embedded_data(text: str) -> Optional[dict[str, Any]]:
    """The result facts a rendered report carries (None if the page has none)."""
    start = text.find(f'id="{DATA_ID}">')
    if start < 0:
        return None
    start = text.index(">", start) + 1
    end = text.find("</script>", start)
    try:
        data = json.loads(text[start:end].replace("<\\/", "</"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))


def _facts(v: Any) -> str:
    """``runtime onnxruntime, version 1.32.0, device cpu`` for a backend's description."""
    return ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)


def _tol_text(tol: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in tol.items() if v is not None) or "none"


def _summary(data: ReportData) -> str:
    verdict = "PASS" if data.passed else "FAIL"
    rows = []
    for c in data.checks:
        state = {"ok": ("pass", "PASS"), "skipped": ("skip", "SKIPPED")}.get(c.status, ("fail", "FAIL"))
        extra = ""
        if c.status == "skipped":
            extra = _e(c.note)
        elif not c.passed:
            failures = "; ".join(c.record.get("failures") or [])
            need = _tol_text({k: v for k, v in c.suggested.items() if v is not None})
            extra = (f"{_e(failures)}<br><b class=\"minimal-tolerances\">smallest tolerances that would pass: "
                     f"{_e(need)}</b> (each bound on its own, the others as configured)")
        rows.append(f"<tr><td><a href=\"#check-{_e(c.name)}\">{_e(c.name)}</a></td>"
                    f"<td class=\"{state[0]}\">{state[1]}</td><td class=\"mono\">{_e(_tol_text(c.tolerance))}</td>"
                    f"<td>{extra}</td></tr>")
    source = "<br>".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in data.source.items())
    targets = ", ".join(_e(t) for t in data.targets) or "none"
    return (f"<section id=\"summary\"><h2>Summary</h2><p id=\"verdict\" class=\"verdict {verdict.lower()}\">"
            f"{verdict}</p><table><tr><th>manifest</th><td>{_e(data.manifest)}</td></tr>"
            f"<tr><th>source</th><td>{source}</td></tr><tr><th>targets</th><td>{targets}</td></tr></table>"
            "<table id=\"checks\"><tr><th>check</th><th>result</th><th>tolerances used</th><th>details</th></tr>"
            + "".join(rows) + "</table></section>")


def _check_section(c: CheckData, data: ReportData) -> str:
    head = f"<section class=\"check\" id=\"check-{_e(c.name)}\"><h2>{_e(c.name)} vs PyTorch</h2>"
    backend = c.record.get("backend") or {}
    facts = " &middot; ".join(f"{_e(k)}: {_e(_fmt(c.record.get(k)))}" for k in
                              ("max_abs", "max_rel", "min_cosine", "rank1_agreement") if k in c.record)
    topk = [k for k in c.record if k.startswith("top") and k.endswith("_overlap")]
    facts += "".join(f" &middot; {_e(k)}: {_e(_fmt(c.record[k]))}" for k in topk)
    head += f"<p>{_e(_facts(backend))}</p><p class=\"mono\">{facts}</p>"
    if c.reference is None or c.actual is None or c.reference.shape != c.actual.shape:
        return head + f"<p class=\"skip\">{_e(c.note or 'no per-image features recorded')}</p></section>"
    ref, act = c.reference.astype(np.float64), c.actual.astype(np.float64)
    # the errors the check's atol/rtol judged: of L2-normalised features in the default mode, as max_abs says
    mode = c.record.get("compare") or "raw"
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf features: NaN cosine and errors, drawn as failed
        cos = np.sum(ref * act, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1), 1e-30)
        diff = np.abs(in_mode(act, mode) - in_mode(ref, mode))
    of = " (L2-normalised features)" if mode == "normalized" else ""
    min_cos = c.tolerance.get("min_cosine")
    failed = [not r.get("ok", True) for r in c.record.get("per_image") or []]
    svgs = [charts.per_image_bars(1.0 - cos, f"{c.name}: per-image cosine, shown as 1 - cosine",
                                  "1 - cosine", None if min_cos is None else 1.0 - min_cos, "1 - min_cosine", failed),
            charts.per_image_bars(diff.max(axis=1), f"{c.name}: per-image max |error|{of}", "max abs error",
                                  c.tolerance.get("atol"), "atol", failed),
            charts.error_histogram(diff, f"{c.name}: element-wise errors{of}")]
    return head + f"<div class=\"charts\">{''.join(svgs)}</div>" + _retrieval(c, data) + "</section>"


def _retrieval(c: CheckData, data: ReportData) -> str:
    n = len(c.images)
    k = min(int(c.tolerance.get("topk") or 5), n - 1)
    if k < 1:
        return "<p class=\"skip\">retrieval view needs at least 2 images</p>"
    ref_nn, act_nn = c.neighbours(k)
    thumbs = {name: _thumb(data.image_paths.get(name), data.input_size) for name in c.images}
    rows = []
    for q in range(min(n, MAX_QUERIES)):
        ref_set = set(ref_nn[q].tolist())
        moved = sum(1 for j in act_nn[q] if j not in ref_set)
        cells = [_cell(c.images[q], thumbs, "query")]
        ref_cells = "".join(_cell(c.images[j], thumbs, "") for j in ref_nn[q])
        act_cells = "".join(_cell(c.images[j], thumbs, "differs" if j not in ref_set else "") for j in act_nn[q])
        rows.append(f"<tr><td>{cells[0]}</td><td>{ref_cells}</td><td>{act_cells}</td>"
                    f"<td class=\"{'fail' if moved else 'pass'}\">{moved}</td></tr>")
    more = f"<p>first {MAX_QUERIES} of {n} queries shown</p>" if n > MAX_QUERIES else ""
    return (f"<h3>Retrieval: top-{k} neighbours of each parity image</h3><table class=\"ret retrieval\" "
            f"id=\"retrieval-{_e(c.name)}\"><tr><th>query</th><th>PyTorch top-{k}</th><th>{_e(c.name)} top-{k} "
            "(red: not in PyTorch's)</th><th>differing</th></tr>" + "".join(rows) + "</table>" + more)


def _cell(name: str, thumbs: dict[str, str], cls: str) -> str:
    return (f"<span class=\"thumb {cls}\" title=\"{_e(name)}\"><img alt=\"{_e(name)}\" src=\"{thumbs[name]}\">"
            f"{_e(name[:10])}</span>")


def _thumb(path: Optional[Path], size: tuple[int, int]) -> str:
    """A small JPEG data URI of the image as the model sees it (resized to the input aspect), grey if absent."""
    from PIL import Image

    h, w = size
    th = 64
    tw = max(1, round(th * w / h))
    try:
        with Image.open(path) as im:  # type: ignore[arg-type]
            small = im.convert("RGB").resize((tw, th))
    except (OSError, ValueError, TypeError, AttributeError):
        small = Image.new("RGB", (tw, th), (200, 200, 200))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _timeline(data: ReportData) -> str:
    rows = "".join(f"<tr><td>{_e(t['stage'])}</td><td>{_e(_fmt(t['seconds']))}</td><td>{_e(t['status'])}</td>"
                   f"<td>{'cached (up to date)' if t['cached'] else 'ran'}</td></tr>" for t in data.timeline)
    timed = [t for t in data.timeline if t["seconds"] is not None]
    chart = ""
    if timed:
        svg = charts.timeline([t["stage"] for t in timed], [t["seconds"] for t in timed], [t["cached"] for t in timed])
        chart = f"<div class=\"charts\">{svg}</div>"
    return ("<section id=\"timeline\"><h2>Stage timeline</h2>" + chart +
            "<table><tr><th>stage</th><th>seconds</th><th>status</th><th>in the run that wrote this report</th></tr>"
            + rows + "</table></section>")


def _artifacts(data: ReportData) -> str:
    rows = "".join(f"<tr><td>{_e(a['file'])}</td><td>{_e(a['stage'])}</td><td>{_e(a['size'])}</td>"
                   f"<td class=\"mono\">{_e(a['sha256'])}</td><td>{'yes' if a['reproducible'] else 'no'}</td></tr>"
                   for a in data.artifacts)
    return ("<section id=\"artifacts\"><h2>Artifacts</h2><table><tr><th>file</th><th>stage</th><th>bytes</th>"
            "<th>sha256</th><th>byte-reproducible</th></tr>" + rows + "</table></section>")


def _environment(data: ReportData) -> str:
    env = data.environment
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in env["tools"].items())
    rows += "".join(f"<tr><td>{_e(k)} runtime</td><td>{_e(_facts(v))}</td></tr>" for k, v in env["runtimes"].items())
    rows += "".join(f"<tr><td>TensorRT {_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in env.get("tensorrt", {}).items())
    rows += f"<tr><td>report written on</td><td>{_e(env['report written on'])}</td></tr>"
    return ("<section id=\"environment\"><h2>Environment</h2><table><tr><th>tool</th><th>version</th></tr>"
            + rows + "</table></section>")
