"""qviz.sweep: grids validated before any task, in-process vs LocalCluster rows, resume, errors."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from qviz import sweep
from qviz.sweep import Grid, read_rows, run

# layer 0 only: a cell materializes 7 Linears, so it takes seconds on the embedded model
TINY = dict(
    models=["smollm2-135m"],
    methods=["rtn"],
    bits=[2, 8],
    group_sizes=[128],
    plans=["only_first:1"],
    metrics=["verdict", "perplexity"],
)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("models", ["smolm2"], ["'smolm2'", "smollm2-135m"]),
        ("methods", ["awq"], ["'awq'", "'rtn'", "'gptq'"]),
        ("plans", ["protect-first:2"], ["'protect-first:2'", "protect_first:N"]),
        ("plans", ["only_first"], ["'only_first'", "only_first:N"]),
        ("metrics", ["accuracy"], ["'accuracy'", "'perplexity'", "'facts'"]),
        ("bits", [9], ["bits=9"]),
        ("group_sizes", [-4], ["-4"]),
    ],
)
def test_bad_input_is_refused_naming_value_and_choices(field, value, words, monkeypatch):
    monkeypatch.setattr(sweep, "run_cell", lambda cell: pytest.fail("a task started"))
    with pytest.raises(ValueError) as err:
        run(Grid(**{**TINY, field: value}))
    for w in words:
        assert w in str(err.value)


def test_grid_cells_and_keys():
    g = Grid(["smollm2-135m"], ["rtn", "hqq"], [2, 4], [32, 0], ["uniform", "protect_first:2"])
    assert len(g) == 2 * 2 * 2 * 2
    assert len({c.key for c in g.cells}) == len(g)
    assert {c.group_size for c in g.cells} == {32, None}
    labels = {c.plan_label for c in g.cells}
    assert "rtn2-g32 L0:rtn8-g32 L1:rtn8-g32" in labels and "hqq4-ch" in labels
    # same cell, other metric set: another key (a row of one never stands for the other)
    other = Grid(["smollm2-135m"], ["rtn"], [2], [32], ["uniform"], ["verdict"])
    same = Grid(["smollm2-135m"], ["rtn"], [2], [32], ["uniform"], ["perplexity", "verdict"])
    assert other.cells[0].key != same.cells[0].key
    assert same.cells[0].key in {c.key for c in g.cells}


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ConnectionError, match="tcp://127.0.0.1:9"):
        sweep.connect("tcp://127.0.0.1:9", timeout=1)
    with pytest.raises(ValueError, match="'local:N'"):
        sweep.connect("locall:2")


def _parser():
    p = argparse.ArgumentParser()
    sweep.add_sweep_parser(p.add_subparsers(dest="cmd"))
    return p


def test_cli_refuses_bad_method(tmp_path, capsys):
    args = _parser().parse_args(
        ["sweep", "--method", "rtn,nope", "--bits", "2", "--out", str(tmp_path / "x.jsonl")]
    )
    assert args.func(args) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_failed_cell_retried_once_then_an_error_row(tmp_path, monkeypatch):
    calls = []

    def flaky(cell):
        calls.append(cell.bits)
        if cell.bits == 2:
            raise RuntimeError("boom")
        return sweep._row(cell, {"verdict": "healthy", "perplexity": 1.0})

    monkeypatch.setattr(sweep, "run_cell", flaky)
    frame = run(Grid(**TINY), out=tmp_path / "s.jsonl", progress=False)
    assert calls == [2, 2, 8]
    assert frame["error"][0] == "RuntimeError: boom" and frame["error"].isna()[1]
    assert [r["error"] for r in read_rows(tmp_path / "s.jsonl")] == ["RuntimeError: boom", None]
    # resume runs the error cell again and keeps one row per key
    monkeypatch.setattr(sweep, "run_cell", lambda c: sweep._row(c, {"verdict": "x"}))
    frame = run(Grid(**TINY), out=tmp_path / "s.jsonl", resume=True, progress=False)
    rows = read_rows(tmp_path / "s.jsonl")
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2
    assert frame["verdict"].tolist() == ["x", "healthy"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "none.jsonl"
    return out, run(Grid(**TINY), client=None, out=out, progress=False)


@pytest.mark.model
def test_serial_rows(serial):
    out, frame = serial
    assert list(frame.columns[:7]) == [
        "model", "method", "bits", "group_size", "plan", "perplexity", "verdict"
    ]  # fmt: skip
    assert frame["error"].isna().all(), frame["error"].tolist()
    assert frame["bits"].tolist() == [2, 8]
    assert frame["verdict"].isin(["healthy", "signal degradation", "computation collapse"]).all()
    ppl = frame["perplexity"].tolist()
    assert all(math.isfinite(p) and p > 1 for p in ppl) and ppl[0] > ppl[1]
    assert [r["key"] for r in read_rows(out)] == frame["key"].tolist()


@pytest.mark.model
def test_local_cluster_gives_the_same_rows(serial):
    from distributed import Client, LocalCluster

    _, ref = serial
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        frame = run(Grid(**TINY), client=client, progress=False)
    assert frame["error"].isna().all(), frame["error"].tolist()
    cols = ["model", "method", "bits", "group_size", "plan", "verdict", "key"]
    assert frame[cols].to_dict("records") == ref[cols].to_dict("records")
    assert frame["perplexity"].tolist() == pytest.approx(ref["perplexity"].tolist(), rel=1e-4)


@pytest.mark.model
def test_resume_computes_only_missing_cells(serial, tmp_path, monkeypatch):
    out, ref = serial
    first = read_rows(out)[0]
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps(first) + "\n" + '{"model": "smollm2-1', encoding="utf-8")  # torn
    ran = []
    real = sweep.run_cell

    def counting(cell):
        ran.append(cell.key)
        return real(cell)

    monkeypatch.setattr(sweep, "run_cell", counting)
    with pytest.raises(FileExistsError, match="resume"):
        run(Grid(**TINY), out=part)
    frame = run(Grid(**TINY), out=part, resume=True, progress=False)
    assert ran == [ref["key"][1]]
    rows = read_rows(part)
    assert [r["key"] for r in rows] == ref["key"].tolist()
    assert frame["verdict"].tolist() == ref["verdict"].tolist()
    ran.clear()
    again = run(Grid(**TINY), out=part, resume=True, progress=False)
    assert ran == [] and len(read_rows(part)) == 2
    assert again["perplexity"].tolist() == pytest.approx(ref["perplexity"].tolist())


def test_heatmap_data_and_figures():
    import pandas as pd
    from bokeh.embed import json_item

    from qviz.views.sweep_plots import VERDICT_COLORS, heatmap_data, sweep_heatmaps

    frame = pd.DataFrame(
        {
            "model": ["m"] * 5,
            "method": ["rtn", "rtn", "rtn", "hqq", "hqq"],
            "bits": [2, 2, 8, 2, 8],
            "group_size": [32, None, 32, 32, 32],
            "plan": ["uniform"] * 5,
            "verdict": ["computation collapse", "signal degradation", "healthy", None, "healthy"],
            "perplexity": [900.0, 80.0, 20.0, None, 21.0],
            "error": [None, None, None, "RuntimeError: boom", None],
        }
    )
    data = heatmap_data(frame, "rtn")
    assert data["gs"] == ["g32", "ch", "g32"] and data["bits"] == ["2", "2", "8"]
    assert data["color"] == [VERDICT_COLORS[v] for v in frame["verdict"][:3]]
    assert heatmap_data(frame, "hqq")["verdict"] == ["error", "healthy"]
    layout = sweep_heatmaps(frame)
    assert [f.title.text for f in layout.children] == [
        "rtn: verdict (uniform)",
        "hqq: verdict (uniform)",
    ]
    assert list(layout.children[0].x_range.factors) == ["g32", "ch"]
    json_item(layout)  # serializes


def dying_cell(cell):
    """A cheap stand-in for run_cell on the workers: the first 2-bit cell kills its worker
    process (as an out-of-memory kill would), every other cell returns at once."""
    import os
    from pathlib import Path

    marker = Path(os.environ["QVIZ_TEST_KILL_MARKER"])
    if cell.bits == 2 and not marker.exists():
        marker.write_text("killed")
        os._exit(1)
    return sweep._row(cell, {"verdict": "healthy", "perplexity": float(cell.bits)})


def test_a_worker_killed_mid_sweep_is_survived(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    marker = tmp_path / "killed"
    monkeypatch.setenv("QVIZ_TEST_KILL_MARKER", str(marker))
    monkeypatch.setattr(sweep, "run_cell", dying_cell)
    grid = Grid(**{**TINY, "bits": [2, 3, 4, 8]})
    out = tmp_path / "k.jsonl"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        frame = run(grid, client=client, out=out, progress=False)
    assert marker.exists()  # a worker did die
    assert frame["error"].isna().all(), frame["error"].tolist()
    assert frame["perplexity"].tolist() == [2.0, 3.0, 4.0, 8.0]
    rows = read_rows(out)
    assert sorted(r["bits"] for r in rows) == [2, 3, 4, 8]


def test_parquet_out_streams_and_resumes(tmp_path, monkeypatch):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        monkeypatch.setattr(sweep, "run_cell", lambda c: pytest.fail("a task started"))
        with pytest.raises(ValueError, match="needs pyarrow"):
            run(Grid(**TINY), out=tmp_path / "s.parquet")
        return
    monkeypatch.setattr(sweep, "run_cell", lambda c: sweep._row(c, {"verdict": "healthy"}))
    out = tmp_path / "s.parquet"
    frame = run(Grid(**TINY), out=out, progress=False)
    assert [r["key"] for r in read_rows(out)] == frame["key"].tolist()
    monkeypatch.setattr(sweep, "run_cell", lambda c: pytest.fail("a finished cell ran again"))
    assert run(Grid(**TINY), out=out, resume=True, progress=False)["verdict"].tolist() == [
        "healthy", "healthy"
    ]  # fmt: skip


def test_pareto_front_and_figure():
    import pandas as pd
    from bokeh.embed import json_item

    from qviz.views.sweep_plots import pareto_front, sweep_pareto

    # (mib, perplexity): b is beaten by c (less memory, lower perplexity)
    mib, ppl = [10.0, 30.0, 20.0, 40.0], [900.0, 50.0, 40.0, 20.0]
    assert pareto_front(mib, ppl, higher_is_better=False) == [0, 2, 3]
    assert pareto_front(mib, [0.1, 0.3, 0.4, 0.9], higher_is_better=True) == [0, 2, 3]
    frame = pd.DataFrame(
        {"plan_label": list("abcd"), "mib": mib, "perplexity": ppl, "error": [None] * 4,
         "verdict": ["computation collapse", "healthy", "healthy", "healthy"]}
    )  # fmt: skip
    fig = sweep_pareto(frame)
    assert fig.select_one({"name": "qviz_sweep_pareto"}).data["label"] == list("abcd")
    json_item(fig)
    with pytest.raises(ValueError, match="'facts'"):
        sweep_pareto(frame, quality="facts")


def test_connect_local_and_close():
    client = sweep.connect("local:2")
    try:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        assert set(client.nthreads().values()) == {1}
    finally:
        sweep.close(client)
    assert client.status == "closed"
    assert sweep.connect("none") is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.model
def test_cli_on_a_real_tcp_cluster(serial, tmp_path):
    """`dask scheduler` and `dask worker` as their own processes (as on a cluster, here bound to
    127.0.0.1), `qviz sweep --scheduler tcp://...` as a third: the same rows as in-process."""
    import os
    import subprocess
    import sys
    import time

    _, ref = serial
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"]
            + ["--port", str(port), "--dashboard-address", ":0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the scheduler to listen (a join-style guard, not a timing test)
            try:
                sweep.close(sweep.connect(address, timeout=2))
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the dask scheduler never started"
                time.sleep(0.5)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1"]
                + ["--nworkers", "1", "--dashboard-address", ":0", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        out = tmp_path / "tcp.jsonl"
        cmd = [sys.executable, "-m", "qviz.cli", "sweep", "--models", "smollm2-135m"]
        cmd += ["--method", "rtn", "--bits", "2,8", "--group-size", "128"]
        cmd += ["--plans", "only_first:1", "--metrics", "verdict,perplexity"]
        cmd += ["--scheduler", address, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = read_rows(out)
        assert [r["error"] for r in rows] == [None, None]
        workers = {r["worker"] for r in rows}
        assert all(w.split(":")[1] != str(os.getpid()) for w in workers)  # ran on the worker
        got = {r["key"]: r for r in rows}
        for _, want in ref.iterrows():
            assert got[want["key"]]["verdict"] == want["verdict"]
            assert got[want["key"]]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    finally:
        for p in procs[::-1]:
            p.terminate()
            p.wait(timeout=30)
