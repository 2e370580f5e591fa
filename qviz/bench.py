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
    n_seq = int(os.environ.get("QVIZ_GPTQ_NSEQ", 128))
    seq_len = int(os.environ.get("QVIZ_GPTQ_SEQLEN", 256))
    gptq = QuantPlan.uniform(QuantConfig(bits=4, group_size=128, method="gptq"))
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


BENCHES = {"quant": bench_quant, "compare": bench_compare, "gptq": bench_gptq}


def run(what: str, model: str = "smollm2-135m") -> int:
    BENCHES[what](model)
    return 0
