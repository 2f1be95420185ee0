"""Headless Chromium, driven by the DevTools protocol over a pipe: enough of a browser for the explorer's test and benchmark
(tests/test_explorer.py, benchmarks/explorer.py).

Chromium started with --remote-debugging-pipe reads protocol commands (JSON, each ended by a NUL byte) on
its file descriptor 3 and writes answers and events on descriptor 4. That needs no WebSocket library and
no browser download: the system's Chromium (Debian's ``chromium``) is all it takes.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# JavaScript that resolves, once the explorer page's networks are loaded, to its window.explorer.stats
EXPLORER_READY = ("new Promise((resolve, reject) => { const look = () => window.explorer ? "
                  "explorer.ready.then(() => resolve(explorer.stats), reject) : setTimeout(look, 50); look(); })")


def find_chromium():
    """The path of a Chromium on PATH (or $CHROMIUM), or None."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.path.exists(named) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page: open(url), evaluate(expression), screenshot(), close()."""

    def __init__(self, executable, width=1000, height=1400, timeout=120):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="explorer-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # copies far above 4, so that moving them onto 3 and 4 in the child cannot overwrite one another
        keep_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        keep_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)

        def onto_3_and_4():
            os.dup2(keep_r, 3)
            os.dup2(keep_w, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=onto_3_and_4, pass_fds=(3, 4))
        for fd in (to_browser_r, from_browser_w, keep_r, keep_w):
            os.close(fd)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = os.fdopen(from_browser_r, "rb", buffering=0)
        self._next_id = 0
        self._answers, self._waiting = {}, {}
        self._lock = threading.Lock()
        self.requests, self.console, self.errors = [], [], []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def _read(self):
        buffer = b""
        while True:
            chunk = self._in.read(1 << 16)
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._answers[message["id"]] = message
                        event = self._waiting.pop(message["id"], None)
                    if event:
                        event.set()
                else:
                    self._event(message)
        with self._lock:  # the browser is gone: wake everyone who waits
            for event in self._waiting.values():
                event.set()

    def _event(self, message):
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))

    def send(self, method, **params):
        """Send one protocol command to the page (or to the browser before attaching) and return its result."""
        with self._lock:
            self._next_id += 1
            number = self._next_id
            event = self._waiting[number] = threading.Event()
        message = {"id": number, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self._out.write(json.dumps(message).encode() + b"\0")
        if not event.wait(self.timeout):
            raise BrowserError(f"{method}: no answer in {self.timeout} s")
        with self._lock:
            answer = self._answers.pop(number, None)
        if answer is None:
            raise BrowserError(f"{method}: the browser closed (exit status {self.process.poll()})")
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def open(self, url):
        self.send("Page.navigate", url=url)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page, awaited if it is a Promise; BrowserError on a throw."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def screenshot(self, path):
        """A PNG of the whole page, written to ``path``."""
        metrics = self.send("Page.getLayoutMetrics")["cssContentSize"]
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self):
        try:
            self._out.close()
        except OSError:
            pass
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
