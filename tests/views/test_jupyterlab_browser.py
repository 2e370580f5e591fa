"""JupyterLab 4 on notebooks/dashboard.ipynb in chromium: runs, renders and updates offline."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.views.browser import (
    JS_CKA_FINGERPRINT,
    TIMEOUT_MS,
    LocalServer,
    PageRecorder,
    chromium_or_skip,
    cka_fingerprint,
    free_port,
    launch,
    press_slider,
    wait_cka_change,
    wait_plan,
)

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "dashboard.ipynb"
# Appended to the notebook, as notebook 01 does: under "run all" the kernel is busy with this
# cell while the page renders the dashboard, so every update of the 3-bit compare reaches the
# page before the kernel could answer a comm request (those updates were lost, issue 12).
BUSY_CELL = "dashboard.state.bits = 3\nassert dashboard.controller.wait(None)"
# JupyterLab's own settings for this throw-away server: no news or update checks, no pop-up
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
JS_KERNEL_STATUS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null;
}"""


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab on a free 127.0.0.1 port, token off, a temp root holding the notebook."""
    chromium_or_skip()
    pytest.importorskip("jupyterlab")
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "root"
    root.mkdir()
    nb = json.loads(NOTEBOOK.read_text())
    cell = {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": []}
    nb["cells"].append({**cell, "source": BUSY_CELL})
    (root / NOTEBOOK.name).write_text(json.dumps(nb))
    settings = tmp / "settings"
    for name, values in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
    )
    port = free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root"]
    cmd += ["--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", f"--ServerApp.root_dir={root}"]
    cmd += ["--IdentityProvider.token=", "--ServerApp.password="]
    # window.jupyterapp lets the test run the notebook's cells as the Run menu would
    cmd += [
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]
    url = f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}"
    server = LocalServer(cmd, port, url, env=env, cwd=root, timeout=120)
    with server:
        yield url, tmp
        server.stop()
        log = server.output(tail=10**6)
    assert "Traceback" not in log, f"jupyterlab logged an exception:\n{log[-4000:]}"


def _start_kernel(page) -> None:
    """Wait until the notebook's kernel is idle (accepting the kernel dialog if it asks)."""
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=TIMEOUT_MS)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
        if page.evaluate(JS_KERNEL_STATUS) == "idle":
            return
        page.wait_for_timeout(500)
    pytest.fail("the notebook's kernel never became idle")


def _screenshot(page, path: Path) -> None:
    from PIL import Image

    png = page.screenshot()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    path.write_bytes(png)
    print(f"screenshot: {path}")


def test_jupyterlab_runs_dashboard_and_updates_offline(lab_server):
    url, tmp = lab_server
    exe = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, exe)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            rec = PageRecorder(page)
            page.goto(url, timeout=TIMEOUT_MS)
            _start_kernel(page)
            t0 = time.monotonic()
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells') }")
            page.wait_for_function(f"() => ({JS_CKA_FINGERPRINT})() !== null", timeout=TIMEOUT_MS)
            wait_plan(page, 3)
            print(f"JupyterLab: run all -> first CKA map {time.monotonic() - t0:.1f} s")
            before = cka_fingerprint(page)
            assert before is not None and not before.startswith("0:")
            page.locator(".qviz-plan").first.scroll_into_view_if_needed()
            _screenshot(page, tmp / "jupyterlab-3bit.png")
            press_slider(page, "ArrowLeft")  # 3 -> 2 bits, from the keyboard
            wait_plan(page, 2)
            assert wait_cka_change(page, before) != before
            assert "computation collapse" in page.locator(".qviz-verdict-mode").first.inner_text()
            _screenshot(page, tmp / "jupyterlab-2bit.png")
            assert rec.outside == [], f"requests left 127.0.0.1: {rec.outside}"
            assert rec.errors == [], rec.errors
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("kernel", "env", "expected"),
    [
        (True, {}, {"comms": "ipywidgets", "inline": True}),  # JupyterLab, Notebook 7, Voila
        (True, {"VSCODE_PID": "1"}, {"inline": True}),  # Panel picks VS Code's comms itself
        (False, {}, {}),  # panel serve, scripts
    ],
)
def test_extension_picks_widget_comms_in_any_jupyter_kernel(monkeypatch, kernel, env, expected):
    import panel as pn

    from qviz.views import dashboard

    calls = []
    monkeypatch.setattr(dashboard, "is_notebook_comm", lambda: kernel)
    monkeypatch.setattr(pn, "extension", lambda *a, **kw: calls.append(kw))
    for key in ("VSCODE_PID", "VSCODE_CWD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dashboard.extension()
    assert calls == [expected]
