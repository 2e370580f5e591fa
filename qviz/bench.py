"""Benchmarks: each prints its time next to a baseline measured in the same run, and the ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _median_time(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_quant(model_name: str = "smollm2-135m") -> None:
    """Materialize uniform 2/3/4/8-bit g128 plans vs cloning the same weights; cached re-select."""
    from qviz.models import load_model
    from qviz.quant import QuantConfig, QuantPlan
    from qviz.quant.engine import QuantEngine, targets

    model, _ = load_model(model_name)
    print(
        f"qviz bench quant: {model_name}, device {model.device}, torch threads "
        f"{__import__('torch').get_num_threads()}"
    )
    for bits in (2, 3, 4, 8):
        plan = QuantPlan.uniform(QuantConfig(bits=bits, group_size=128))
        engine = QuantEngine(model)
        weights = [t.param.data for t, _ in targets(model, engine.adapter, plan)]
        floor = _median_time(lambda w=weights: [x.clone() for x in w])

        def fresh(e=engine, p=plan):
            e.clear()
            e.materialize(p)

        fresh()  # warm-up
        t = _median_time(fresh)
        n = sum(w.numel() for w in weights)
        print(
            f"  {bits}-bit g128: materialize {t * 1e3:7.1f} ms | clone floor {floor * 1e3:6.1f} ms "
            f"| ratio {t / floor:4.2f}x (target <= 1.5x) | {n / 1e6:.1f} M weights"
        )
    engine = QuantEngine(model)
    plans = [QuantPlan.uniform(QuantConfig(bits=b)) for b in (2, 4)]
    for p in plans:
        engine.materialize(p)

    def reselect():
        for p in plans:
            with engine.quantized(p):
                pass

    t = _median_time(reselect, repeat=20) / len(plans)
    base = _median_time(lambda: None, repeat=20)
    print(
        f"  re-select a cached plan (swap in + restore): {t * 1e3:.2f} ms (target <= 5 ms; "
        f"empty-call baseline {base * 1e6:.1f} us)"
    )


def bench_compare(model_name: str = "smollm2-135m") -> None:
    """A full compare() (plan cached, activations not) vs one reference + one quantized forward."""
    import torch

    from qviz import Lab, QuantConfig, QuantPlan, metrics

    lab = Lab.load(model_name)
    prompt = "The Eiffel Tower is located in the city of"
    plan = QuantPlan.uniform(QuantConfig(bits=4))
    lab.engine.materialize(plan)
    ids = lab.encode(prompt)

    def plain():
        with torch.no_grad():
            for p in (QuantPlan.none(), plan):
                with lab.quantized(p):
                    lab.model(ids, use_cache=False)

    def full():
        lab._acts.clear()
        lab.compare(prompt, " Paris", plan)

    plain()
    full()
    t_plain, t_full = _median_time(plain), _median_time(full)
    print(f"qviz bench compare: {model_name}, {ids.shape[1]} tokens, 4-bit plan cached")
    print(
        f"  compare() {t_full * 1e3:.1f} ms | 2 plain forwards {t_plain * 1e3:.1f} ms "
        f"| ratio {t_full / t_plain:.2f}x (target <= 2x)"
    )
    cap = lab.activations(prompt, plan)
    t_cka = _median_time(lambda: metrics.cka_matrix(cap.resid, cap.resid), repeat=20)
    n = cap.resid.shape[0]
    print(f"  CKA of all {n}x{n} layer pairs alone: {t_cka * 1e3:.2f} ms (target <= 10 ms)")


def bench_gptq(model_name: str = "smollm2-135m") -> None:
    """GPTQ of every decoder Linear (4-bit g128, 128 x 256 calibration tokens) in a fresh cache,
    then its load from the disk cache in a new engine; round-to-nearest as the baseline."""
    import os
    import tempfile

    from qviz.models import load_model
    from qviz.quant import QuantConfig, QuantPlan
    from qviz.quant.engine import QuantEngine

    model, tok = load_model(model_name)
    cfg = QuantConfig(bits=4, group_size=128, method="gptq")  # calibration size: env or default
    n_seq, seq_len = cfg.setting("n_seq"), cfg.setting("seq_len")
    gptq = QuantPlan.uniform(cfg)
    rtn = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    print(f"qviz bench gptq: {model_name}, {n_seq} x {seq_len} calibration tokens, 4-bit g128")
    old = os.environ.get("QVIZ_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QVIZ_CACHE"] = tmp
        try:
            t0 = time.perf_counter()
            QuantEngine(model, tokenizer=tok).materialize(gptq)
            first = time.perf_counter() - t0
            load = _median_time(lambda: QuantEngine(model, tokenizer=tok).materialize(gptq), 3)
        finally:
            if old is None:
                os.environ.pop("QVIZ_CACHE")
            else:
                os.environ["QVIZ_CACHE"] = old
    base = _median_time(lambda: QuantEngine(model).materialize(rtn), 3)
    print(
        f"  first GPTQ run {first:6.1f} s (target < 180 s) | round-to-nearest {base:.2f} s "
        f"| ratio {first / base:.0f}x"
    )
    print(f"  load from the disk cache {load:.2f} s (target < 2 s) | ratio {load / base:.2f}x RTN")


def bench_trace(model_name: str = "smollm2-135m") -> None:
    """The full "resid" causal-tracing grid at 4 bits g128: batched vs one forward per cell."""
    import numpy as np
    import torch

    from qviz import Lab, QuantConfig, QuantPlan

    lab = Lab.load(model_name)
    prompt, target = "The Eiffel Tower is located in the city of", " Paris"
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    lab.engine.materialize(plan)
    n_tok = lab.encode(prompt).shape[1]
    print(
        f"qviz bench trace: {model_name}, {n_tok} tokens x {lab.n_layers} layers, 4-bit g128, "
        f"component resid, torch threads {torch.get_num_threads()}"
    )
    lab.trace(prompt, target, plan)  # warm-up
    t = time.perf_counter()
    batched = lab.trace(prompt, target, plan)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = lab.trace(prompt, target, plan, method="per_cell")
    t_loop = time.perf_counter() - t
    diff = float(np.max(np.abs(batched.prob - loop.prob)))
    print(
        f"  batched grid {t_batched:.2f} s | per-cell loop {t_loop:.2f} s "
        f"({batched.prob.size} forwards) | ratio {t_loop / t_batched:.1f}x (target >= 20x)"
    )
    print(
        f"  max |batched - per-cell| = {diff:.2e} (must be <= 1e-4: "
        f"{'equal' if diff <= 1e-4 else 'NOT EQUAL'}); p_reference {batched.p_reference:.4f}, "
        f"p_quantized {batched.p_quantized:.4f}, best recovery {batched.best_recovery:.3f} "
        f"at (layer, position) {batched.best_cell}"
    )


def bench_ui(model_name: str = "smollm2-135m", moves: int = 20) -> None:
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
        return
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


_MEMORY_CHILD = """
import json, sys, torch
from qviz import Lab, QuantConfig, QuantPlan
from qviz.data import load_text

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
n, name = int(sys.argv[1]), sys.argv[2]
lab = Lab.load(name, device="cpu")
lab.max_prompt_tokens = 4 * n
ids = lab.tokenizer(load_text(), add_special_tokens=False).input_ids[:n]
prompt = lab.tokenizer.decode(ids)
model_bytes = sum(p.numel() * p.element_size() for p in lab.model.parameters())
plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
lab.engine.materialize(plan)  # the plan's weights: the engine's cache, not compare's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
base = status("VmRSS")
cmp = lab.compare(prompt, " the", plan)
peak = status("VmHWM")
print(json.dumps({"tokens": int(lab.encode(prompt).shape[1]), "model": model_bytes,
                  "base": base, "peak": peak}))
"""


def bench_memory(model_name: str = "smollm2-135m") -> None:
    """Peak resident memory of ``Lab.compare`` at 64, 256 and 1,024 prompt tokens (each in a
    fresh process), next to the model's own size; target: at most 1 GB above the model's process
    at 1,024 tokens. The plan's quantized weights are materialized before the peak is reset."""
    import json
    import subprocess
    import sys

    print(f"qviz bench memory: {model_name}, Lab.compare (4-bit g128 rtn, with isolation)")
    for n in (64, 256, 1024):
        out = (
            subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, str(n), model_name],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        gib = 1 << 30
        above = (r["peak"] - r["base"]) / gib
        print(
            f"  {r['tokens']:5d} tokens: peak RSS {r['peak'] / gib:.2f} GiB, before compare "
            f"{r['base'] / gib:.2f} GiB (model {r['model'] / gib:.2f} GiB + its plan + runtime): "
            f"compare adds {above:.2f} GiB | target <= 1 GiB at 1,024 tokens | "
            f"ratio to target {above:.2f}x"
        )


def bench_methods(model_name: str = "smollm2-135m") -> None:
    """Each method's first materialization of every decoder Linear (a fresh engine and an empty
    disk cache) next to round-to-nearest in the same run, then its reselection in a new engine
    (HQQ: a load from the disk cache; GGUF has no disk cache: a recompute). GPTQ: bench gptq."""
    import os
    import tempfile

    from qviz.models import load_model
    from qviz.quant import QuantConfig, QuantPlan, footprint
    from qviz.quant.engine import QuantEngine
    from qviz.quant.gguf import gguf_config

    model, _ = load_model(model_name)
    rtn = QuantPlan.uniform(QuantConfig(4, 64))
    plans = [rtn, QuantPlan.uniform(QuantConfig(4, 64, method="hqq"))]
    plans += [QuantPlan.uniform(gguf_config(t)) for t in ("Q8_0", "Q6_K", "Q4_K", "Q3_K", "Q2_K")]
    print(f"qviz bench methods: {model_name}, every decoder Linear, fresh engine per run")

    def fresh(plan: QuantPlan) -> float:
        engine = QuantEngine(model)
        engine.progress = False
        t = time.perf_counter()
        engine.materialize(plan)
        return time.perf_counter() - t

    base = _median_time(lambda: fresh(rtn), 3)
    old = os.environ.get("QVIZ_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QVIZ_CACHE"] = tmp
        try:
            for plan in plans:
                first = fresh(plan)
                again = fresh(plan)
                fp = footprint(model, plan, include_embeddings=False)
                kinds = "/".join(sorted(set(fp.to_frame().query("layer >= 0").format)))
                print(
                    f"  {plan.default.label:22s} first {first:7.2f} s ({first / base:6.1f}x RTN)"
                    f" | reselect {again:6.2f} s ({again / base:5.1f}x) | "
                    f"{fp.effective_bits:.3f} bits/weight (decoder) | as {kinds}"
                )
        finally:
            if old is None:
                os.environ.pop("QVIZ_CACHE")
            else:
                os.environ["QVIZ_CACHE"] = old
    print(f"  (round-to-nearest 4-bit g64 baseline: {base:.2f} s)")


BENCHES = {
    "quant": bench_quant,
    "compare": bench_compare,
    "gptq": bench_gptq,
    "trace": bench_trace,
    "ui": bench_ui,
    "memory": bench_memory,
    "methods": bench_methods,
}


def run(what: str, model: str = "smollm2-135m") -> int:
    BENCHES[what](model)
    return 0


def bench_sweep(model_name: str = "smollm2-135m", plan: str = "uniform") -> None:
    """Cells per minute of one small grid (rtn, bits 2/3/4/8, g128, verdict + perplexity) run in
    this process and on a LocalCluster of 2 single-threaded workers; each worker's peak RSS."""
    import resource

    from distributed import Client, LocalCluster

    from qviz.sweep import Grid, run

    grid = Grid([model_name], ["rtn"], [2, 3, 4, 8], [128], [plan], ["verdict", "perplexity"])
    print(f"qviz bench sweep: {len(grid)} cells of {model_name} ({plan}), verdict + perplexity")
    t = time.perf_counter()
    run(grid, client=None, progress=False)
    serial = time.perf_counter() - t
    rate = len(grid) / serial * 60
    print(f"  none    : {serial:7.1f} s | {rate:6.2f} cells/min (model load incl.)")
    t = time.perf_counter()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        up = time.perf_counter() - t
        run(grid, client=client, progress=False)
        local = time.perf_counter() - t
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    print(
        f"  local:2 : {local:7.1f} s | {len(grid) / local * 60:6.2f} cells/min (cluster start "
        f"{up:.1f} s and model loads incl.) | ratio {serial / local:4.2f}x vs none"
    )
    for addr, mib in sorted(peaks.items()):
        print(f"  worker {addr}: peak RSS {mib:7.0f} MiB")


BENCHES["sweep"] = bench_sweep
