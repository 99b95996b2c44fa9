"""The shared cache on S3 through s3fs, against a local S3 API (moto's server mode on 127.0.0.1, started here).

Credentials and the endpoint reach s3fs the usual way (AWS_* environment variables), never via reidbuild.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reidbuild.cli import main
from reidbuild.fleet import ApplyOptions, apply_manifest
from tests.helpers import stable_lock, tiny_manifest, tree
from tests.netcheck import listening, not_loopback, session_pids

pytest.importorskip("s3fs", reason="s3fs is the S3 backend of the cache (pip install reidbuild[s3])")
pytest.importorskip("moto.server", reason="moto[server] provides the local S3 endpoint for this test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto's S3 server in a child process on loopback; ``stop`` kills exactly that process."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.1)
        sockets = listening(session_pids({self.proc.pid}))
        assert sockets and not_loopback(sockets) == [], f"moto's server must listen on loopback only: {sockets}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert session_pids({self.proc.pid}) == set(), "moto's server left processes behind"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    endpoint = S3Endpoint(tmp_path / "moto.log")
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint.url}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("reid-cache")
        endpoint.fs = fs
        yield endpoint
    finally:
        endpoint.stop()


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


URL = "s3://reid-cache/team"
STAGES = ["load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report"]


def test_s3_restore_and_corrupt_blob(s3, tmp_path):
    a, b, c = (tiny_manifest(tmp_path / n) for n in "abc")
    code, out, err = cli("apply", str(a), "--cache", URL, "--json")
    assert code == 0, err
    assert json.loads(out)["ran"] == STAGES and json.loads(out)["cache_problems"] == []
    s3.fs.invalidate_cache()
    assert len(s3.fs.find("reid-cache/team/actions")) == 5
    code, out, err = cli("apply", str(b), "--cache", URL, "--json")
    assert code == 0 and json.loads(out)["restored"] == STAGES and json.loads(out)["ran"] == []
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    assert (tmp_path / "a" / "m.lock").read_bytes() == (tmp_path / "b" / "m.lock").read_bytes()

    # flip one byte of the exported ONNX blob: that stage is rebuilt (and reported), the rest still restored
    entry = json.loads(next(s3.fs.cat_file(p) for p in s3.fs.find("reid-cache/team/actions")
                            if b'"onnx.export"' in s3.fs.cat_file(p)))
    digest = entry["outputs"]["tiny.export.onnx"]["sha256"]
    blob = f"reid-cache/team/blobs/{digest[:2]}/{digest}"
    data = bytearray(s3.fs.cat_file(blob))
    data[len(data) // 2] ^= 0xFF
    s3.fs.pipe_file(blob, bytes(data))
    code, out, err = cli("apply", str(c), "--cache", URL, "--json")
    res = json.loads(out)
    assert code == 0, err
    assert res["ran"] == ["onnx.export"] and res["restored"] == ["load", "onnx.simplify", "parity.onnxruntime", "report"]
    assert any("corrupt" in p and digest[:12] in p for p in res["cache_problems"])
    assert "warning: " in err and "corrupt" in err
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "c" / "out")
    assert stable_lock((tmp_path / "a" / "m.lock").read_text()) == stable_lock((tmp_path / "c" / "m.lock").read_text())
    assert s3.fs.cat_file(blob) != bytes(data), "the local rebuild pushed the good bytes back"


def test_s3_endpoint_gone_mid_run_builds_locally(s3, tmp_path):
    ref, gone = tiny_manifest(tmp_path / "ref"), tiny_manifest(tmp_path / "gone")
    assert cli("apply", str(ref))[0] == 0  # a build without any cache, to compare with
    events = []

    def emit(ev):
        events.append(ev)
        if ev.kind == "done" and ev.stage == "load":
            s3.stop()  # the endpoint goes away after the first stage was built and pushed

    t0 = time.monotonic()
    res = apply_manifest(gone, ApplyOptions(cache=URL), emit)
    assert res.ran == STAGES and res.restored == []
    warnings = [e.message for e in events if e.kind == "warn"]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "building locally" in warnings[0]
    assert res.cache_problems and time.monotonic() - t0 < 120
    assert stable_lock((tmp_path / "ref" / "m.lock").read_text()) == stable_lock((tmp_path / "gone" / "m.lock").read_text())

    # the same with --cache-required: exit 3, with a one-line reason
    again = tiny_manifest(tmp_path / "required")
    code, _, err = cli("apply", str(again), "--cache", URL, "--cache-required")
    assert code == 3 and "unreachable" in err and "--cache-required" in err and "Traceback" not in err
    assert not (tmp_path / "required" / "m.lock").exists()
    code, _, err = cli("cache", "ls", "--cache", URL)
    assert code == 3 and "unreachable" in err and "Traceback" not in err
