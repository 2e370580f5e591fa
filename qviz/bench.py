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


BENCHES = {"quant": bench_quant, "compare": bench_compare}


def run(what: str, model: str = "smollm2-135m") -> int:
    BENCHES[what](model)
    return 0
