"""A headless Chromium driven over the DevTools protocol on a pipe (stdlib only).

``--remote-debugging-pipe`` makes Chromium read protocol commands from fd 3 and write replies and
events to fd 4, as NUL-terminated JSON messages; no port, no websocket library. Used by the
report's browser test to load a page, then read image state, console errors and a screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = ("headless Chromium is required for this test and was not found on PATH (chromium, "
                "chromium-browser, google-chrome). Install Debian's package: `apt-get install -y chromium` "
                "(scripts/setup.sh installs it).")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe"]

# Runs in the page after its load event: what the test asserts on.
PAGE_STATE_JS = """JSON.stringify({
  title: document.title,
  h1: (document.querySelector('h1') || {}).textContent || '',
  text: document.body ? document.body.innerText : '',
  tables: document.querySelectorAll('table').length,
  scripts: document.scripts.length,
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth,
                                                  height: i.naturalHeight, alt: i.alt,
                                                  shown: i.getBoundingClientRect().width})),
  scroll_height: document.documentElement.scrollHeight
})"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """``with Chromium() as b: state = b.load(path)``: one headless browser, one page."""

    def __init__(self, exe: str, timeout: float = 90.0):
        self.exe, self.timeout = exe, timeout
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Condition()
        self._closed = False

    # -- process and pipe -----------------------------------------------------------------------
    def __enter__(self) -> "Chromium":
        self._profile = tempfile.TemporaryDirectory(prefix="pnnh-chromium-")
        self._log = open(Path(self._profile.name) / "stderr.log", "wb")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: put the pipe ends on fds 3 and 4
            r, w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [self.exe, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, preexec_fn=child_fds, close_fds=False)
        os.close(to_r)
        os.close(from_w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=10)
                except Exception:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_w,):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            self._profile.cleanup()

    def stderr_tail(self) -> str:
        try:
            return (Path(self._profile.name) / "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                *msgs, buf = buf.split(b"\0")
                for m in msgs:
                    msg = json.loads(m)
                    if "id" in msg:
                        with self._lock:
                            self._replies[msg["id"]] = msg
                            self._lock.notify_all()
                    else:
                        self._events.put(msg)
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    # -- protocol -------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._lock:
            while self._id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no reply to {method} from chromium; its stderr:\n{self.stderr_tail()}")
                self._lock.wait(left)
            reply = self._replies.pop(self._id)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def _drain(self, into: list[dict]) -> None:
        while True:
            try:
                into.append(self._events.get_nowait())
            except queue.Empty:
                return

    def load(self, path: str | Path) -> dict[str, Any]:
        """Open ``path`` in a fresh page; return its state, the errors it logged and a screenshot."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        events: list[dict] = []
        self._drain(events)
        events.clear()
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path} did not finish loading; chromium stderr:\n{self.stderr_tail()}")
            try:
                events.append(self._events.get(timeout=min(left, 1.0)))
            except queue.Empty:
                pass
        state = json.loads(self.send("Runtime.evaluate", {"expression": PAGE_STATE_JS, "returnByValue": True},
                                     session=session)["result"]["value"])
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        time.sleep(0.2)  # late console messages
        self._drain(events)
        state["errors"] = [_error_text(e) for e in events if e.get("sessionId") == session and _is_error(e)]
        state["screenshot"] = base64.b64decode(shot)
        self.send("Target.closeTarget", {"targetId": target})
        return state


def _is_error(e: dict) -> bool:
    m, p = e.get("method"), e.get("params", {})
    if m == "Runtime.exceptionThrown":
        return True
    if m == "Runtime.consoleAPICalled":
        return p.get("type") in ("error", "assert")
    if m == "Log.entryAdded":
        return p.get("entry", {}).get("level") == "error"
    return False


def _error_text(e: dict) -> str:
    p = e.get("params", {})
    if e["method"] == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return f"exception: {d.get('exception', {}).get('description') or d.get('text')}"
    if e["method"] == "Runtime.consoleAPICalled":
        return "console." + p.get("type", "?") + ": " + " ".join(str(a.get("value", a.get("description")))
                                                              for a in p.get("args", []))
    entry = p.get("entry", {})
    return f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip()
