"""The memory frontier tab: a table as ``qviz frontier --json`` / ``--csv`` write it (from
``memory_frontier`` on tiny in-process models) drawn with its Pareto front; bad files are
messages."""

from __future__ import annotations

import html
import json

import pytest
from bokeh.models import ColumnDataSource, GlyphRenderer

from qviz.studies.frontier import memory_frontier
from qviz.views.frontier_tab import FrontierFileError, FrontierTab, load_frontier
from tests.test_frontier import PLANS, tiny_lab


@pytest.fixture(scope="module")
def frame():
    labs = [tiny_lab("llama"), tiny_lab("gpt2")]
    return memory_frontier(labs, PLANS, max_chars=80, n_facts=4, window=32)


def write_json(frame, path):
    """As ``qviz frontier --json`` writes it (qviz/cli.py)."""
    rows = json.loads(frame.to_json(orient="records"))
    path.write_text(json.dumps({"rows": rows, "bigger_at_4_vs_smaller_at_8": []}, indent=1))
    return path


def chart(tab) -> tuple[dict, list]:
    fig = tab.chart[0].object
    src = {s.name: s.data for s in fig.select({"type": ColumnDataSource})}["qviz_frontier"]
    line = [r for r in fig.select({"type": GlyphRenderer}) if type(r.glyph).__name__ == "Line"]
    return src, list(zip(line[0].data_source.data["x"], line[0].data_source.data["y"], strict=True))


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_frontier_table_shows_as_memory_vs_bits_per_byte_with_its_front(frame, tmp_path, fmt):
    if fmt == "json":
        path = write_json(frame, tmp_path / "frontier.json")
    else:
        path = tmp_path / "frontier.csv"
        path.write_text(frame.to_csv(index=False))  # as ``qviz frontier --csv`` prints it
    tab = FrontierTab(str(path))  # an existing file loads at once
    assert tab.frame is not None and len(tab.frame) == 6
    assert f"frontier.{fmt}: 6 rows; models tiny-llama, tiny-gpt2" in tab.message.object
    src, front = chart(tab)
    assert list(src["plan"]) == frame["plan"].tolist()
    assert list(src["mib"]) == pytest.approx(frame["weight_mib"].tolist())
    assert list(src["bpb"]) == pytest.approx(frame["bits_per_byte"].tolist())
    # the line joins exactly the rows memory_frontier marked on the front, by memory
    on = frame[frame["pareto"]].sort_values(["weight_mib", "bits_per_byte"])
    assert [x for x, _ in front] == pytest.approx(on["weight_mib"].tolist())
    assert [y for _, y in front] == pytest.approx(on["bits_per_byte"].tolist())
    assert 1 <= len(front) < 6
    assert len(set(src["color"])) == 2  # one colour per model


def test_bad_and_corrupt_files_are_messages(frame, tmp_path):
    tab = FrontierTab(str(tmp_path / "none.json"))
    assert tab.frame is None and tab.chart.objects == []
    cases = {
        "missing.json": (None, "no such file"),
        "dir.json": ("DIR", "is a folder"),
        "torn.json": ('{"rows": [{"model": "a", ', "not JSON"),
        "list.json": ('{"rows": 3}', "no list of rows"),
        "empty.json": ('{"rows": []}', "no rows"),
        "cols.csv": ("model,plan\na,b\n", "no column 'bits'"),
        "nan.csv": ("model,plan,bits,weight_mib,bits_per_byte\na,b,4,x,1\n", "non-numbers"),
        "bin.json": (b"\xff\xfe\x00", "not a text file"),
    }
    for name, (content, needle) in cases.items():
        p = tmp_path / name
        if content == "DIR":
            p.mkdir()
        elif isinstance(content, bytes):
            p.write_bytes(content)
        elif content is not None:
            p.write_text(content)
        with pytest.raises(FrontierFileError, match=needle):
            load_frontier(p)
        assert tab.load(str(p)) is False
        assert (
            html.escape(needle) in tab.message.object and "qviz-sweep-error" in tab.message.object
        )
        assert tab.frame is None and tab.chart.objects == []
    assert tab.load(str(write_json(frame, tmp_path / "ok.json"))) is True  # and back to a chart
    assert len(tab.chart.objects) == 1
