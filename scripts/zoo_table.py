"""Render the results of tests/zoo (one JSON per fast-reid config) into the README's model-zoo table.

`make zoo-table` runs the tests with REIDBUILD_ZOO_RESULTS=outputs/zoo and then this script. Every config
of the corpus gets a row; one the run did not reach is shown as "not run", never left out.

    python scripts/zoo_table.py outputs/zoo README.md
"""
from __future__ import annotations

import json
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.zoo import corpus  # noqa: E402 (the repository root goes on the path first)

BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def _short_error(text: str) -> str:
    """The error line without 'error:' and the temporary folder it names."""
    text = re.sub(r"^error:\s*", "", text.strip())
    text = re.sub(r"\S*/(logs/\S+)", r"\1", text)
    return text.replace("|", "\\|")[:240]


def _figures(m: dict[str, float] | None) -> str:
    if m is None:
        return ""
    return f"min cos 1 − {max(1.0 - m['min_cosine'], 0.0):.0e}, max Δ {m['max_abs_normalised']:.1e}"


def _cell(res: dict[str, Any], backend: str) -> str:
    """One backend's cell: did apply build and check it, and how close it is to fast-reid's eval output."""
    stage = {"onnx": "parity.onnxruntime", "caffe": "parity.caffe"}[backend]
    m = res.get(backend)
    status = res.get("stages", {}).get(stage)
    if m is None:
        if backend == "caffe" and res.get("onnx") is None and res.get("exit"):
            return "✗ not built (see ONNX)"
        return f"✗ {_short_error(res.get('error', ''))}" if res.get("exit") else "✗ not built"
    matches = corpus.passes(m)
    if status == "ok" and matches:
        return f"✓ {_figures(m)}"
    why = "apply's parity check failed" if status == "failed" else "apply stopped before its parity check"
    return f"✗ built, {why}{' (matches fast-reid)' if matches else ''}: {_figures(m)}"


def _commits(results: Path) -> set[str]:
    return {json.loads(f.read_text()).get("commit", "unknown") for f in results.rglob("*.json")}


def rows(results: Path) -> tuple[list[str], dict[str, Any]]:
    out: list[str] = []
    counts: dict[str, Any] = {"configs": 0, "apply": 0, "onnx": 0, "caffe": 0, "built_in": 0, "keys": 0,
                              "built": 0, "match": 0, "commits": set()}
    for path in corpus.config_files():
        cid = corpus.config_id(path)
        counts["configs"] += 1
        f = results / f"{cid}.json"
        if not f.is_file():
            out.append(f"| {cid} | | | not run | not run |")
            continue
        res = json.loads(f.read_text())
        counts["commits"].add(res.get("commit", "unknown"))
        h, w = res["input"]
        counts["apply"] += res.get("exit") == 0
        keys = res.get("key_differences")
        counts["built_in"] += keys is not None
        counts["keys"] += keys == []
        for b in ("onnx", "caffe"):
            counts[b] += _cell(res, b).startswith("✓")
            counts["built"] += res.get(b) is not None
            counts["match"] += res.get(b) is not None and corpus.passes(res[b])
        at = f" (at {res.get('commit', 'unknown')})" if len(_commits(results)) > 1 else ""  # a mixed run says so
        out.append(f"| {cid}{at} | {res['architecture']} | {h}×{w} | {_cell(res, 'onnx')} | {_cell(res, 'caffe')} |")
    return out, counts


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def table(results: Path) -> str:
    body, n = rows(results)
    commits = ", ".join(sorted(n["commits"])) or "none"
    summary = (f"`make zoo-table` output (reidbuild {commits}; fastreid {_version('fastreid')}, torch "
               f"{_version('torch')}, onnxruntime "
               f"{_version('onnxruntime')}, Caffe: pycaffe). {n['apply']} of {n['configs']} configs pass "
               f"`reidbuild apply` (ONNX + Caffe, parity on both); ONNX ✓ {n['onnx']}, Caffe ✓ {n['caffe']}. reidbuild "
               f"builds {n['built_in']} of them in; for {n['keys']} of those its state-dict keys and shapes equal "
               f"fast-reid's. Of the {n['built']} ONNX models and Caffe nets built, {n['match']} match fast-reid's "
               "eval output.")
    head = [
        summary,
        "",
        "| fast-reid config | architecture | input | ONNX | Caffe (bvlc) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + body)


def render(results: Path, readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN} and {END} are missing")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table(results) + "\n" + text[end:])


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    results, readme = Path(sys.argv[1]), Path(sys.argv[2])
    if not results.is_dir():
        print(f"error: {results}: no results folder; run `make zoo-table`", file=sys.stderr)
        return 2
    render(results, readme)
    print(f"wrote the table for {len(corpus.config_files())} configs into {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
