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
        " const d = s.data instanceof Map ? s.data.get('cka') : s.data['cka'];"
        " if (window.__qv.data === null && !Array.prototype.some.call(d, Number.isNaN))"
        " window.__qv.data = performance.now() }) } }"
    )  # a first look's CKA map (NaN while the context runs) is not the new data
    changed = (
        f"(b) => {{ const f = ({JS_CKA_FINGERPRINT})();"
        " return f !== null && f !== b && !f.includes('NaN') }"
    )

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


def bench_ui_uncached(model_name: str = "smollm2-135m", moves: int = 6) -> dict:
    """Uncached slider moves, the server's side of each (what the page waits for), through the
    dashboard's own Controller and figure views (every view's data built, as in the page), with
    the reference already cached as after the first page load. Target: median <= 1 s."""
    from qviz import Lab

    lab = Lab.load(model_name)
    prompt, target = "The Eiffel Tower is located in the city of", " Paris"
    print(f"qviz bench ui --uncached: {model_name}, moves through the dashboard's Controller")
    return uncached_figures(lab, prompt, target, moves=moves)


class _Clock:
    """The Controller's dispatch (run now, on the worker thread) that notes when the state
    first shows each (plan label, first look?) after ``start``."""

    def __init__(self) -> None:
        self.state = None
        self.seen: dict[tuple[str, bool], float] = {}
        self.t0 = 0.0

    def start(self) -> None:
        self.seen.clear()
        self.t0 = time.perf_counter()

    def __call__(self, fn) -> None:
        from qviz.views.backend import is_first_look

        fn()
        c = self.state.comparison
        if c is not None:
            self.seen.setdefault((c.plan_label, is_first_look(c)), time.perf_counter() - self.t0)


def uncached_figures(
    lab, prompt: str, target: str, moves: int = 6, groups: tuple = (64, 32, 128, None)
) -> dict:
    """``bench_ui_uncached``'s figures on any Lab (printed, and returned JSON-ready), each move
    a change of the dashboard's settings timed until the views hold the new data:

    - cold: ``moves`` moves to plans never seen and never prefetched (prefetch off): the first
      paint (the prompt's views: lens, attention, FFN, residual) and the whole result (the CKA
      map pooled with the context prompts, the isolation test and the verdict);
    - prefetched: ``moves`` one-bit steps, each after the idle prefetch of the neighbours
      finished (its time is printed: the pause a user needs for it);
    - interrupted: moves to unseen plans made while a prefetch is running (what prefetching
      costs a user who moves elsewhere at once).
    """
    import os
    import statistics as st

    from qviz.views.backend import CKA_CONTEXT, Backend, plan_for
    from qviz.views.components import figure_views
    from qviz.views.session import Controller
    from qviz.views.state import DashboardState

    clock = _Clock()
    state = DashboardState(
        model=str(lab.name), prompt=prompt, target=target, bits=4, group_size=groups[0]
    )
    clock.state = state
    prepare, mat = lab.prepare, []

    def timed_prepare(*a, **kw):
        t = time.perf_counter()
        prepare(*a, **kw)
        mat.append(time.perf_counter() - t)

    lab.prepare = timed_prepare  # the materialize part of each move
    ctl = Controller(Backend(lab), state, dispatch=clock)
    views = figure_views(state)  # noqa: F841 - every view redraws on each result, as in a page
    old = os.environ.get("QVIZ_PREFETCH")
    try:
        os.environ["QVIZ_PREFETCH"] = "0"
        ctl.start()
        ctl.wait(None)  # the first page load: reference, 4-bit plan and context cached
        mat.clear()

        def move(**settings) -> tuple[float, float | None]:
            clock.start()
            state.param.update(**settings)
            ctl.wait(None, prefetch=False)
            label = state.plan().label
            if state.comparison.plan_label != label or state.error:
                raise RuntimeError(f"the move to {label} ended with: {state.error}")
            return clock.seen[(label, False)], clock.seen.get((label, True))

        # prefetch off: bit-width moves to plans never seen, on a new group size or symmetry
        # (its first move changes that setting too, as a user would)
        combos = [(g, s) for s in (True, False) for g in groups if (g, s) != (groups[0], False)]
        n_cold = -(-moves // 3)  # combos of the cold moves, three bit-widths each
        fresh = [dict(group_size=g, symmetric=s, bits=b) for g, s in combos[:n_cold]
                 for b in (3, 5, 7)][:moves]  # fmt: skip
        cold = [move(**settings) for settings in fresh]
        mat_cold = list(mat)
        left = combos[n_cold:]
        # prefetch on: one-bit steps on a new group/symmetry, each after the idle prefetch
        os.environ["QVIZ_PREFETCH"] = "1"
        move(group_size=left[0][0], symmetric=left[0][1], bits=2)
        warm, idle, hits = [], [], 0
        for bits in range(3, min(8, 2 + moves) + 1):
            t = time.perf_counter()
            ctl.prefetching.join()  # the idle pause
            idle.append(time.perf_counter() - t)
            key = Backend.compare_key(prompt, target, plan_for(state, bits))
            hits += ctl.backend.peek(key) is not None
            warm.append(move(bits=bits)[0])
        # a move to an unseen plan right after a result, while its neighbours' prefetch runs
        interrupted = []
        for g, sym in left[1:4]:
            move(group_size=g, symmetric=sym, bits=3)  # its prefetch of 2 and 4 starts
            time.sleep(0.05)
            interrupted.append(move(bits=6))
    finally:
        ctl.close()
        ctl.wait(None)
        lab.prepare = prepare
        if old is None:
            os.environ.pop("QVIZ_PREFETCH", None)
        else:
            os.environ["QVIZ_PREFETCH"] = old

    load = os.getloadavg()[0]  # 1-minute: this machine's other work during the moves
    ms = lambda xs: st.median(xs) * 1e3  # noqa: E731
    full, first = ms([f for f, _ in cold]), ms([p for _, p in cold if p is not None])
    med_mat, med_warm, med_idle = ms(mat_cold), ms(warm), ms(idle)
    med_int = ms([p if p is not None else f for f, p in interrupted]) if interrupted else None
    verdict = lambda v: "meets" if v <= 1000 else "MISSES"  # noqa: E731
    print(
        f"  never seen, never prefetched ({len(cold)} moves): first paint (lens, attention, "
        f"FFN, residual) median {first:.0f} ms; whole result (+ CKA map over "
        f"{1 + CKA_CONTEXT} prompts, isolation, verdict) median {full:.0f} ms (materialize "
        f"{med_mat:.0f} ms; min {min(f for f, _ in cold) * 1e3:.0f}, max "
        f"{max(f for f, _ in cold) * 1e3:.0f}); load average {load:.1f}"
    )
    print(
        f"  prefetched neighbour (one bit, after the idle prefetch; {len(warm)} moves): whole "
        f"result median {med_warm:.0f} ms ({hits}/{len(warm)} found prefetched); the "
        f"prefetch of both neighbours took {med_idle:.0f} ms of idle time"
    )
    if interrupted:
        print(
            f"  moving elsewhere while a prefetch runs ({len(interrupted)} moves): first "
            f"paint median {med_int:.0f} ms"
        )
    print(
        f"  target <= 1000 ms: first paint of a never-seen plan {verdict(first)}; its whole "
        f"result {verdict(full)}; a prefetched neighbour {verdict(med_warm)} | ratio "
        f"(never-seen whole result / target) {full / 1e3:.2f}x"
    )
    return {
        "ratio": full / 1e3,
        "ratio_of": "median uncached slider move (never seen, whole result) / 1 s target",
        "median_ms": full,
        "first_paint_ms": first,
        "materialize_ms": med_mat,
        "prefetched_median_ms": med_warm,
        "prefetch_idle_ms": med_idle,
        "prefetched_found": hits,
        "interrupted_first_paint_ms": med_int,
        "moves": len(cold),
        "load_average": load,
    }
