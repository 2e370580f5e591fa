"""Benchmarks: each prints its time next to a baseline measured in the same run, and the ratio."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout


def _median_time(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the block; restore the previous values after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quant_figures(model, bits=(2, 3, 4, 8), group_size: int = 128, repeat: int = 7) -> dict:
    """Materialize uniform RTN plans of ``model`` eagerly, fused, and the clone floor (cloning the
    same weights), in one run; then a cached plan's re-select. ``ratio``: fused / clone floor at
    the middle bit-width (4 of 2/3/4/8), as printed."""
    import torch

    from qviz.quant import QuantConfig, QuantPlan, fused
    from qviz.quant.engine import QuantEngine, targets

    print(
        f"  device {next(model.parameters()).device}, torch threads {torch.get_num_threads()}, "
        f"group size {group_size}"
    )
    engine = QuantEngine(model)
    plans = {b: QuantPlan.uniform(QuantConfig(bits=b, group_size=group_size)) for b in bits}
    t0 = time.perf_counter()
    for plan in plans.values():
        for t, cfg in targets(model, engine.adapter, plan):
            w = t.param.data
            fused.prepare(w.t() if t.layout == "in_out" else w, cfg)
    fused.wait()
    compile_s = time.perf_counter() - t0
    st = fused.status()
    state = "broken: " + st["broken"] if st["broken"] else f"{st['ready']} layouts ready"
    print(
        f"  fused kernel: compiled and checked in {compile_s:.1f} s in this process ({state}, "
        f"{st['bad']} kept eager; inductor's disk cache makes later processes faster)"
    )
    rows = []
    for b, plan in plans.items():
        weights = [t.param.data for t, _ in targets(model, engine.adapter, plan)]

        def fresh(e=engine, p=plan):
            e.clear()
            e.materialize(p)

        def eager():
            with _env(QVIZ_FUSED="0"):
                fresh()

        runs = {"clone": lambda w=weights: [x.clone() for x in w], "eager": eager, "fused": fresh}
        for fn in runs.values():
            fn()  # warm-up
        # interleaved (clone, eager, fused) rounds: a load change on a shared machine hits all three
        times = {k: [] for k in runs}
        for _ in range(repeat):
            for k, fn in runs.items():
                times[k].append(_median_time(fn, 1))
        floor, t_eager, t_fused = (statistics.median(times[k]) for k in runs)
        n = sum(w.numel() for w in weights)
        rows.append(
            {
                "bits": b,
                "eager_ms": t_eager * 1e3,
                "fused_ms": t_fused * 1e3,
                "clone_ms": floor * 1e3,
                "eager_ratio": t_eager / floor,
                "fused_ratio": t_fused / floor,
                "speedup": t_eager / t_fused,
                "weights": n,
            }
        )
        print(
            f"  {b}-bit g{group_size}: eager {t_eager * 1e3:7.1f} ms | fused "
            f"{t_fused * 1e3:7.1f} ms | clone floor {floor * 1e3:6.1f} ms | ratio eager "
            f"{t_eager / floor:4.2f}x, fused {t_fused / floor:4.2f}x (target <= 1.5x, stretch "
            f"1.2x) | fused {t_eager / t_fused:.1f}x faster | {n / 1e6:.1f} M weights"
        )
    engine = QuantEngine(model)
    cached = [QuantPlan.uniform(QuantConfig(bits=b)) for b in (2, 4)]
    for p in cached:
        engine.materialize(p)

    def reselect():
        for p in cached:
            with engine.quantized(p):
                pass

    t = _median_time(reselect, repeat=4 * repeat) / len(cached)
    base = _median_time(lambda: None, repeat=4 * repeat)
    print(
        f"  re-select a cached plan (swap in + restore): {t * 1e3:.2f} ms (target <= 5 ms; "
        f"empty-call baseline {base * 1e6:.1f} us)"
    )
    head = rows[len(rows) // 2] if len(rows) > 1 else rows[0]
    return {
        "ratio": head["fused_ratio"],
        "ratio_of": f"fused materialize / clone floor, {head['bits']}-bit g{group_size}",
        "target": 1.5,
        "compile_s": compile_s,
        "fused": {k: st[k] for k in ("enabled", "ready", "bad", "broken")},
        "rows": rows,
        "reselect_ms": t * 1e3,
    }


def bench_quant(model_name: str = "smollm2-135m") -> dict:
    """Materialize uniform 2/3/4/8-bit g128 plans, eager vs fused vs cloning the same weights
    (the floor), all in one run; then a cached plan's re-select."""
    from qviz.models import load_model

    model, _ = load_model(model_name)
    print(f"qviz bench quant: {model_name}")
    return quant_figures(model)


def bench_compare(model_name: str = "smollm2-135m") -> dict:
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
    return {
        "ratio": t_full / t_plain,
        "ratio_of": "compare() / 2 plain forwards",
        "compare_ms": t_full * 1e3,
        "plain_ms": t_plain * 1e3,
        "cka_ms": t_cka * 1e3,
    }


def bench_gptq(model_name: str = "smollm2-135m") -> dict:
    """GPTQ of every decoder Linear (4-bit g128, 128 x 256 calibration tokens) in a fresh cache,
    then its load from the disk cache in a new engine; round-to-nearest as the baseline."""
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
    with tempfile.TemporaryDirectory() as tmp, _env(QVIZ_CACHE=tmp):
        t0 = time.perf_counter()
        QuantEngine(model, tokenizer=tok).materialize(gptq)
        first = time.perf_counter() - t0
        load = _median_time(lambda: QuantEngine(model, tokenizer=tok).materialize(gptq), 3)
    base = _median_time(lambda: QuantEngine(model).materialize(rtn), 3)
    print(
        f"  first GPTQ run {first:6.1f} s (target < 180 s) | round-to-nearest {base:.2f} s "
        f"| ratio {first / base:.0f}x"
    )
    print(f"  load from the disk cache {load:.2f} s (target < 2 s) | ratio {load / base:.2f}x RTN")
    return {
        "ratio": first / base,
        "ratio_of": "first GPTQ run / round-to-nearest",
        "first_s": first,
        "rtn_s": base,
        "load_s": load,
    }


def fair_per_cell(lab, prompt: str, target: str, plan) -> tuple[object, float]:
    """The fair baseline of causal tracing ("resid", restore): the quantized and reference runs,
    then one forward per cell that computes the last position's logits only, as a plain loop
    would. Returns (prob [L, T], seconds). Uses the probes' own per-cell patch, one cell a call.
    """
    import numpy as np
    import torch

    from qviz.probes.patch import _cells, _generic_grid, run_cache
    from qviz.quant import QuantPlan

    t0 = time.perf_counter()
    ids, tid = lab.encode(prompt), lab.target_id(target)
    with lab.engine.quantized(plan):
        run_cache(lab.model, lab.adapter, ids, tid, kv=True)
    with lab.engine.quantized(QuantPlan.none()):
        ref = run_cache(lab.model, lab.adapter, ids, tid)
    n_layers = lab.adapter.n_layers(lab.model)
    grid = np.full((n_layers, ids.shape[1]), np.nan)
    with lab.engine.quantized(plan), torch.no_grad():
        for c in _cells(n_layers, ids.shape[1], 1, None, None):
            vals = _generic_grid(lab.model, lab.adapter, ids, ref, tid, "resid", [c], 1)
            grid[c[0], c[1]] = vals[(c[0], c[1])]
    return grid, time.perf_counter() - t0


def bench_trace(model_name: str = "smollm2-135m") -> dict:
    """The full "resid" causal-tracing grid at 4 bits g128: batched vs one forward per cell
    (last-position logits only: the fair loop; and the full-logits loop, the old baseline)."""
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
    fair, t_fair = fair_per_cell(lab, prompt, target, plan)
    t = time.perf_counter()
    loop = lab.trace(prompt, target, plan, method="per_cell")
    t_loop = time.perf_counter() - t
    diff = float(np.max(np.abs(batched.prob - loop.prob)))
    diff_fair = float(np.max(np.abs(batched.prob - fair)))
    print(
        f"  batched grid {t_batched:.2f} s | fair per-cell loop (last-position logits) "
        f"{t_fair:.2f} s ({batched.prob.size} forwards) | ratio {t_fair / t_batched:.1f}x "
        f"(target >= 20x)"
    )
    print(
        f"  old baseline, per-cell loop with full logits {t_loop:.2f} s | ratio "
        f"{t_loop / t_batched:.1f}x"
    )
    print(
        f"  max |batched - per-cell| = {max(diff, diff_fair):.2e} (must be <= 1e-4: "
        f"{'equal' if max(diff, diff_fair) <= 1e-4 else 'NOT EQUAL'}); p_reference "
        f"{batched.p_reference:.4f}, p_quantized {batched.p_quantized:.4f}, best recovery "
        f"{batched.best_recovery:.3f} at (layer, position) {batched.best_cell}"
    )
    return {
        "ratio": t_fair / t_batched,
        "ratio_of": "fair per-cell loop (last-position logits) / batched grid",
        "batched_s": t_batched,
        "fair_per_cell_s": t_fair,
        "full_logits_per_cell_s": t_loop,
        "full_logits_ratio": t_loop / t_batched,
        "max_diff": max(diff, diff_fair),
    }


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


def bench_memory(model_name: str = "smollm2-135m") -> dict:
    """Peak resident memory of ``Lab.compare`` at 64, 256 and 1,024 prompt tokens (each in a
    fresh process), next to the model's own size; target: at most 1 GB above the model's process
    at 1,024 tokens. The plan's quantized weights are materialized before the peak is reset."""
    import subprocess

    rows = []
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
        rows.append({"tokens": r["tokens"], "added_gib": above, "peak_gib": r["peak"] / gib})
    return {"ratio": rows[-1]["added_gib"], "ratio_of": "GiB added / 1 GiB target", "rows": rows}


def bench_methods(model_name: str = "smollm2-135m") -> dict:
    """Each method's first materialization of every decoder Linear (a fresh engine and an empty
    disk cache) next to round-to-nearest in the same run, then its reselection in a new engine
    (HQQ: a load from the disk cache; GGUF has no disk cache: a recompute). GPTQ: bench gptq."""
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp, _env(QVIZ_CACHE=tmp):
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
            rows.append({"plan": plan.default.label, "first_s": first, "reselect_s": again})
    print(f"  (round-to-nearest 4-bit g64 baseline: {base:.2f} s)")
    return {
        "ratio": max(r["first_s"] for r in rows) / base,
        "ratio_of": "slowest method's first run / round-to-nearest",
        "rtn_s": base,
        "rows": rows,
    }


def bench_all(model_name: str = "smollm2-135m") -> dict:
    """Every benchmark, one after another (slow: GPTQ alone takes minutes); "ratio": None,
    "benches": each one's figures (``run("all")`` prints them one by one instead)."""
    return {"ratio": None, "benches": [run_one(n, model_name) for n in BENCHES if n != "all"]}


BENCHES: dict[str, Callable[[str], object]] = {
    "quant": bench_quant,
    "compare": bench_compare,
    "gptq": bench_gptq,
    "trace": bench_trace,
    "ui": bench_ui,
    "memory": bench_memory,
    "methods": bench_methods,
    "all": bench_all,
}


def run_one(name: str, model: str = "smollm2-135m") -> dict:
    """Run one benchmark; its figures as a dict with "bench", "model" and at least "ratio"."""
    out = BENCHES[name](model)
    return {"bench": name, "model": model, **(out or {"ratio": None})}


def run(what: str, model: str = "smollm2-135m", json_out: bool = False) -> int:
    """``qviz bench WHAT``: print each benchmark's figures and its ratio to its same-run
    baseline. With ``json_out`` the text goes to stderr and stdout gets one JSON object per
    benchmark, one per line (``all``: one line per benchmark, as each finishes)."""
    if what not in BENCHES:
        known = sorted(BENCHES)
        print(f"qviz bench: unknown benchmark {what!r}; choose from {known}", file=sys.stderr)
        return 2
    names = [n for n in BENCHES if n != "all"] if what == "all" else [what]
    for name in names:
        if json_out:
            stdout = sys.stdout
            with redirect_stdout(sys.stderr):
                result = run_one(name, model)
            print(json.dumps(result, default=str), file=stdout, flush=True)
        else:
            run_one(name, model)
    return 0


def bench_sweep(model_name: str = "smollm2-135m", plan: str = "uniform") -> dict:
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
    return {
        "ratio": serial / local,
        "ratio_of": "cells per minute, local:2 over none",
        "cells_per_min_none": rate,
        "cells_per_min_local2": len(grid) / local * 60,
        "worker_peak_rss_mib": sorted(peaks.values()),
    }


BENCHES["sweep"] = bench_sweep


def parser() -> argparse.ArgumentParser:
    """The arguments of ``qviz bench`` (the cli adds the same ones)."""
    p = argparse.ArgumentParser(prog="qviz bench", description=__doc__)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """WHAT (a benchmark or ``all``), ``--model``, ``--json``."""
    p.add_argument("what", choices=sorted(BENCHES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--json", action="store_true", help="one JSON object per benchmark on stdout")


def main(argv: list[str] | None = None) -> int:
    """``python -m qviz.bench quant --json``; the same as ``qviz bench``."""
    args = parser().parse_args(argv)
    return run(args.what, model=args.model, json_out=args.json)


if __name__ == "__main__":
    sys.exit(main())
