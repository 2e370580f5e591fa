"""The browser-test harness: ``qviz serve`` in a subprocess, chromium, request recording,
Panel slider moves and the page's CKA data fingerprint (test-only; the app knows none of it)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from qviz.report import CHROMIUM_ARGS, find_chromium

REPO = Path(__file__).resolve().parents[2]

JS_CKA_FINGERPRINT = """() => {
  if (!window.Bokeh) return null;
  for (const doc of Bokeh.documents) {
    const src = doc.get_model_by_name('qviz_cka');
    if (!src) continue;
    const data = src.data;
    const col = data instanceof Map ? data.get('cka') : data['cka'];
    if (!col || col.length === 0) return null;
    let s = 0;
    for (let i = 0; i < col.length; i++) s += col[i] * ((i % 7) + 1);
    return col.length + ':' + s.toFixed(6);
  }
  return null;
}"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A server subprocess on 127.0.0.1 (``qviz serve``, JupyterLab, Voila); a context manager
    giving ``url``. ``REPO`` is put first on PYTHONPATH and HF_HUB_OFFLINE set. It waits until
    ``ready_url`` answers 200, or (``ready_url`` None: a GET would start a kernel) until the port
    accepts, up to ``timeout`` s; else RuntimeError with the server's output. Terminated on exit.
    """

    def __init__(
        self,
        cmd: list[str],
        port: int,
        url: str,
        ready_url: str | None = None,
        env: dict | None = None,
        cwd: str | Path | None = None,
        timeout: float = 180.0,
    ) -> None:
        self.cmd, self.port, self.url, self.ready_url = cmd, port, url, ready_url
        self.extra_env, self.cwd, self.timeout = env or {}, cwd, timeout
        self.proc = None
        self._log = None

    def _ready(self) -> bool:
        import socket
        import urllib.request

        try:
            if self.ready_url is None:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return True
            with urllib.request.urlopen(self.ready_url, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> str:
        import os
        import subprocess
        import tempfile
        import time

        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(self.extra_env)
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._ready():
                return self.url
            time.sleep(0.3)
        out = self.output()
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.cmd[2]} did not come up on {self.url}:\n{out}")

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the server printed."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-tail:]

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit); its output stays readable."""
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


class ServerProcess(LocalServer):
    """``qviz serve --model MODEL`` on a free 127.0.0.1 port, ready when its page answers."""

    def __init__(self, model: str = "smollm2-135m", timeout: float = 180.0) -> None:
        import sys

        self.model = model
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        cmd = [sys.executable, "-m", "qviz.cli", "serve", "--model", model, "--port", str(port)]
        super().__init__(cmd, port, url, ready_url=url, timeout=timeout)


LOCAL_HOSTS = ("127.0.0.1", "localhost")
TIMEOUT_MS = 240_000  # a cold compare on a busy 2-core machine; never a performance claim


def chromium_or_skip() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium not found: run `apt-get install -y chromium` (make test does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return exe


class PageRecorder:
    """Routes every request of a page: local ones go through, others are aborted and recorded.

    Also records console errors and uncaught page errors.
    """

    def __init__(self, page) -> None:
        self.outside: list[str] = []
        self.errors: list[str] = []
        page.route("**/*", self._route)
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.errors.append(f"pageerror: {err}"))

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def _console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")


def launch(playwright, exe: str):
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)


def cka_fingerprint(page) -> str | None:
    return page.evaluate(JS_CKA_FINGERPRINT)


def wait_cka_change(page, before: str | None) -> str:
    """Wait until the CKA source in the page holds data different from ``before``."""
    page.wait_for_function(
        f"(before) => {{ const f = ({JS_CKA_FINGERPRINT})(); return f !== null && f !== before }}",
        arg=before,
        timeout=TIMEOUT_MS,
    )
    return cka_fingerprint(page)


def press_slider(page, key: str, times: int = 1, selector: str = ".qviz-bits .noUi-handle"):
    handle = page.locator(selector).first
    handle.focus()
    for _ in range(times):
        handle.press(key)


def plan_text(page) -> str:
    return page.locator(".qviz-plan").first.inner_text()


def wait_plan(page, bits: int) -> None:
    """Wait until the verdict card shows a result for a uniform ``bits``-bit plan."""
    from playwright.sync_api import expect

    expect(page.locator(".qviz-plan").first).to_contain_text(f"rtn{bits}-", timeout=TIMEOUT_MS)
