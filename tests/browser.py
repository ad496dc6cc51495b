"""Open a page in real headless Chromium over the DevTools protocol: console errors, requests, DOM, screenshot.

One browser session gives all four, from the browser's own events (not parsed from its log): every console error,
uncaught exception and browser log error (a blocked or failed load is one), every URL the page requested, the DOM
after load, and a PNG screenshot of the whole page. Chromium is Debian's `chromium` (scripts/setup.sh installs it
for `make test`); the websocket client is `websockets` (the `test` extra).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The browser's path; an AssertionError (never a skip) when it is missing: `make test` installs it."""
    found = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    assert found is not None, "headless Chromium is missing: run `bash scripts/setup.sh --browser` (apt-get install chromium)"
    return found


@dataclass
class PageVisit:
    dom: str
    text: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Session:
    """Commands to one page over the browser's websocket (flattened sessions); events are kept as they come."""

    def __init__(self, url: str) -> None:
        self.ws = connect(url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == call_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self.events):
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if "method" in message:
                self.events.append(message)


def visit(page: Path, screenshot: Path, timeout: float = 60.0) -> PageVisit:
    """Load `page` (a file) in headless Chromium, write a full-page screenshot, return what the browser saw."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tba-fed-chromium-") as profile:
        process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "LANG": "C.UTF-8"})
        try:
            url = _devtools_url(process, timeout)
            s = _Session(url)
            target = s.call("Target.createTarget", url="about:blank")["targetId"]
            s.session = s.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                s.call(f"{domain}.enable")
            s.call("Page.navigate", url=page.absolute().as_uri())
            s.wait_for("Page.loadEventFired", timeout)
            evaluate = lambda expression: s.call("Runtime.evaluate", expression=expression,  # noqa: E731
                                                 returnByValue=True)["result"]["value"]
            dom = evaluate("document.documentElement.outerHTML")
            text = evaluate("document.body.innerText")
            images = evaluate("Array.from(document.images).map(i => ({id: i.id, complete: i.complete, "
                              "width: i.naturalWidth, height: i.naturalHeight}))")
            shot = s.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            errors = _errors(s.events)
            requests = [e["params"]["request"]["url"] for e in s.events if e["method"] == "Network.requestWillBeSent"]
            s.session = None
            s.call("Browser.close")
            s.ws.close()
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    return PageVisit(dom, text, errors, requests, images, time.monotonic() - start)


def _devtools_url(process: subprocess.Popen, timeout: float) -> str:
    """The browser's websocket URL, from the line Chromium prints on stderr once it listens."""
    deadline, seen = time.monotonic() + timeout, []
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line.rstrip())
        if match := re.search(r"DevTools listening on (ws://\S+)", line):
            return match.group(1)
    raise AssertionError("chromium did not start its DevTools endpoint:\n" + "\n".join(seen[-20:]))


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors and assertions, uncaught exceptions, and log entries at level error."""
    found = []
    for event in events:
        method, params = event["method"], event["params"]
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            found.append("console." + params["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                     for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log ({params['entry']['source']}): {params['entry']['text']} {params['entry'].get('url', '')}")
    return found
