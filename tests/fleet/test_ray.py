"""Fleet builds on a local Ray cluster started here: a head and a worker that advertises a GPU type.

The cluster listens on loopback only (checked from /proc while it runs, the driver included) and every process
it started is gone at the end.

Four manifests; CPU stages spread over both nodes; the engine stage of the manifest that asks for
"NVIDIA A10" is placed only on the worker advertising that resource (no TensorRT here, so it is recorded
as skipped there: the placement is what is checked); every lock equals a serial build's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import stable_lock, tiny_manifest
from tests.netcheck import listening, not_loopback, session_pids

pytest.importorskip("ray", reason="Ray is an optional extra (pip install reidbuild[ray])")

REPO = Path(__file__).resolve().parents[2]
GPU = "NVIDIA A10"
# every Ray process and driver of the test: loopback addresses stay loopback (see ray_loopback.py), no usage stats
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --block`` head and worker processes on loopback, each in its own session so that stopping
    them (SIGTERM, then SIGKILL to that process group) ends exactly the processes this test started."""

    def __init__(self) -> None:
        # Ray's socket paths must stay short: a temp folder directly under /tmp
        self.tmp = Path(tempfile.mkdtemp(prefix="rbray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **LOOPBACK, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
        self.procs: list[subprocess.Popen] = []
        lean = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(80 * 1024 * 1024),
                "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--dashboard-host", "127.0.0.1", "--temp-dir", str(self.tmp / "t")] + lean)
            self.wait_nodes(1)
            self._start("worker", ["--address", self.address, "--resources", json.dumps({GPU: 1})] + lean)
            self.nodes = self.wait_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        launcher = [sys.executable, str(Path(__file__).with_name("ray_loopback.py"))]
        self.procs.append(subprocess.Popen([*launcher, "start", *args], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{'id': x['NodeID'], 'resources': x['Resources']} for x in ray.nodes() "
                "if x['Alive']]))" % self.address)
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                nodes = json.loads(r.stdout.strip().splitlines()[-1])
                if len(nodes) >= n:
                    return nodes
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join((self.tmp / f).read_text(errors="replace")[-800:] for f in ("head.log", "worker.log")
                                 if (self.tmp / f).exists())
                raise RuntimeError(f"Ray cluster did not come up: {r.stderr[-800:]}\n{logs}")
            time.sleep(1)

    def processes(self) -> set[int]:
        """Every process of this cluster still alive (each node's `ray start` runs in a session of its own)."""
        return session_pids({p.pid for p in self.procs})

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever that node left behind in its own session (raylet, workers, GCS)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        assert not_loopback(listening(c.processes())) == [], "a Ray process listens beyond loopback"
        yield c
    finally:
        c.stop()
    assert c.processes() == set(), "Ray processes outlived the test"


def projects(root: Path) -> list[Path]:
    """Four small manifests (different weights); the last builds an engine for an A10, another one with no GPU."""
    out = []
    for i in range(4):
        extra = ""
        if i == 3:
            extra = f'targets:\n  tensorrt: {{mode: fp32, batch_size: 1, gpu: "{GPU}"}}\n'
        elif i == 2:
            extra = "targets:\n  tensorrt: {mode: fp32, batch_size: 1}\n"
        out.append(tiny_manifest(root / f"p{i}", weights=f"{{random: {{seed: {i + 1}}}}}", extra=extra))
    return out


def apply(*args: str, timeout: float = 900, watch: LocalCluster | None = None,
          exposed: list | None = None) -> subprocess.CompletedProcess:
    """`reidbuild apply` in a child process. One thread, like the Ray workers (Ray sets OMP_NUM_THREADS to a
    task's num_cpus): the parity figures in a lock are float reductions whose last digits depend on the thread
    count. With ``watch``, every half second while it runs, the sockets of the driver and of every process of
    the cluster (task workers come and go) that listen beyond loopback are added to ``exposed``."""
    env = {**os.environ, **LOOPBACK, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reidbuild.cli", "apply", *args], stdout=out, stderr=err,
                                text=True, env=env)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if watch is not None and exposed is not None:
                exposed.extend(not_loopback(listening({proc.pid} | watch.processes())))
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def test_ray_fleet_places_engine_on_gpu_node_and_matches_serial_locks(cluster, tmp_path):
    fleet, serial = projects(tmp_path / "fleet"), projects(tmp_path / "serial")
    worker = next(n["id"] for n in cluster.nodes if GPU in n["resources"])
    head = next(n["id"] for n in cluster.nodes if GPU not in n["resources"])
    exposed: list = []
    r = apply(*map(str, fleet), "--ray", cluster.address, "--cache", f"file://{tmp_path / 'cache'}",
              "--skip-unavailable", "--json", watch=cluster, exposed=exposed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert exposed == [], "the driver or a Ray process listened beyond loopback during the build"
    results = {Path(m["manifest"]).parent.name: m for m in json.loads(r.stdout)["manifests"]}
    assert all(m["exit_code"] == 0 for m in results.values()), r.stdout
    cpu_nodes = set()
    for name, m in results.items():
        assert m["ran"] == ["load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report"], (name, m)
        assert "report" not in m["placement"]  # it reads this run's lock records: built where the lock is
        cpu_nodes |= {m["placement"][s] for s in m["ran"] if s != "report"}
    assert cpu_nodes == {head, worker}, "CPU stages were not spread over both nodes"
    assert results["p3"]["placement"]["tensorrt.engine"] == worker
    assert results["p3"]["skipped"] == ["tensorrt.engine"]
    assert "tensorrt.engine" not in results["p2"]["placement"]  # no gpu asked: not a placed stage

    r = apply(*map(str, serial), "--skip-unavailable")
    assert r.returncode == 0, r.stderr[-3000:]
    for f, s in zip(fleet, serial):
        assert stable_lock(f.with_suffix(".lock").read_text()) == stable_lock(s.with_suffix(".lock").read_text()), f
        for art in (f.parent / "out").iterdir():
            if not art.name.startswith(".") and not art.name.endswith(".report.html"):  # it shows run times
                assert art.read_bytes() == (s.parent / "out" / art.name).read_bytes(), art
