"""Benchmarks: each prints its time next to a baseline measured in the same run, and the ratio."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import redirect_stdout

from qviz.bench.compare import bench_compare, bench_memory
from qviz.bench.prescribe import bench_prescribe
from qviz.bench.quant import bench_gptq, bench_methods, bench_quant, quant_figures
from qviz.bench.sweep import bench_sweep
from qviz.bench.trace import bench_trace, fair_per_cell
from qviz.bench.ui import bench_ui, bench_ui_uncached

__all__ = ["BENCHES", "fair_per_cell", "main", "parser", "quant_figures", "run", "run_one"]


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
    "ui-uncached": bench_ui_uncached,
    "memory": bench_memory,
    "methods": bench_methods,
    "sweep": bench_sweep,
    "prescribe": bench_prescribe,
    "all": bench_all,
}


def run_one(name: str, model: str = "smollm2-135m") -> dict:
    """Run one benchmark; its figures as a dict with "bench", "model" and at least "ratio"."""
    out = BENCHES[name](model)
    return {"bench": name, "model": model, **(out or {"ratio": None})}


def run(
    what: str, model: str = "smollm2-135m", json_out: bool = False, uncached: bool = False
) -> int:
    """``qviz bench WHAT``: print each benchmark's figures and its ratio to its same-run
    baseline. With ``json_out`` the text goes to stderr and stdout gets one JSON object per
    benchmark, one per line (``all``: one line per benchmark, as each finishes). ``uncached``
    turns ``ui`` into ``ui-uncached`` (slider moves to plans never seen)."""
    if uncached and what == "ui":
        what = "ui-uncached"
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
    p.add_argument(
        "--uncached", action="store_true", help="ui: slider moves to plans never seen before"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m qviz.bench quant --json``; the same as ``qviz bench``."""
    args = parser().parse_args(argv)
    return run(args.what, model=args.model, json_out=args.json, uncached=args.uncached)
