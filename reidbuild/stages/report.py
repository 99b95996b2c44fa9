"""The report stage: ``<name>.report.html`` after the parity checks, rebuilt when their results change.

It depends on every parity stage's feature file (and reads the lock records committed so far in the run),
so a re-run with the same results leaves it cached. A skipped check (TensorRT on a CPU machine) is left out
rather than skipping the report (``partial_deps``). The page records how long stages took, so its bytes
differ run to run: the stage is not byte-reproducible, and two reports are equivalent when the result facts
they embed are equal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult

STAGE = "report"
REPORT_VERSION = 2  # bump when the page changes, so existing reports are rebuilt


def report_file_name(model_name: str) -> str:
    return f"{model_name}.report.html"


def report_stage(lm: LoadedManifest, parity_stages: list[str], order: list[str], images: list[Path]) -> Stage:
    """The stage writing the report for the checks ``parity_stages``; ``order`` is the build's stage order."""
    out = report_file_name(lm.model.name)

    def run(ctx: StageContext) -> StageResult:
        from ..report import collect, render

        data = collect(lm, ctx.lock, ctx.output_dir, order, cached=ctx.up_to_date, skip=(STAGE,))
        return StageResult({out: render(data).encode()}, {"passed": data.passed, "checks": len(data.checks)})

    def equivalent(locked: Path, rebuilt: Path) -> Optional[str]:
        from ..report.render import embedded_data

        a, b = (embedded_data((d / out).read_text(errors="replace")) for d in (locked, rebuilt))
        if a is None:
            return f"{out} in the output folder carries no report data"
        return None if a == b else f"{out}: the reports show different results"

    return Stage(STAGE, run, params={"version": REPORT_VERSION},
                 inputs={f"image[{i:03d}]": p for i, p in enumerate(images)},
                 deps=tuple(parity_stages), outputs=(out,), partial_deps=True,
                 reproducible=False, equivalent=equivalent, reads_lock=True,
                 # a report from the shared cache shows the same results (with the run times of its build)
                 environment=lambda: {},
                 description="write the HTML parity report (charts, retrieval view, timeline)")
