"""`qviz serve` with two models in a real browser (Debian chromium), fully offline: one session
switches to gemma3-270m while another, on smollm2-135m, keeps getting new data; the sweep tab
shows a results file and says what is wrong with a corrupt one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.views import test_serve_browser as _serve
from tests.views.browser import (
    JS_CKA_FINGERPRINT,
    TIMEOUT_MS,
    PageRecorder,
    cka_fingerprint,
    press_slider,
    wait_cka_change,
    wait_plan,
)

server, chrome = _serve.server, _serve.chrome  # the same fixtures: smollm2-135m served, chromium

pytestmark = pytest.mark.model
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard_models.png"
JS_SWEEP_CELLS = """() => Bokeh.documents.some(d => {
  const s = d.get_model_by_name('qviz_sweep_rtn');
  if (!s) return false;
  const v = s.data instanceof Map ? s.data.get('verdict') : s.data['verdict'];
  return v && v.length === 4;
})"""


def wait_fingerprint(page, condition: str) -> str:
    """The page's CKA fingerprint ``f`` once ``condition`` holds; right after a model switch
    the old dashboard's sources can linger in the page's document a moment (two models named
    qviz_cka: the lookup throws), so that counts as not yet."""
    safe = f"(() => {{ try {{ return ({JS_CKA_FINGERPRINT})(); }} catch (e) {{ return 'dup'; }} }})"
    page.wait_for_function(f"() => (f => f !== 'dup' && {condition})({safe}())", timeout=TIMEOUT_MS)
    return page.evaluate(safe)


def _open(chrome, url, bits: int | None = 4):
    page = chrome.new_page(viewport={"width": 1400, "height": 1100})
    rec = PageRecorder(page)
    page.goto(url)
    if bits is not None:
        wait_plan(page, bits)
    return page, rec


def test_a_session_switches_model_while_another_keeps_working(server, chrome):
    from playwright.sync_api import expect

    a, rec_a = _open(chrome, server)
    b, rec_b = _open(chrome, server)
    smol = cka_fingerprint(a)
    press_slider(b, "ArrowRight")  # b: 5 bits, kept across the switch
    wait_plan(b, 5)
    b.locator(".qviz-model select").select_option("gemma3-270m")
    before = cka_fingerprint(a)
    a.bring_to_front()  # a hidden tab's timers are throttled; a user moves the visible one
    press_slider(a, "ArrowLeft")  # a (smollm2) moves on while b's model loads
    wait_plan(a, 3)
    assert wait_cka_change(a, before) != before
    assert "smollm2-135m" in a.locator(".qviz-model select").input_value()
    # b: the new model's dashboard, its settings kept, nothing of smollm2 shown as current
    b.bring_to_front()
    status = b.locator(".qviz-model-status").first
    expect(status).to_contain_text("gemma3-270m: 18 layers, loaded in", timeout=TIMEOUT_MS)
    wait_plan(b, 5)
    size = smol.split(":")[0] + ":"
    gemma = wait_fingerprint(b, f"f !== null && !f.startsWith('{size}')")  # another depth
    expect(b.locator(".qviz-stale")).to_have_count(0, timeout=TIMEOUT_MS)
    assert "gemma3-270m" in b.locator("h2").first.inner_text()
    expect(b.locator(".qviz-busy").first).to_be_hidden(timeout=TIMEOUT_MS)
    png = b.screenshot(full_page=True)
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(png)
    # back to smollm2 (still resident: no load), the 5 bits still set
    b.locator(".qviz-model select").select_option("smollm2-135m")
    expect(b.locator("h2").first).to_contain_text("smollm2-135m", timeout=TIMEOUT_MS)
    wait_plan(b, 5)
    assert wait_fingerprint(b, f"f !== null && f.startsWith('{size}')") != gemma
    for rec in (rec_a, rec_b):
        assert rec.outside == [], f"requests left 127.0.0.1: {rec.outside}"
        assert rec.errors == [], rec.errors
    a.close()
    b.close()


def test_the_sweep_tab_shows_a_results_file_and_a_corrupt_one_is_a_message(
    server, chrome, tmp_path
):
    from playwright.sync_api import expect

    rows = [
        dict(model="smollm2-135m", method="rtn", bits=b, group_size=g, plan="uniform",
             plan_label=f"rtn{b}-g{g}", verdict=v, mib=m, perplexity=p, error=None)
        for b, g, v, m, p in [
            (2, 32, "computation collapse", 60.0, 900.0), (2, 128, "computation collapse", 55.0,
            2000.0), (8, 32, "healthy", 140.0, 20.1), (8, 128, "healthy", 135.0, 20.3),
        ]
    ]  # fmt: skip
    good = tmp_path / "sweep.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    page, rec = _open(chrome, server, bits=None)
    page.locator(".bk-tab", has_text="Sweep results").first.click()
    path = page.locator(".qviz-sweep-path input").first
    path.fill(str(good))
    path.press("Enter")
    expect(page.locator(".qviz-sweep-summary").first).to_contain_text(
        "sweep.jsonl: 4 cells (0 errors)", timeout=TIMEOUT_MS
    )
    page.wait_for_function(JS_SWEEP_CELLS, timeout=TIMEOUT_MS)
    path.fill(str(bad))
    page.get_by_role("button", name="Load").click()
    expect(page.locator(".qviz-sweep-error").first).to_contain_text(
        "line 2 is not JSON", timeout=TIMEOUT_MS
    )
    assert page.locator(".qviz-sweep-summary").count() == 0
    assert rec.outside == [] and rec.errors == [], (rec.outside, rec.errors)
    page.close()
