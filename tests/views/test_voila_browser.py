"""Voila on notebooks/dashboard.ipynb in chromium: renders and updates with no network."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.views.browser import (
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
# share/jupyter/voila/templates/qviz-offline: Voila's "lab" template without its Font Awesome
# CDN links (Voila's bundle holds the font). The pyviz lab extension is left out: under Voila
# the dashboard is a jupyter_bokeh widget, and that extension needs JupyterLab's document
# manager, which Voila lacks ("Shared module @jupyterlab/docmanager doesn't exist"). Voila 0.5
# reads a template's conf.json only after its settings are made, so that goes on the command line.
TEMPLATES = ROOT / "share" / "jupyter"
VOILA_ARGS = [
    "--template=qviz-offline",
    '--VoilaConfiguration.extension_denylist=["@pyviz/jupyterlab_pyviz"]',
]


@pytest.fixture(scope="module")
def voila_url():
    chromium_or_skip()
    pytest.importorskip("voila")
    port = free_port()
    jupyter_path = os.pathsep.join(p for p in (str(TEMPLATES), os.environ.get("JUPYTER_PATH")) if p)
    cmd = [sys.executable, "-m", "voila", str(NOTEBOOK), f"--port={port}", "--no-browser"]
    cmd += ["--Voila.ip=127.0.0.1", *VOILA_ARGS]
    server = LocalServer(
        cmd, port, f"http://127.0.0.1:{port}/", env={"JUPYTER_PATH": jupyter_path}, cwd=ROOT
    )
    with server as url:
        yield url


def test_voila_renders_and_updates_offline(voila_url, tmp_path):
    exe = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, exe)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            rec = PageRecorder(page)
            t0 = time.monotonic()
            page.goto(voila_url, timeout=600_000)
            wait_plan(page, 4)
            print(f"Voila: request -> first view {time.monotonic() - t0:.1f} s")
            before = cka_fingerprint(page)
            assert before is not None
            press_slider(page, "ArrowLeft", 2)
            wait_plan(page, 2)
            assert wait_cka_change(page, before) != before
            page.screenshot(path=tmp_path / "voila-2bit.png")
            print(f"screenshot: {tmp_path / 'voila-2bit.png'}")
            assert rec.outside == [], f"requests left 127.0.0.1: {rec.outside}"
            assert rec.errors == [], rec.errors
            assert "Loading weights" not in page.content()
        finally:
            browser.close()
