"""The report stage's pipeline contract (``partial_deps``): a skipped check is left out of the report instead of
skipping it; with --locked (which writes nothing) the report is skipped, not compared; run times reach the lock."""
from __future__ import annotations

from reidbuild import lockfile
from reidbuild.pipeline import Stage, StageResult, run


def stages(root, trt_available):
    def check(name):
        return lambda ctx: StageResult({f"{name}.npz": name.encode()})

    def report(ctx):
        present = sorted(s for s in ("cpu", "trt") if ctx.lock.stages.get(s) and ctx.lock.stages[s].status == "ok")
        return StageResult({"r.html": ",".join(present).encode()}, {"cached": list(ctx.up_to_date)})

    return [Stage("cpu", check("cpu"), outputs=("cpu.npz",)),
            Stage("trt", check("trt"), outputs=("trt.npz",), available=lambda: trt_available),
            Stage("report", report, deps=("cpu", "trt"), outputs=("r.html",), partial_deps=True,
                  reproducible=False)]


def apply(root, trt_available=None, **kw):
    return run(stages(root, trt_available), lock_path=root / "m.lock", manifest_entry={"path": "m.yml"},
               output_dir=root / "out", base=root, emit=lambda ev: None, **kw)


def test_a_skipped_check_is_left_out_of_the_report(tmp_path):
    out = apply(tmp_path, "no GPU here", skip_unavailable=True)
    assert out.skipped == ["trt"] and "report" in out.ran
    assert (tmp_path / "out" / "r.html").read_bytes() == b"cpu"
    lock = lockfile.read(tmp_path / "m.lock")
    assert set(lock.stages["report"].outputs) == {"r.html"}
    assert all(lock.stages[s].seconds is not None for s in ("cpu", "report"))
    # on the GPU machine the check runs and the report (whose inputs changed) is rebuilt with it
    out = apply(tmp_path)
    assert out.ran == ["trt", "report"] and out.cached == ["cpu"]
    assert (tmp_path / "out" / "r.html").read_bytes() == b"cpu,trt"
    assert lockfile.read(tmp_path / "m.lock").stages["report"].record == {"cached": ["cpu"]}


def test_locked_on_a_machine_without_the_backend_skips_the_report(tmp_path):
    apply(tmp_path)  # built where every check runs
    lock_text = (tmp_path / "m.lock").read_text()
    out = apply(tmp_path, "no GPU here", skip_unavailable=True, locked=True, force=True)
    assert out.skipped == ["trt", "report"] and not out.drift
    assert (tmp_path / "m.lock").read_text() == lock_text
