"""``qviz sweep``: its arguments and command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qviz.sweep import KEY_COLUMNS, METRICS, PLAN_KINDS, Grid, close, connect, run


# command line ---------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from err


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_sweep_parser(sub) -> argparse.ArgumentParser:
    """Add ``qviz sweep`` to the cli's subparsers (``sub``); it runs ``cmd_sweep``."""
    p = sub.add_parser("sweep", help="a grid of quantization cells, in-process or on Dask")
    p.add_argument("--models", type=_words, default=["smollm2-135m"], help="comma list")
    p.add_argument("--method", "--methods", dest="methods", type=_words, default=["rtn"])
    p.add_argument("--bits", type=_ints, default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=_ints, default=[128], help="0 = per output channel")
    p.add_argument("--plans", type=_words, default=["uniform"], help=f"of {list(PLAN_KINDS)}")
    p.add_argument("--metrics", type=_words, default=["verdict", "perplexity"], help=str(METRICS))
    p.add_argument("--scheduler", default="none", help="none | local:N | tcp://HOST:PORT")
    p.add_argument("--out", required=True, help="JSONL file (Parquet when it ends in .parquet)")
    p.add_argument("--resume", action="store_true", help="skip the cells finished in --out")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    """Validate the grid, connect, run; print the table. Exit 2 on bad input or no scheduler."""
    try:
        grid = Grid(args.models, args.methods, args.bits, args.group_size, args.plans, args.metrics)
        if Path(args.out).exists() and not args.resume:
            raise FileExistsError(f"--out {args.out} exists: pass --resume or remove it")
        client = connect(args.scheduler)
    except (ValueError, ConnectionError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if client is not None:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        frame = run(grid, client, out=args.out, resume=args.resume)
    finally:
        close(client)
    cols = [*KEY_COLUMNS, *grid.metrics, "error"]
    print(frame[cols].to_string(index=False))
    print(f"{len(frame)} cells, {int(frame['error'].notna().sum())} errors -> {args.out}")
    return 0
