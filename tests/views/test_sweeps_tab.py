"""The dashboard's sweep tab: a file written by ``qviz.sweep.run`` (on a tiny in-process model)
shown as the sweep_plots heatmaps and Pareto chart; bad and corrupt files are messages."""

from __future__ import annotations

import json

import pytest
from bokeh.models import ColumnDataSource

import qviz
from qviz import sweep
from qviz.views.sweep_plots import heatmap_data
from qviz.views.sweep_tab import SweepFileError, SweepTab, load_sweep
from tests.conftest import CharTokenizer, tiny_llama

GRID = dict(
    models=["smollm2-135m"],  # a valid name; cached_lab gives the tiny model instead
    methods=["rtn", "hqq"],
    bits=[2, 8],
    group_sizes=[32, 0],
    plans=["uniform"],
    metrics=["verdict", "mib", "perplexity"],
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(path, frame) of a real sweep on the tiny model, written as JSONL by ``sweep.run``."""
    mp = pytest.MonkeyPatch()
    lab = qviz.Lab(tiny_llama(), CharTokenizer(), name="tiny")
    mp.setattr(sweep, "cached_lab", lambda model: lab)
    mp.setattr(sweep, "TARGET", "a")  # one character: one token of CharTokenizer
    mp.setattr(sweep, "PPL_CHARS", 60)
    out = tmp_path_factory.mktemp("sweep") / "sweep.jsonl"
    try:
        frame = sweep.run(sweep.Grid(**GRID), out=out, progress=False)
    finally:
        mp.undo()
    assert frame["error"].isna().all(), frame["error"].tolist()
    return out, frame


def sources(pane) -> dict:
    return {s.name: s.data for s in pane.object.select({"type": ColumnDataSource})}


def test_a_sweep_file_shows_as_the_heatmaps_and_the_pareto_chart(written):
    out, frame = written
    tab = SweepTab(str(out))  # an existing file loads at once
    assert tab.frame is not None and len(tab.frame) == len(frame) == 8
    assert "sweep.jsonl: 8 cells (0 errors)" in tab.message.object
    assert tab.quality_select.options == ["perplexity"] and tab.plan_select.value == "uniform"
    heat = sources(tab.heatmaps[0])
    assert sorted(heat) == ["qviz_sweep_hqq", "qviz_sweep_rtn"]
    for method in ("rtn", "hqq"):  # the cells of the run's own frame, verdict for verdict
        want = heatmap_data(frame, method)
        got = heat[f"qviz_sweep_{method}"]
        ref = frame[frame["method"] == method]["verdict"].tolist()
        assert list(got["verdict"]) == want["verdict"] == ref
        assert list(got["gs"]) == want["gs"] and sorted(set(got["gs"])) == ["ch", "g32"]
    pareto = sources(tab.pareto[0])["qviz_sweep_pareto"]
    assert list(pareto["mib"]) == pytest.approx(frame["mib"].tolist())
    assert list(pareto["q"]) == pytest.approx(frame["perplexity"].tolist())


def test_parquet_reads_like_jsonl(written, tmp_path):
    pytest.importorskip("pyarrow")
    out, frame = written
    pq = tmp_path / "sweep.parquet"
    frame.to_parquet(pq, index=False)
    got = load_sweep(pq)
    assert got["verdict"].tolist() == frame["verdict"].tolist()
    tab = SweepTab(str(tmp_path / "none.jsonl"))
    assert tab.frame is None and tab.message.object == ""  # nothing there: nothing said yet
    assert tab.load(str(pq)) and len(sources(tab.heatmaps[0])) == 2


def test_a_torn_last_line_is_skipped(written, tmp_path):
    out, frame = written
    torn = tmp_path / "torn.jsonl"
    torn.write_text(out.read_text() + '{"model": "smollm2-1', encoding="utf-8")
    assert len(load_sweep(torn)) == len(frame)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.jsonl", None, ["missing.jsonl: no such file"]),
        ("empty.jsonl", "", ["no rows"]),
        ("bad.jsonl", '{"model": "m"}\nnot json at all\n{"model": "m"}\n', ["line 2 is not JSON"]),
        ("list.jsonl", "[1, 2]\n", ["line 1 is not a JSON object"]),
        ("cols.jsonl", '{"model": "m", "bits": 2}\n', ["not a qviz sweep file", "'method'"]),
        (
            "bits.jsonl",
            json.dumps(dict(model="m", method="rtn", bits="two", group_size=32, plan="uniform"))
            + "\n",
            ["bits column"],
        ),  # fmt: skip
        ("bin.jsonl", b"\xff\xfe\x00garbage", ["not a text file"]),
        ("bad.parquet", b"PAR1 not really", ["not a readable Parquet file"]),
    ],
)
def test_bad_and_corrupt_files_are_messages_in_the_tab(tmp_path, name, content, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    tab = SweepTab(str(tmp_path / "none.jsonl"))
    assert tab.load(str(path)) is False and tab.frame is None
    msg = tab.message.object
    assert "qviz-sweep-error" in msg and "Traceback" not in msg
    for w in words:
        assert w in str(err.value) and w.replace("'", "&#x27;") in msg
    assert len(tab.heatmaps) == 0 and len(tab.pareto) == 0


def test_a_folder_and_a_sweep_without_memory_say_so(written, tmp_path):
    out, frame = written
    with pytest.raises(SweepFileError, match="is a folder"):
        load_sweep(tmp_path)
    no_mib = tmp_path / "no_mib.jsonl"
    no_mib.write_text(frame.drop(columns=["mib"]).to_json(orient="records", lines=True))
    tab = SweepTab(str(no_mib))
    assert tab.frame is not None and len(sources(tab.heatmaps[0])) == 2
    assert "no &#x27;mib&#x27; column" in tab.pareto[0].object
