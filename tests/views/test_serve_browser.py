"""`qviz serve` in a real browser (Debian chromium through Playwright), fully offline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from tests.views.browser import (
    TIMEOUT_MS,
    PageRecorder,
    ServerProcess,
    chromium_or_skip,
    cka_fingerprint,
    launch,
    press_slider,
    wait_cka_change,
    wait_plan,
)

pytestmark = pytest.mark.model
JS_PATCH_FILLED = """() => Bokeh.documents.some(d => {
  const s = d.get_model_by_name('qviz_patch');
  if (!s) return false;
  const v = s.data instanceof Map ? s.data.get('value') : s.data['value'];
  return v && v.length > 0;
})"""
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
SIDE_BY_SIDE = SCREENSHOT.with_name("dashboard_side_by_side.png")
JS_CKA_PAIR = """() => Bokeh.documents.flatMap(d => ['qviz_cka', 'qviz_cka_b'].map(name => {
  const src = [...d.all_models].find(m => m.name === name);
  if (!src) return null;
  const col = src.data instanceof Map ? src.data.get('cka') : src.data['cka'];
  if (!col || col.length === 0) return null;
  let s = 0;
  for (let i = 0; i < col.length; i++) s += col[i] * ((i % 7) + 1);
  return col.length + ':' + s.toFixed(6);
}))"""


@pytest.fixture(scope="module")
def server():
    chromium_or_skip()
    srv = ServerProcess("smollm2-135m")
    with srv as url:
        yield url
        log = srv.output(tail=200_000)
    assert "Traceback" not in log, f"the server logged an exception:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def chrome():
    exe = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p, exe)
        yield b
        b.close()


def _open(chrome, url):
    page = chrome.new_page(viewport={"width": 1400, "height": 1100})
    rec = PageRecorder(page)
    page.goto(url)
    wait_plan(page, 4)
    return page, rec


def test_serve_loads_offline_and_slider_updates_in_place(server, chrome):
    from playwright.sync_api import expect

    page, rec = _open(chrome, server)
    before = cka_fingerprint(page)
    assert before is not None
    mode = page.locator(".qviz-verdict-mode").first
    mode_before = mode.inner_text()
    press_slider(page, "ArrowLeft", 2)  # 4 -> 2 bits
    wait_plan(page, 2)
    after = wait_cka_change(page, before)
    assert after != before
    expect(mode).not_to_have_text(mode_before)
    # (a first look may show first: "verdict computing ...", then the verdict)
    expect(mode).to_contain_text("collapse", timeout=TIMEOUT_MS)
    # an error shows in the app, and the app keeps working
    target = page.locator("input.bk-input").nth(1)
    target.fill(" Paris is")
    target.press("Enter")
    expect(page.locator(".qviz-error-text").first).to_contain_text(
        "exactly one token", timeout=60_000
    )
    target.fill(" Paris")
    target.press("Enter")
    expect(page.locator(".qviz-error-text").first).to_be_hidden(timeout=60_000)
    # a tracing sweep runs in the background and fills the patching heatmap
    page.get_by_role("button", name="Run causal tracing").click()
    page.wait_for_function(JS_PATCH_FILLED, timeout=TIMEOUT_MS)
    png = page.screenshot(full_page=True)
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(png)
    assert rec.outside == [], f"requests left 127.0.0.1: {rec.outside}"
    assert rec.errors == [], rec.errors
    page.close()


def test_two_sessions_keep_their_own_settings(server, chrome):
    a, rec_a = _open(chrome, server)
    b, rec_b = _open(chrome, server)
    for page, key, bits in ((a, "ArrowLeft", 3), (b, "ArrowRight", 5)) * 1 + (
        (a, "ArrowLeft", 2),
        (b, "ArrowRight", 6),
    ):
        press_slider(page, key)
        wait_plan(page, bits)
    wait_plan(a, 2)
    wait_plan(b, 6)
    assert "rtn2-" in a.locator(".qviz-plan").first.inner_text()
    assert "rtn6-" in b.locator(".qviz-plan").first.inner_text()
    assert rec_a.errors == [] and rec_b.errors == []
    a.close()
    b.close()


def _slider_value(page) -> int:
    return int(float(page.locator(".qviz-bits .noUi-handle").first.get_attribute("aria-valuenow")))


def test_fast_key_presses_under_load_end_where_the_last_press_asked(server, chrome, tmp_path):
    """The slider never snaps back: after quick presses on a loaded machine, the slider, the
    state (the status and verdict card) and the data shown all agree with the last press."""
    import subprocess
    import sys

    page, rec = _open(chrome, server)
    from playwright.sync_api import expect

    press_slider(page, "ArrowLeft")  # 4 -> 3: the 3-bit data's fingerprint, for reference
    wait_plan(page, 3)
    # the whole result, not the first look (the prompt's views, the CKA map still computing)
    expect(page.locator(".qviz-busy").first).to_be_hidden(timeout=TIMEOUT_MS)
    fp3 = cka_fingerprint(page)
    press_slider(page, "ArrowRight")
    wait_plan(page, 4)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        handle = page.locator(".qviz-bits .noUi-handle").first
        handle.focus()
        keys = ["ArrowRight"] * 3 + ["ArrowLeft"] * 4 + ["ArrowRight"] * 2 + ["ArrowLeft"] * 2
        for key in keys:  # 4 -> 7 -> 3 -> 5 -> 3, no waiting between presses
            handle.press(key)
        assert _slider_value(page) == 3
        wait_plan(page, 3)
        status = page.locator(".qviz-status").first
        expect(status).to_contain_text("showing rtn3-g128", timeout=TIMEOUT_MS)
        expect(page.locator(".qviz-busy").first).to_be_hidden(timeout=TIMEOUT_MS)
    finally:
        burner.kill()
        burner.wait()
    assert _slider_value(page) == 3, "the slider snapped back"
    assert page.locator(".qviz-bits .bk-slider-value").first.inner_text().strip() == "3"
    assert "rtn3-g128" in page.locator(".qviz-plan").first.inner_text()
    assert cka_fingerprint(page) == fp3
    assert page.locator(".qviz-stale").count() == 0
    assert rec.errors == [], rec.errors
    page.close()


def test_a_second_plan_shows_two_cka_maps_side_by_side(server, chrome):
    """Picking a second method (here RTN at 2 bits beside the 4-bit default) shows a second CKA
    map with its own data, both verdicts, offline and without console errors."""
    from playwright.sync_api import expect

    page, rec = _open(chrome, server)
    page.set_viewport_size({"width": 1900, "height": 1300})
    assert page.evaluate(JS_CKA_PAIR)[1] is None  # off by default: one map
    page.locator(".qviz-bits2 select").first.select_option(label="2")
    page.locator(".qviz-method2 select").first.select_option(label="rtn")
    page.wait_for_function(
        f"() => {{ const f = ({JS_CKA_PAIR})(); return f[0] && f[1] && f[0] !== f[1] }}",
        timeout=TIMEOUT_MS,
    )
    a, b = page.evaluate(JS_CKA_PAIR)
    assert a != b and a.split(":")[0] == b.split(":")[0]  # same size, different data
    plans = page.locator(".qviz-plan")
    expect(plans).to_have_count(2, timeout=TIMEOUT_MS)
    assert "rtn4-" in plans.nth(0).inner_text() and "rtn2-" in plans.nth(1).inner_text()
    expect(page.locator(".qviz-status").first).to_contain_text("beside", timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)  # the last layout pass
    png = page.screenshot(full_page=True)
    SIDE_BY_SIDE.parent.mkdir(exist_ok=True)
    SIDE_BY_SIDE.write_bytes(png)
    page.locator(".qviz-method2 select").first.select_option(label="none")
    expect(plans).to_have_count(1, timeout=TIMEOUT_MS)
    assert rec.outside == [], f"requests left 127.0.0.1: {rec.outside}"
    assert rec.errors == [], rec.errors
    page.close()
