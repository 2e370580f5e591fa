"""The dashboard in chromium: slider move -> new data in the page."""

from __future__ import annotations

import statistics
import time


def bench_ui(model_name: str = "smollm2-135m", moves: int = 20) -> dict:
    """In chromium: slider move (key press) -> new CKA data in the page, for cached plans."""
    from playwright.sync_api import sync_playwright

    from qviz.report import CHROMIUM_ARGS, find_chromium

    try:  # the browser harness lives with the tests (a source checkout), not in the package
        from tests.views.browser import JS_CKA_FINGERPRINT, ServerProcess
    except ImportError as err:
        raise SystemExit(
            "qviz bench ui drives the served app with the test suite's browser harness: run it "
            "from a source checkout of qviz (the folder holding tests/)"
        ) from err

    exe = find_chromium()
    if exe is None:
        print("qviz bench ui: needs chromium (apt-get install -y chromium); not run")
        return {"ratio": None, "skipped": "no chromium"}
    watch = (
        "() => { window.__qv = {key: null, data: null};"
        " window.addEventListener('keydown', () => { window.__qv.key = performance.now();"
        " window.__qv.data = null }, true);"
        " for (const doc of Bokeh.documents) { const s = doc.get_model_by_name('qviz_cka');"
        " if (s) s.properties.data.change.connect(() => {"
        " if (window.__qv.data === null) window.__qv.data = performance.now() }) } }"
    )
    changed = f"(b) => {{ const f = ({JS_CKA_FINGERPRINT})(); return f !== null && f !== b }}"

    def move(page, key: str) -> float:
        before = page.evaluate(JS_CKA_FINGERPRINT)
        page.locator(".qviz-bits .noUi-handle").first.press(key)
        page.wait_for_function(changed, arg=before, timeout=600_000)
        page.wait_for_function("() => window.__qv.data !== null", timeout=10_000)
        return page.evaluate("() => window.__qv.data - window.__qv.key")

    with ServerProcess(model_name) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_function(f"() => ({JS_CKA_FINGERPRINT})() !== null", timeout=600_000)
        page.evaluate(watch)
        page.locator(".qviz-bits .noUi-handle").first.focus()
        t = time.perf_counter()
        cold = [move(page, "ArrowLeft") for _ in range(2)]  # 4 -> 3 -> 2: first visits
        cold += [move(page, "ArrowRight") for _ in range(6)]  # 2 -> 8 (3, 4 cached)
        cold += [move(page, "ArrowLeft") for _ in range(4)]  # back to 4, all cached
        warm_s = time.perf_counter() - t
        times = [move(page, "ArrowLeft" if i % 2 == 0 else "ArrowRight") for i in range(moves)]
        browser.close()
    med = statistics.median(times)
    print(f"qviz bench ui: {model_name}, panel serve + chromium on this machine, {moves} moves")
    print(
        f"  warm-up over bits 2..8 (first visits compute compare + materialize): {warm_s:.1f} s;"
        f" first visit of 2-bit {cold[1]:.0f} ms"
    )
    print(
        f"  key press -> new CKA data in the page, cached plan: median {med:.0f} ms "
        f"(min {min(times):.0f}, max {max(times):.0f}) | target <= 300 ms | "
        f"ratio to target {med / 300:.2f}x"
    )
    return {
        "ratio": med / 300,
        "ratio_of": "median cached slider move / 300 ms target",
        "median_ms": med,
        "warm_up_s": warm_s,
    }


def bench_ui_uncached(model_name: str = "smollm2-135m", moves: int = 8) -> dict:
    """Uncached slider moves, the server's side of each (what the page waits for): a plan never
    seen before, materialized then compared with the dashboard's settings (``cka_context``), the
    reference already cached as after the first page load. Then the same moves with each plan
    prefetched while idle (``Lab.prefetch``, as the dashboard would for the neighbouring
    bit-widths). Target: median <= 1 s."""
    from qviz import Lab, QuantConfig, QuantPlan
    from qviz.lab import CKA_CONTEXT

    lab = Lab.load(model_name)
    prompt, target = "The Eiffel Tower is located in the city of", " Paris"
    fresh = [
        QuantPlan.uniform(QuantConfig(bits=b, group_size=g, symmetric=s))
        for s in (False, True)
        for g in (64, 32)
        for b in (2, 3, 5, 6, 8)
    ]
    print(f"qviz bench ui --uncached: {model_name}, {moves} slider moves to plans never seen")
    return uncached_figures(lab, prompt, target, fresh[: 2 * moves], CKA_CONTEXT)


def uncached_figures(lab, prompt: str, target, plans: list, cka_context: int) -> dict:
    """``bench_ui_uncached``'s figures on any Lab: the first half of ``plans`` cold, the second
    half each prefetched first (printed, and returned JSON-ready)."""
    from qviz import QuantConfig, QuantPlan

    lab.compare(prompt, target, QuantPlan.uniform(QuantConfig(bits=4)), cka_context=cka_context)

    def move(plan: QuantPlan) -> tuple[float, float]:
        t = time.perf_counter()
        lab.prepare(plan)
        t_mat = time.perf_counter() - t
        lab.compare(prompt, target, plan, cka_context=cka_context)
        return time.perf_counter() - t, t_mat

    half = len(plans) // 2
    cold = [move(p) for p in plans[:half]]
    warm = []
    for p in plans[half:]:
        lab.prefetch([p]).join()  # the idle time before the move
        warm.append(move(p))
    med = statistics.median(t for t, _ in cold)
    med_mat = statistics.median(m for _, m in cold)
    med_warm = statistics.median(t for t, _ in warm)
    print(
        f"  new plan -> materialize + compare(cka_context={cka_context}): median "
        f"{med * 1e3:.0f} ms (materialize {med_mat * 1e3:.0f} ms; min "
        f"{min(t for t, _ in cold) * 1e3:.0f}, max {max(t for t, _ in cold) * 1e3:.0f}) | "
        f"target <= 1000 ms | ratio to target {med:.2f}x"
    )
    print(f"  the same moves with the plan prefetched while idle: median {med_warm * 1e3:.0f} ms")
    return {
        "ratio": med,
        "ratio_of": "median uncached slider move / 1 s target",
        "median_ms": med * 1e3,
        "materialize_ms": med_mat * 1e3,
        "prefetched_median_ms": med_warm * 1e3,
        "moves": half,
    }
