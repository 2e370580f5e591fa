"""compare() benchmarks: its time against plain forwards, and its peak memory by prompt length."""

from __future__ import annotations

import json
import subprocess
import sys

from qviz.bench.timing import median_time


def bench_compare(model_name: str = "smollm2-135m") -> dict:
    """``Lab.compare`` (plan cached) in one run: a revisit of a computed (prompt, target, plan);
    a new prompt vs one reference + one quantized plain forward; 32 prompts vs 1, pooled
    (``compare(list)``) and one Comparison each (``compare_many``)."""
    from qviz import Lab, QuantConfig, QuantPlan
    from qviz.data import load_facts

    lab = Lab.load(model_name)
    prompt = "The Eiffel Tower is located in the city of"
    prompts = [f["prompt"] for f in load_facts()[:32]]
    n = lab.encode(prompt).shape[1]
    print(f"qviz bench compare: {model_name}, {n} tokens, 4-bit plan cached")
    return compare_figures(lab, prompt, " Paris", prompts, QuantPlan.uniform(QuantConfig(bits=4)))


def compare_figures(lab, prompt: str, target, prompts: list[str], plan, repeat: int = 5) -> dict:
    """``bench_compare``'s figures on any Lab (printed, and returned JSON-ready)."""
    import torch

    from qviz import QuantPlan, metrics

    lab.engine.materialize(plan)
    ids = lab.encode(prompt)

    def plain():
        with torch.no_grad():
            for p in (QuantPlan.none(), plan):
                with lab.quantized(p):
                    lab.model(ids, use_cache=False)

    def fresh(fn):
        def run():
            lab._acts.clear()
            fn()

        return run

    one = fresh(lambda: lab.compare(prompt, target, plan))
    pooled = fresh(lambda: lab.compare(prompts, target, plan))
    many = fresh(lambda: lab.compare_many(prompts, target, plan))
    plain()
    one()
    t_plain, t_one = median_time(plain, repeat), median_time(one, repeat)
    t_revisit = median_time(lambda: lab.compare(prompt, target, plan), repeat=4 * repeat)
    k = max(1, (repeat + 1) // 2)
    t_pooled, t_many = median_time(pooled, k), median_time(many, k)
    n = len(prompts)
    print(
        f"  revisit of a computed (prompt, target, plan): {t_revisit * 1e3:.2f} ms "
        f"(target <= 10 ms; was 119 ms)"
    )
    print(
        f"  new prompt: compare() {t_one * 1e3:.1f} ms | 2 plain forwards {t_plain * 1e3:.1f} ms "
        f"| ratio {t_one / t_plain:.2f}x (target <= 1.5x)"
    )
    print(
        f"  {n} prompts vs 1: pooled compare({n} prompts) {t_pooled * 1e3:.0f} ms, ratio "
        f"{t_pooled / t_one:.2f}x (target <= 4x; was 16x) | compare_many, {n} Comparisons "
        f"{t_many * 1e3:.0f} ms, ratio {t_many / t_one:.2f}x"
    )
    cap = lab.activations(prompt, plan)
    t_cka = median_time(lambda: metrics.cka_matrix(cap.resid, cap.resid), repeat=4 * repeat)
    m = cap.resid.shape[0]
    print(f"  CKA of all {m}x{m} layer pairs alone: {t_cka * 1e3:.2f} ms (target <= 10 ms)")
    return {
        "ratio": t_one / t_plain,
        "ratio_of": "compare() of a new prompt / 2 plain forwards",
        "revisit_ms": t_revisit * 1e3,
        "compare_ms": t_one * 1e3,
        "plain_ms": t_plain * 1e3,
        "pooled_ratio": t_pooled / t_one,
        "many_ratio": t_many / t_one,
        "n_prompts": n,
        "cka_ms": t_cka * 1e3,
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
with torch.no_grad():  # page the model in: safetensors are mapped lazily, and the first
    for p in lab.model.parameters():  # forward would count the tied embedding (~0.1 GiB)
        p.data.sum()
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
    at 1,024 tokens. The plan's quantized weights are materialized and the model's weights read
    once (paged in from the mapped safetensors) before the peak is reset."""

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
            f"{r['base'] / gib:.2f} GiB (model {r['model'] / gib:.2f} GiB paged in + its plan + "
            "runtime): "
            f"compare adds {above:.2f} GiB | target <= 1 GiB at 1,024 tokens | "
            f"ratio to target {above:.2f}x"
        )
        rows.append({"tokens": r["tokens"], "added_gib": above, "peak_gib": r["peak"] / gib})
    return {"ratio": rows[-1]["added_gib"], "ratio_of": "GiB added / 1 GiB target", "rows": rows}
