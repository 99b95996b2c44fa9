"""The reliability numbers the README and COUNTS.md quote are floors, asserted here (and, for counts made in one
loop, by the counting test itself): the docs quote exactly the floors in ``_util.FLOORS``, the tables of bad
inputs hold at least that many cases (each its own test that must refuse its input), and a run of the whole
folder reaches every floor. conftest runs this module last, after the tests whose counts it adds up."""
from __future__ import annotations

import re

from tests.helpers import REPO
from tests.reliability import _util
from tests.reliability._util import COUNTS, FLOORS, floor

# where each floor is quoted: (pattern in README "Reliability", pattern in COUNTS.md), each capturing the number
QUOTED = {
    "crash: timed kills": (r"at least ([\d,]+) timed", r"timed points[^|]*\| at least ([\d,]+) \|"),
    "crash: exact commit-point kills": (r"([\d,]+) at exact commit points", r"exact commit points[^|]*\| ([\d,]+) \|"),
    "crash: stage kinds killed while running": (r"every stage kind \(([\d,]+):", r"stage kinds[^|]*\| ([\d,]+) \|"),
    "bad inputs refused": (r"([\d,]+) bad inputs", r"bad inputs refused[^|]*\| ([\d,]+) \|"),
    "odd valid images accepted": (r"([\d,]+) odd but\s+valid images", r"odd but valid images[^|]*\| ([\d,]+) \|"),
    "planted symlinks not followed": (r"\(([\d,]+) planted", r"symlinks planted[^|]*\| ([\d,]+) \|"),
    "tampering caught": (r"tool version \(([\d,]+) cases\)", r"tampering caught[^|]*\| ([\d,]+) \|"),
    "corrupted outputs caught by parity": (r"\(([\d,]+) corruptions caught\)",
                                           r"corrupted backend outputs[^|]*\| ([\d,]+) \|"),
    "property-based examples": (r"at least ([\d,]+) hypothesis\s+examples",
                                r"property-based examples[^|]*\| at least ([\d,]+) \|"),
}


def _number(pattern: str, text: str, where: str) -> int:
    m = re.search(pattern, " ".join(text.split()))  # line breaks in the docs are spaces
    assert m, f"{where} does not quote /{pattern}/"
    return int(m.group(1).replace(",", ""))


def test_the_docs_quote_exactly_the_asserted_floors():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Reliability"):]
    section = section[:section.index("\n## ", 1)]
    counts_md = (REPO / "tests" / "reliability" / "COUNTS.md").read_text()
    assert set(QUOTED) == set(FLOORS)
    for name, (in_readme, in_counts) in QUOTED.items():
        assert _number(in_readme, section, "README's Reliability section") == floor(name), name
        assert _number(in_counts, counts_md, "tests/reliability/COUNTS.md") == floor(name), name


def test_the_tables_of_bad_inputs_hold_the_quoted_number_of_cases():
    from tests.reliability import test_checkpoints, test_inputs, test_paths

    tables = {"manifests": test_inputs.MANIFESTS, "configs": test_inputs.CONFIGS, "patch files": test_inputs.PATCHES,
              "images": test_inputs.BAD_IMAGES, "checkpoints": test_checkpoints.BAD,
              "code-carrying pickles": test_checkpoints.EVIL_CONTAINERS, "unsafe names": test_paths.BAD_NAMES}
    assert sum(map(len, tables.values())) >= floor("bad inputs refused"), {k: len(v) for k, v in tables.items()}


def test_a_run_of_the_whole_folder_reaches_every_floor():
    """Each floor whose counting modules ran whole in this session (no -k, -m, node ids or deselection): the
    counters its tests added (one per refused input, caught corruption, kill, ...) reach it."""
    ran = _util.WHOLE_MODULES - _util.DESELECTED_MODULES
    reached = {}
    for name, f in FLOORS.items():
        if set(f.modules) <= ran:
            reached[name] = sum(v for k, v in COUNTS.items() if k.startswith(f.counters))
            assert reached[name] >= f.value, f"{name}: {reached[name]} < {f.value} (counters: {COUNTS})"
    print(f"\nfloors reached in this run: {reached}")
