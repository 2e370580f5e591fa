"""Generate notebooks/08_sweeps.ipynb (outputs empty), like notebooks/_build.py does the others.

.venv/bin/python notebooks/_build_sweeps.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _build import BOKEH_SETUP, build  # noqa: E402

SWEEPS = [
    (
        "md",
        """\
        # 8. Sweeps: a grid of plans on Dask

        Which method, bit-width, group size and per-layer plan keeps a model out of collapse?
        That is a grid of cells, each a quantized model measured by a few metrics.
        `qviz.sweep.Grid` holds the choices (checked before anything runs) and `qviz.sweep.run`
        runs every cell, here on a `LocalCluster` of 2 worker processes (`--scheduler local:2`
        on the command line); a `tcp://HOST:PORT` scheduler runs the same grid on a cluster.
        Each worker loads the model once; rows stream into a JSONL file as cells finish, so a
        killed run resumes with `resume=True` and computes only the missing cells.""",
    ),
    ("code", BOKEH_SETUP),
    (
        "code",
        """\
        import tempfile
        from pathlib import Path

        from distributed import Client, LocalCluster

        from qviz.sweep import Grid, read_rows, run

        # a tiny grid: layer 0 only quantized, so each cell takes seconds on a laptop CPU
        grid = Grid(
            models=["smollm2-135m"],
            methods=["rtn"],
            bits=[2, 8],
            group_sizes=[32, 128],
            plans=["only_first:1"],
            metrics=["verdict", "perplexity", "mib"],
        )
        print(len(grid), "cells")""",
    ),
    (
        "code",
        """\
        out = Path(tempfile.mkdtemp()) / "sweep.jsonl"
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):
            frame = run(grid, client=client, out=out, progress=False)
        frame[["model", "method", "bits", "group_size", "plan", "verdict", "perplexity"]]""",
    ),
    (
        "code",
        """\
        assert len(frame) == len(grid) and frame["error"].isna().all()
        assert len(read_rows(out)) == len(grid)  # every finished row is on disk
        # resuming a finished sweep runs nothing and returns the same table
        again = run(grid, out=out, resume=True, progress=False)
        assert again["key"].tolist() == frame["key"].tolist()""",
    ),
    (
        "md",
        """\
        Bits (y) by group size (x), one heatmap per method, coloured by the verdict: green
        healthy, orange signal degradation, red computation collapse. Hover a cell for its
        perplexity.""",
    ),
    (
        "code",
        """\
        from qviz.views.sweep_plots import sweep_heatmaps

        show(sweep_heatmaps(frame))""",
    ),
    (
        "md",
        """\
        Weight memory against perplexity, one point per cell coloured by its verdict; the grey
        line is the Pareto front (no other cell has both less memory and lower perplexity).""",
    ),
    (
        "code",
        """\
        from qviz.views.sweep_plots import sweep_pareto

        show(sweep_pareto(frame, quality="perplexity"))""",
    ),
    (
        "md",
        """\
        The same grid from a shell, on one machine or on a cluster:

            qviz sweep --models smollm2-135m --method rtn,hqq --bits 2,3,4,8 \\
                --group-size 32,128 --plans uniform,protect_first:2 \\
                --metrics verdict,perplexity --scheduler local:2 --out sweep.jsonl

            dask scheduler                      # on one machine: tcp://HOST:8786
            dask worker tcp://HOST:8786         # on each worker machine
            qviz sweep ... --scheduler tcp://HOST:8786 --out sweep.jsonl --resume""",
    ),
]


def main() -> None:
    nbformat.write(build(SWEEPS), HERE / "08_sweeps.ipynb")
    print("wrote", HERE / "08_sweeps.ipynb")


if __name__ == "__main__":
    main()
