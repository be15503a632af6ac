"""A page rendered by a real headless Chromium, driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``: JSON messages ended by a
NUL byte, read by the browser on fd 3 and written on fd 4).  No new
dependency: only the Debian ``chromium`` package.

:func:`render` loads a file, records every error the page reports (console
errors, uncaught exceptions, log entries of level error, which include
Content-Security-Policy violations) and the URL of every request it makes,
counts elements by CSS selector and saves a screenshot.  Every wait is
bounded by :data:`TIMEOUT`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT = 60.0  # seconds, for the browser's start and for each command
CHROMIUM = ("chromium", "chromium-browser")


class BrowserUnavailable(Exception):
    """No usable chromium on this machine."""


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, selector: str) -> int:
        return self.counts[selector]


class _Pipe:
    def __init__(self, to_browser: int, from_browser: int) -> None:
        self.out = to_browser
        self.inp = from_browser
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self.inp], [], [], left)
            if ready:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise BrowserUnavailable("chromium closed the DevTools pipe")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        data: dict[str, Any] = json.loads(message)
        return data


def _executable() -> str:
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserUnavailable("chromium is not installed (apt-get install chromium)")


def render(page: Path, screenshot: Path, profile: Path, selectors: Iterable[str] = ()) -> Rendered:
    """Load ``page`` (a file) headless, save a PNG of it to ``screenshot``."""
    exe = _executable()
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    args = [
        exe,
        "--headless",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,900",
        "about:blank",
    ]
    if os.geteuid() == 0:
        # Chromium's sandbox refuses to run as root.
        args.insert(2, "--no-sandbox")

    def fds() -> None:
        # Moved out of the way first: either may already be fd 3 or 4.
        inp = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10)
        out = fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.dup2(inp, 3)
        os.dup2(out, 4)
        os.close(inp)
        os.close(out)

    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # The Popen's fd closing runs after preexec_fn and would close 3
        # and 4; os.pipe's own fds are not inheritable, so none leaks.
        close_fds=False,
        preexec_fn=fds,  # only dup2 before exec
    )
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(to_w, from_r)
    seen = Rendered()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.events.clear()
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_for("Page.loadEventFired")
        for selector in selectors:
            result = pipe.send(
                "Runtime.evaluate",
                {
                    "expression": f"document.querySelectorAll({json.dumps(selector)}).length",
                    "returnByValue": True,
                },
                session=session,
            )
            seen.counts[selector] = int(result["result"]["value"])
        shot = pipe.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=session,
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        for event in pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                seen.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                seen.errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                seen.errors.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                seen.errors.append(str(params["entry"].get("text"))[:500])
        with contextlib.suppress(RuntimeError, TimeoutError, BrowserUnavailable):
            pipe.send("Browser.close")
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return seen
