"""Grids of (model, method, bits, group size, plan) cells, run in-process or on Dask.

``Grid`` holds the choices and is validated whole before any task starts; ``run(grid, client)``
runs every cell (serially in this process when ``client`` is None, else as Dask tasks on a
``LocalCluster`` or a ``tcp://`` scheduler) and returns one row per cell. Tasks carry only the
cell's specification (strings and ints, never tensors); each worker process keeps one ``Lab``
per model (``_LABS``), so a model is loaded once per worker, and tasks are submitted grouped by
model (one model's cells first). A failed task is retried once, then recorded as an error row.
Rows are appended to ``out`` as they finish (JSONL, or Parquet when the name ends in
``.parquet``), each keyed by (model fingerprint, plan label, calibration, metric set) so
``resume=True`` skips finished cells and never writes a row twice.

    grid = Grid(["smollm2-135m"], ["rtn"], [2, 4], [128], ["uniform"], ["verdict", "perplexity"])
    frame = run(grid, client=None, out="sweep.jsonl")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qviz.cancel import check_cancel

METRICS = ("verdict", "perplexity", "facts", "cka", "mib")
PLAN_KINDS = ("uniform", "protect_first:N[:BITS]", "only_first:N")
PROMPT, TARGET = "The capital of France is", " Paris"
PPL_CHARS = 2000  # perplexity over the first PPL_CHARS characters of the bundled prose
N_FACTS = 16  # fact recall over the first N_FACTS bundled facts
KEY_COLUMNS = ("model", "method", "bits", "group_size", "plan")
CONNECT_TIMEOUT = 5.0  # seconds to reach a tcp:// scheduler


# validation -----------------------------------------------------------------------------------
def check_model(name: str) -> str:
    """An embedded name, an existing local directory or an ``org/name`` hub id; else ValueError."""
    from qviz.models.load import EMBEDDED

    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name in EMBEDDED or Path(name).is_dir():
        return name
    if name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "/")):
        return name  # a hub id: resolved by the worker that loads it
    raise ValueError(
        f"unknown model {name!r}: choices are the embedded models {list(EMBEDDED)}, an existing "
        "local directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
    )


def parse_plan(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"uniform"`` | ``"protect_first:N[:BITS]"`` | ``"only_first:N"`` -> (kind, ints)."""
    kind, _, rest = str(spec).partition(":")
    try:
        args = tuple(int(a) for a in rest.split(":")) if rest else ()
    except ValueError:
        args = None
    ok = args is not None and (
        (kind == "uniform" and not args)
        or (kind == "protect_first" and len(args) <= 2 and all(a >= 0 for a in args))
        or (kind == "only_first" and len(args) == 1 and args[0] >= 0)
    )
    if kind == "protect_first" and ok and len(args) == 2:
        ok = 2 <= args[1] <= 8
    if not ok:
        raise ValueError(f"unknown plan spelling {spec!r}: choices are {list(PLAN_KINDS)}")
    return kind, args


def make_plan(spec: str, method: str, bits: int, group_size: int | None):
    """The ``QuantPlan`` of one cell (raises ValueError for a bad combination)."""
    from qviz.quant.config import QuantConfig, QuantPlan

    cfg = QuantConfig(bits, group_size, method=method)
    kind, args = parse_plan(spec)
    if kind == "protect_first":
        return QuantPlan.protect_first(cfg, *args)
    if kind == "only_first":
        return QuantPlan.only_layers(cfg, range(args[0]))
    return QuantPlan.uniform(cfg)


def _choice(kind: str, value: Any, choices: Sequence) -> Any:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}: choices are {list(choices)}")
    return value


def _tuple(values: Any) -> tuple:
    if isinstance(values, (str, int)) or values is None:
        return (values,)
    return tuple(values)


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights: the GGUF sha256 of an embedded model, a hash of a local
    directory's config and file sizes, else the name itself (a hub id)."""
    from qviz.models.load import EMBEDDED

    if name in EMBEDDED:
        return f"{name}@{EMBEDDED[name].sha256[:16]}"
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
        return f"{path.resolve()}@{h.hexdigest()[:16]}"
    return name


def calibration_id() -> str:
    """The data every cell is measured on (bundled prose and facts, slice sizes, probe prompt)
    and that calibrated methods calibrate on: part of each row's key."""
    from qviz.data import load_facts, load_text

    blob = json.dumps([load_text(), load_facts(), PPL_CHARS, N_FACTS, PROMPT, TARGET])
    return "bundled@" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One task's specification: plain values only (it travels to the workers)."""

    model: str
    method: str
    bits: int
    group_size: int | None
    plan: str
    metrics: tuple[str, ...]
    plan_label: str
    key: str


@dataclass(frozen=True)
class Grid:
    """The cross product models x methods x bits x group_sizes x plans, measured by ``metrics``.

    group_sizes: ints, or None / 0 for one group per output row. plans: ``"uniform"``,
    ``"protect_first:N[:BITS]"`` (layers 0..N-1 at BITS, default 8), ``"only_first:N"``.
    metrics: any of ``METRICS``. Every value is checked here, naming the bad one and the choices.
    """

    models: tuple[str, ...]
    methods: tuple[str, ...]
    bits: tuple[int, ...]
    group_sizes: tuple[int | None, ...]
    plans: tuple[str, ...] = ("uniform",)
    metrics: tuple[str, ...] = ("verdict", "perplexity")
    cells: tuple[Cell, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from qviz.quant.methods import METHODS

        norm = {
            "models": tuple(check_model(m) for m in _tuple(self.models)),
            "methods": tuple(_choice("method", m, list(METHODS)) for m in _tuple(self.methods)),
            "bits": _tuple(self.bits),
            "group_sizes": tuple(g or None for g in _tuple(self.group_sizes)),
            "plans": _tuple(self.plans),
            "metrics": tuple(_choice("metric", m, METRICS) for m in _tuple(self.metrics)),
        }
        for name, values in norm.items():
            if not values:
                raise ValueError(f"{name} is empty: give at least one value")
            object.__setattr__(self, name, values)
        for p in self.plans:
            parse_plan(p)
        calib = calibration_id()
        metrics = tuple(sorted(set(self.metrics)))
        cells = []
        for model in self.models:
            fp = model_fingerprint(model)
            for method in self.methods:
                for bits in self.bits:
                    for gs in self.group_sizes:
                        for spec in self.plans:
                            label = make_plan(spec, method, bits, gs).label  # validates bits, gs
                            blob = json.dumps([fp, label, calib, metrics])
                            key = hashlib.sha256(blob.encode()).hexdigest()[:20]
                            cells.append(Cell(model, method, bits, gs, spec, metrics, label, key))
        object.__setattr__(self, "cells", tuple(cells))

    def __len__(self) -> int:
        return len(self.cells)


# the worker side ------------------------------------------------------------------------------
_LABS: dict[str, Any] = {}
_LABS_LOCK = threading.Lock()


def cached_lab(model: str):
    """This process's Lab on ``model``, loaded on first use (once per worker process)."""
    with _LABS_LOCK:
        if model not in _LABS:
            from qviz.lab import Lab

            _LABS[model] = Lab.load(model)
        return _LABS[model]


def measure(lab, plan, metrics: Iterable[str], cancel: threading.Event | None = None) -> dict:
    """{metric: value} of ``plan`` on ``lab``: short inputs, seconds per cell on a small model.

    verdict: the verdict's mode on the probe prompt; cka: mean over decoder layers of the CKA
    between each quantized layer and the same reference layer; perplexity: over the first
    ``PPL_CHARS`` characters of the bundled prose; facts: accuracy on ``N_FACTS`` bundled facts;
    mib: weight memory.
    """
    from qviz.data import load_facts, load_text

    metrics = set(metrics)
    out: dict[str, Any] = {}
    if metrics & {"verdict", "cka"}:
        check_cancel(cancel, "before compare")
        cmp = lab.compare(PROMPT, TARGET, plan)
        if "verdict" in metrics:
            out["verdict"] = cmp.verdict.mode
        if "cka" in metrics:
            diag = [float(cmp.cka.values[i, i]) for i in range(1, cmp.cka.values.shape[0])]
            out["cka"] = sum(diag) / len(diag)
    if "perplexity" in metrics:
        out["perplexity"] = lab.perplexity(plan, text=load_text()[:PPL_CHARS], cancel=cancel)
    if "facts" in metrics:
        out["facts"] = lab.evaluate(plan, prompts=load_facts()[:N_FACTS], cancel=cancel).accuracy
    if "mib" in metrics:
        from qviz.quant.memory import footprint

        out["mib"] = footprint(lab.model, plan).bytes / 2**20
    return out


def run_cell(cell: Cell) -> dict:
    """Measure one cell in this process (the Lab of its model cached); raises on failure."""
    t = time.perf_counter()
    lab = cached_lab(cell.model)
    plan = make_plan(cell.plan, cell.method, cell.bits, cell.group_size)
    plan.check_layers(lab.n_layers)
    values = measure(lab, plan, cell.metrics)
    return _row(cell, values, seconds=time.perf_counter() - t)


def _row(cell: Cell, values: dict, error: str | None = None, seconds: float = 0.0) -> dict:
    row = {k: getattr(cell, k) for k in KEY_COLUMNS}
    row.update({m: values.get(m) for m in cell.metrics})
    row.update(
        plan_label=cell.plan_label,
        key=cell.key,
        error=error,
        seconds=round(seconds, 3),
        worker=f"{os.uname().nodename}:{os.getpid()}",
    )
    return row


# output ---------------------------------------------------------------------------------------
def read_rows(out: str | os.PathLike) -> list[dict]:
    """The rows of a sweep's output file (a torn last JSONL line, from a kill, is skipped)."""
    path = Path(out)
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RowWriter:
    """Appends each finished row to ``path`` at once: a JSONL line (flushed and fsynced), or the
    whole Parquet file rewritten through a temporary file and an atomic rename."""

    def __init__(self, path: str | os.PathLike | None, keep: list[dict]) -> None:
        self.path = None if path is None else Path(path)
        self.rows = list(keep)
        if self.path is not None:
            if self.path.suffix == ".parquet":
                try:
                    import pyarrow  # noqa: F401
                except ImportError:
                    raise ValueError(
                        f"--out {self.path}: Parquet output needs pyarrow (pip install "
                        "pyarrow); or name a .jsonl file"
                    ) from None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.suffix == ".parquet":
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        else:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        if self.path.suffix == ".parquet":
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _clean(row: dict) -> dict:
    """JSON-safe values (NaN perplexity -> None)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**row, **dict.fromkeys(bad)}


# the driver -----------------------------------------------------------------------------------
def connect(scheduler: str | None, timeout: float = CONNECT_TIMEOUT):
    """A Dask client for ``"none"`` (None: run in this process), ``"local:N"`` (a LocalCluster
    of N single-threaded worker processes) or ``"tcp://HOST:PORT"``; a clear error otherwise."""
    if scheduler in (None, "", "none"):
        return None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"scheduler {scheduler!r}: local:N needs N >= 1 workers")
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        return Client(cluster)
    if scheduler.startswith("tcp://"):
        from distributed import Client

        try:
            return Client(scheduler, timeout=timeout)
        except OSError as err:
            raise ConnectionError(
                f"cannot reach the Dask scheduler {scheduler!r} within {timeout:g} s ({err}); "
                "start one with `dask scheduler` and workers with `dask worker "
                f"{scheduler}`, or use --scheduler none / local:N"
            ) from None
    raise ValueError(
        f"unknown scheduler {scheduler!r}: choices are 'none', 'local:N', 'tcp://HOST:PORT'"
    )


def close(client) -> None:
    """Close a client made by ``connect`` and its LocalCluster, if any."""
    if client is None:
        return
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def run(
    grid: Grid,
    client=None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    cancel: threading.Event | None = None,
) -> pd.DataFrame:
    """Run every cell of ``grid``; one row per cell, in grid order.

    client: None (every cell in this process, one after the other) or a ``distributed.Client``.
    out: JSONL (or ``.parquet``) file rows stream into as they finish; an existing file is an
    error unless ``resume=True``, which keeps its finished rows, skips their cells and runs the
    rest (error rows are run again; rows of other grids in the file are kept). Columns: model,
    method, bits, group_size, plan, one per metric, plan_label, key, error, seconds, worker.
    """
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a qviz.sweep.Grid, got {type(grid).__name__}")
    if out is not None and Path(out).exists() and not resume:
        raise FileExistsError(f"{out} exists: pass resume=True (--resume) or remove it")
    old = read_rows(out) if out is not None and resume else []
    done = {r["key"]: r for r in old if r.get("key") and not r.get("error")}
    keep = list({r["key"]: r for r in old if r.get("key") in done}.values())  # one row per key
    writer = RowWriter(out, keep)
    todo = [c for c in grid.cells if c.key not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="sweep", unit="cell",
               disable=not progress)  # fmt: skip
    try:
        rows = _run_local(todo, writer, bar, cancel) if client is None else (
            _run_dask(todo, client, writer, bar, cancel))  # fmt: skip
    finally:
        bar.close()
    by_key = {**done, **{r["key"]: r for r in rows}}
    return pd.DataFrame([by_key[c.key] for c in grid.cells])


def _error(cell: Cell, err: BaseException | str) -> dict:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return _row(cell, {}, error=text)


def _run_local(todo: list[Cell], writer: RowWriter, bar, cancel) -> list[dict]:
    rows = []
    for cell in todo:
        check_cancel(cancel, f"before cell {cell.plan_label} of {cell.model}")
        for attempt in (1, 2):  # a failed cell is tried once more, then recorded as an error
            try:
                row = run_cell(cell)
                break
            except Exception as err:
                row = _error(cell, err)
                if attempt == 2:
                    traceback.print_exc(file=sys.stderr)
        writer.add(_clean(row))
        rows.append(row)
        bar.update()
    return rows


def _run_dask(todo: list[Cell], client, writer: RowWriter, bar, cancel) -> list[dict]:
    from distributed import as_completed

    order = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in todo))}
    futures = {}
    for i, cell in enumerate(sorted(todo, key=lambda c: order[c.model])):
        fut = client.submit(
            run_cell, cell, key=f"qviz-cell-{cell.key}-{time.time_ns()}", pure=False,
            retries=1, priority=-order[cell.model] * 10_000 - i,
        )  # fmt: skip
        futures[fut] = cell
    rows = []
    try:
        for fut in as_completed(futures):
            check_cancel(cancel, "between cells")
            cell = futures[fut]
            try:
                row = fut.result()
            except Exception as err:  # after the retry, or the worker died too often
                row = _error(cell, err)
            writer.add(_clean(row))
            rows.append(row)
            bar.update()
    finally:
        for fut in futures:
            fut.cancel()
    return rows


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


__all__ = ["Cell", "Grid", "METRICS", "run", "connect", "close", "read_rows"]
