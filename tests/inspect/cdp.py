"""A small Chrome DevTools Protocol client: open a page in headless Chromium, collect console errors,
check images, take a full-page screenshot. Used by the report tests and to make docs/report.png.

    with Chromium() as ch:
        res = ch.load("file:///.../index.html", screenshot="shot.png")
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium started with an empty profile and remote debugging on a free port."""

    def __init__(self, binary: Optional[str] = None, width: int = 1280, height: int = 900, timeout: float = 60):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise CDPError("no chromium binary found")
        self.width, self.height, self.timeout = width, height, timeout
        self.proc: Optional[subprocess.Popen] = None
        self.profile = tempfile.mkdtemp(prefix="kd3-chromium-")

    def __enter__(self) -> "Chromium":
        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--no-default-browser-check",
                "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                f"--window-size={self.width},{self.height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        t0 = time.monotonic()
        while not port_file.is_file() or len(port_file.read_text().splitlines()) < 2:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with code {self.proc.returncode} before opening DevTools")
            if time.monotonic() - t0 > self.timeout:
                raise CDPError("chromium did not open its DevTools port in time")
            time.sleep(0.05)
        self.port = int(port_file.read_text().splitlines()[0])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _page_ws(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise CDPError("no page target in chromium")
        return pages[0]["webSocketDebuggerUrl"]

    def load(self, url: str, *, screenshot: Optional[str | Path] = None, full_page: bool = True,
             element: Optional[str] = None, height: int = 16000) -> dict:
        """Navigate to ``url``; return console errors, exceptions, failed requests and image checks.
        With ``element`` (a CSS selector) the screenshot starts at that element's top."""
        from websockets.sync.client import connect

        ws = connect(self._page_ws(), max_size=256 * 1024 * 1024, open_timeout=self.timeout)
        msg_id = 0
        events: list[dict] = []

        def send(method: str, params: Optional[dict] = None) -> dict:
            nonlocal msg_id
            msg_id += 1
            my = msg_id
            ws.send(json.dumps({"id": my, "method": method, "params": params or {}}))
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"timeout waiting for {method}")
                msg = json.loads(ws.recv(timeout=left))
                if msg.get("id") == my:
                    if "error" in msg:
                        raise CDPError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
                events.append(msg)

        def wait_event(name: str) -> dict:
            for ev in events:
                if ev.get("method") == name:
                    return ev
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"timeout waiting for event {name}")
                msg = json.loads(ws.recv(timeout=left))
                events.append(msg)
                if msg.get("method") == name:
                    return msg

        try:
            for dom in ("Page", "Runtime", "Log", "Network"):
                send(f"{dom}.enable")
            send("Emulation.setDeviceMetricsOverride",
                 {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
            send("Page.navigate", {"url": url})
            wait_event("Page.loadEventFired")
            # let lazy work settle: wait until every image is complete
            for _ in range(100):
                done = send("Runtime.evaluate", {"expression": "Array.from(document.images).every(i => i.complete)",
                                                 "returnByValue": True})["result"]["value"]
                if done:
                    break
                time.sleep(0.05)
            info = send("Runtime.evaluate", {"returnByValue": True, "expression": """(() => ({
                images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), w: i.naturalWidth,
                                                                 h: i.naturalHeight})),
                title: document.title,
                svgs: document.querySelectorAll('svg').length,
                sections: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
                external: Array.from(document.querySelectorAll('[src],[href]')).map(
                    x => x.getAttribute('src') || x.getAttribute('href')).filter(u => /^(https?:)?\\/\\//.test(u)),
                height: document.documentElement.scrollHeight,
                // drawing that spills out of its chart (e.g. a line above a capped y axis, over the cards)
                spill: Array.from(document.querySelectorAll('svg')).flatMap((svg, i) => {
                    const b = svg.getBoundingClientRect();
                    return Array.from(svg.querySelectorAll('path,polyline,line,circle,rect,text,use')).filter(el => {
                        const r = el.getBoundingClientRect();
                        return r.width + r.height > 0 && (r.left < b.left - 2 || r.right > b.right + 2 ||
                                                          r.top < b.top - 2 || r.bottom > b.bottom + 2);
                    }).map(el => `svg ${i} (${svg.getAttribute('aria-label')}): <${el.tagName}>`);
                }),
            }))()"""})["result"]["value"]
            if screenshot is not None:
                params = {"format": "png"}
                if full_page:
                    top = 0
                    if element is not None:
                        top = int(send("Runtime.evaluate", {"returnByValue": True, "expression":
                                       f"document.querySelector({json.dumps(element)}).getBoundingClientRect().top"
                                       " + window.scrollY"})["result"]["value"])
                    h = min(int(info["height"]) - top, height)
                    params.update(captureBeyondViewport=True,
                                  clip={"x": 0, "y": top, "width": self.width, "height": h, "scale": 1})
                data = send("Page.captureScreenshot", params)["data"]
                Path(screenshot).write_bytes(base64.b64decode(data))
            # drain what arrived meanwhile
            while True:
                try:
                    events.append(json.loads(ws.recv(timeout=0.2)))
                except TimeoutError:
                    break
        finally:
            ws.close()
        console_errors = []
        for ev in events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                console_errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                console_errors.append(f'{p["entry"].get("source")}: {p["entry"].get("text")} {p["entry"].get("url", "")}')
        failed = [p.get("errorText") for ev in events if ev.get("method") == "Network.loadingFailed"
                  for p in [ev.get("params", {})]]
        requests = [ev["params"]["request"]["url"] for ev in events if ev.get("method") == "Network.requestWillBeSent"]
        return {**info, "console_errors": console_errors, "failed_requests": failed, "requests": requests}
