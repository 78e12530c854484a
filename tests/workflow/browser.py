"""A real headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe):
no websocket library, no driver binary. Used by the report test."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """``with Browser(exe) as b: b.open(url); b.eval(js)``."""

    def __init__(self, exe: str, timeout: float = 60):
        self.exe, self.timeout, self._id = exe, timeout, 0

    def __enter__(self):
        self._profile = tempfile.mkdtemp(prefix="cfga-chromium-")  # an empty --user-data-dir
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        def fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_message(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def eval(self, expression: str):
        """Evaluate JS in the page (promises awaited) → its JSON value."""
        r = self.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True, returnByValue=True,
                      timeout=int(self.timeout * 1000))
        if "exceptionDetails" in r:
            raise RuntimeError(f"page JS failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, condition: str, timeout: float | None = None) -> None:
        end = time.monotonic() + (timeout or self.timeout)
        while not self.eval(f"Boolean({condition})"):
            if time.monotonic() > end:
                raise TimeoutError(f"page never satisfied {condition!r}")
            time.sleep(0.2)
