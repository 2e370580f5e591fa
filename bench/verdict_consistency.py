"""Does the verdict rule hold across prompts? The embedded model on N bundled facts, RTN g128.

Runs ``Lab.compare`` (with the perfect-input isolation) on N facts spread over the bundled set,
leaving out the first 8 (the tests' pooled prompts), at 8/4/3/2 bits, and applies the rule with
all its evidence, the target's final probability included (computed from the comparison's lens,
as ``compare`` will pass it). Prints the verdict counts per bit-width and the spread
(min / median / max) of each evidence value. ``--save`` keeps the raw inputs, ``--load`` re-applies
the current rule to them without the model.

    PYTHONPATH=. python bench/verdict_consistency.py -n 40 --save /tmp/verdict.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections import Counter

import numpy as np

from qviz import metrics
from qviz.metrics.verdict import MODES
from qviz.results import Verdict

BITS = (8, 4, 3, 2)
SKIP = 8  # facts[:8] are the tests' pooled prompts


def collect(n: int) -> list[dict]:
    """The rule's raw inputs for n facts x BITS (one dict per comparison)."""
    from qviz import Lab, QuantConfig, QuantPlan
    from qviz.data import load_facts

    facts = load_facts()[SKIP:]
    pick = [facts[i] for i in np.linspace(0, len(facts) - 1, n).round().astype(int)]
    lab = Lab.load("smollm2-135m", device="cpu")
    n_layers = lab.n_layers
    mid = slice(n_layers // 3, max(n_layers // 3 + 1, 2 * n_layers // 3))
    rows, t0 = [], time.perf_counter()
    for bits in BITS:
        plan = QuantPlan.uniform(QuantConfig(bits=bits, group_size=128))
        for j, f in enumerate(pick):
            tid = lab.tokenizer(f["answer"], add_special_tokens=False).input_ids[0]  # first piece
            cmp = lab.compare(f["prompt"], tid, plan, isolation=True)
            rows.append(
                dict(
                    bits=bits,
                    prompt=f["prompt"],
                    target=cmp.lens.target,
                    args=(
                        cmp.cka.values.diagonal().copy(),
                        int(cmp.lens.reference.rank[-1]),
                        int(cmp.lens.quantized.rank[-1]),
                        cmp.ffn.flip_rate.copy(),
                        float(cmp.attention.quant_entropy[mid].mean()),
                    ),
                    kw=dict(
                        isolation_delta_cosine=cmp.isolation.delta_cosine.copy(),
                        p_reference=float(cmp.lens.reference.prob[-1]),
                        p_quantized=float(cmp.lens.quantized.prob[-1]),
                        reference_entropy_mid=float(cmp.attention.ref_entropy[mid].mean()),
                    ),
                )
            )
            print(
                f"\r{bits} bits {j + 1}/{n}  {time.perf_counter() - t0:.0f} s",
                end="",
                file=sys.stderr,
            )
    print(file=sys.stderr)
    return rows


SPREAD = (
    "cka_diag_mean",
    "quant_rank",
    "prob_ratio",
    "max_flip_rate",
    "mid_attn_entropy",
    "isolation_broken_layers",
    "isolation_min_cosine",
)


def summarize(rows: list[dict]) -> None:
    """Apply the current rule; print counts per bit-width, the spread of evidence, odd cases."""
    verdicts = [Verdict(*metrics.verdict(*r["args"], **r["kw"], target=r["target"])) for r in rows]
    n = len(rows) // len(BITS)
    print(f"\nverdicts on {n} bundled facts per bit-width (RTN g128, embedded SmolLM2-135M)")
    print(f"{'bits':>4} " + " ".join(f"{m:>22s}" for m in MODES))
    for bits in BITS:
        c = Counter(v.mode for r, v in zip(rows, verdicts, strict=True) if r["bits"] == bits)
        print(f"{bits:>4} " + " ".join(f"{c.get(m, 0):>22d}" for m in MODES))
    print("\nspread of the evidence (min / median / max), prompts with a verdict")
    print(f"{'bits':>4} " + " ".join(f"{k[:22]:>22s}" for k in SPREAD))
    for bits in BITS:
        evs = [
            v.evidence
            for r, v in zip(rows, verdicts, strict=True)
            if r["bits"] == bits and v.warning is None
        ]
        cells = []
        for k in SPREAD:
            x = np.array([e[k] for e in evs], dtype=float)
            q = np.quantile(x, [0, 0.5, 1]) if len(x) else [np.nan] * 3
            fmt = "{:.0f}" if k in ("quant_rank", "isolation_broken_layers") else "{:.2f}"
            cells.append("/".join(fmt.format(v) for v in q))
        print(f"{bits:>4} " + " ".join(f"{c:>22s}" for c in cells))
    print("\nsigns seen per bit-width (prompts with a verdict)")
    names = [s["name"] for s in verdicts[0].signs if s["kind"] != "warning"]
    print(f"{'bits':>4} " + " ".join(f"{k[:16]:>16s}" for k in names))
    for bits in BITS:
        vs = [
            v
            for r, v in zip(rows, verdicts, strict=True)
            if r["bits"] == bits and v.warning is None
        ]
        c = Counter(s["name"] for v in vs for s in v.signs if s["seen"])
        print(f"{bits:>4} " + " ".join(f"{c.get(k, 0):>16d}" for k in names))
    print("\none sentence per bit-width (first prompt with a verdict):")
    for bits in BITS:
        for r, v in zip(rows, verdicts, strict=True):
            if r["bits"] == bits and v.warning is None:
                print(f"  {bits} bits, {r['prompt']!r} -> {r['target']!r}: {v.sentence}")
                break
    warned = [
        (r, v)
        for r, v in zip(rows, verdicts, strict=True)
        if v.warning is not None and r["bits"] == 8
    ]
    if warned:
        r, v = warned[0]
        print(f"  warning example, {r['prompt']!r}: {v.sentence}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40, help="number of bundled facts")
    ap.add_argument("--save", help="pickle the raw inputs here")
    ap.add_argument("--load", help="re-apply the rule to inputs saved with --save")
    a = ap.parse_args()
    if a.load:
        with open(a.load, "rb") as f:
            rows = pickle.load(f)
    else:
        t = time.perf_counter()
        rows = collect(a.n)
        print(f"{len(rows)} comparisons in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if a.save:
            with open(a.save, "wb") as f:
                pickle.dump(rows, f)
    summarize(rows)


if __name__ == "__main__":
    main()
