"""Shared pieces of the browser tests: chromium, request recording, Panel slider moves."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from qviz.app import CHROMIUM_ARGS, JS_CKA_FINGERPRINT, find_chromium

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
