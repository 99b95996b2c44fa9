"""A real headless Chromium for the report tests, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol messages from fd 3 and write them to fd 4 (JSON,
NUL-separated), so no network port and no client library are needed. The page's console errors
(``console.error``), uncaught exceptions and failed loads (a broken image, a blocked resource: the browser's
Log domain) are collected while it loads; then the DOM and a full-page screenshot are taken. Every background
service is off and the profile is fresh: the test machine has no network, and without these flags Chromium
waits on connections that never come.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    dom: str
    screenshot: Path
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads


class _Pipe:
    """One Chromium and its protocol pipe; ``call`` sends a command and waits for its answer."""

    def __init__(self, profile: str) -> None:
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def child_fds() -> None:
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        exe = chromium()
        assert exe, "chromium is not installed (make test installs it: apt-get install -y chromium)"
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=child_fds, pass_fds=(3, 4))  # kept open after the dup2s
        os.close(to_r)
        os.close(from_w)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer in time"
            ready, _, _ = select.select([self.from_r], [], [], left)
            if ready:
                chunk = os.read(self.from_r, 1 << 20)
                assert chunk, "Chromium closed the protocol pipe"
                self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.append("exception: " + str(p.get("exceptionDetails", {}).get("text")))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


def load(page: Path, shot: Path, width: int = 1200, height: int = 900) -> Page:
    """Open ``page`` in headless Chromium; its DOM after load, a full-page screenshot and every error."""
    with tempfile.TemporaryDirectory(prefix="reidbuild-chromium-") as profile:
        b = _Pipe(profile)
        try:
            target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                b.call(f"{domain}.enable", session=s)
            b.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=s)
            b.call("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
            b.wait_for("Page.loadEventFired")
            time.sleep(0.5)  # late console messages
            dom = b.call("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                              "returnByValue": True}, session=s)["result"]["value"]
            png = b.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=s)
            shot.write_bytes(base64.b64decode(png["data"]))
            return Page(dom, shot, _errors(b.events))
        finally:
            b.close()


def pixel_stddev(png: Path) -> float:
    """Standard deviation of the screenshot's grey levels: ~0 for a blank page."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        return float(np.asarray(im.convert("L"), dtype=np.float64).std())
