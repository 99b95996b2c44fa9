"""Make a screenshot of a reidbuild parity report in headless Chromium (for docs and reviews; keep it out of git).

    python scripts/report_screenshot.py outputs/demo/demo.report.html outputs/demo/demo.report.png

Uses the same DevTools-over-a-pipe client as the browser tests, so it also prints any console error the page
raised. Needs Debian's ``chromium`` (``make browser`` installs it).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import chromium, load, pixel_stddev


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    page, shot = Path(argv[0]), Path(argv[1])
    if not page.is_file():
        print(f"error: {page}: no such report (run `make demo` first)", file=sys.stderr)
        return 2
    if chromium() is None:
        print("error: chromium is not installed (make browser)", file=sys.stderr)
        return 3
    result = load(page, shot)
    for err in result.errors:
        print(f"console error: {err}", file=sys.stderr)
    print(f"{shot} (grey-level spread {pixel_stddev(shot):.1f})")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
