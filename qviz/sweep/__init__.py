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

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from qviz.cancel import check_cancel
from qviz.sweep.grid import (  # noqa: F401  (the package's API)
    CONNECT_TIMEOUT,
    KEY_COLUMNS,
    METRICS,
    N_FACTS,
    PLAN_KINDS,
    PPL_CHARS,
    PROMPT,
    TARGET,
    Cell,
    Grid,
    calibration_id,
    check_model,
    make_plan,
    model_fingerprint,
    parse_plan,
)
from qviz.sweep.rows import RowWriter, _clean, _row, read_rows  # noqa: F401

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


def add_sweep_parser(sub):
    """Add ``qviz sweep`` to the cli's subparsers (see qviz.sweep.cli)."""
    from qviz.sweep.cli import add_sweep_parser as add

    return add(sub)


__all__ = ["Cell", "Grid", "METRICS", "run", "connect", "close", "read_rows"]
