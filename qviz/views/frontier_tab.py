"""The memory frontier view: a ``qviz frontier --json`` or ``--csv`` table as weight memory
against bits per byte, one colour per model, the Pareto front as a line, in a Panel tab.

A missing, unreadable or corrupt file is a message in the page, never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import panel as pn
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from qviz.views.figure import TOOLS
from qviz.views.sweep_plots import pareto_front
from qviz.views.sweep_tab import FileTab

# the columns the chart needs (qviz.studies.frontier.COLUMNS has them all)
REQUIRED = ("model", "plan", "bits", "weight_mib", "bits_per_byte")
DEFAULT_OUT = os.environ.get("QVIZ_FRONTIER_OUT", "frontier.json")


class FrontierFileError(ValueError):
    """A frontier table that cannot be shown; the message names the file and the fault."""


def load_frontier(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a ``qviz frontier --json`` (its "rows"; a bare list of rows too) or
    ``--csv`` (a ``.csv`` name) output as a frame, one row per (model, plan). Raises
    FrontierFileError naming the file and what is wrong: missing, a folder, not JSON / CSV,
    no rows, missing columns, non-numeric memory or bits per byte."""
    p = Path(str(path).strip()).expanduser()
    if not str(path).strip():
        raise FrontierFileError("no file given: type the path of a `qviz frontier --json` file")
    if not p.exists():
        raise FrontierFileError(
            f"{p}: no such file (write one with `qviz frontier --json > {p.name}`)"
        )
    if p.is_dir():
        raise FrontierFileError(f"{p} is a folder: give the JSON or CSV file inside it")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FrontierFileError(f"{p}: not a text file (JSON or CSV expected)") from None
    if p.suffix == ".csv":
        try:
            frame = pd.read_csv(p)
        except Exception as err:
            raise FrontierFileError(
                f"{p}: not a readable CSV file ({type(err).__name__})"
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FrontierFileError(
                f"{p}: not JSON ({err.msg}, line {err.lineno}); a CSV table needs a .csv name"
            ) from None
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise FrontierFileError(f"{p}: no list of rows (`qviz frontier --json` writes 'rows')")
        frame = pd.DataFrame(rows)
    if frame.empty:
        raise FrontierFileError(f"{p}: no rows (an empty frontier table)")
    missing = [c for c in REQUIRED if c not in frame]
    if missing:
        raise FrontierFileError(
            f"{p}: not a qviz frontier table: no column {', '.join(map(repr, missing))} "
            f"(a frontier row has {', '.join(REQUIRED)}, ...)"
        )
    for col in ("weight_mib", "bits_per_byte"):
        try:
            frame[col] = frame[col].astype(float)
        except (TypeError, ValueError):
            raise FrontierFileError(f"{p}: the {col} column holds non-numbers") from None
    return frame


def frontier_figure(frame: pd.DataFrame, height: int = 360, width: int = 640):
    """Weight memory (x, MiB) vs bits per byte (y, lower is better), one colour per model,
    the Pareto front (``sweep_plots.pareto_front``) as a grey line; hover: model, plan, MiB,
    bits per byte, fact accuracy and verdict when the table has them."""
    ok = frame[frame["weight_mib"].notna() & frame["bits_per_byte"].notna()]
    models = list(dict.fromkeys(ok["model"]))
    colors = {m: Category10_10[i % 10] for i, m in enumerate(models)}
    data = {
        "mib": ok["weight_mib"].tolist(),
        "bpb": ok["bits_per_byte"].tolist(),
        "model": ok["model"].astype(str).tolist(),
        "plan": ok["plan"].astype(str).tolist(),
        "facts": ok["fact_accuracy"].tolist() if "fact_accuracy" in ok else [None] * len(ok),
        "verdict": ok["verdict"].astype(str).tolist() if "verdict" in ok else ["-"] * len(ok),
        "color": [colors[m] for m in ok["model"]],
    }
    front = pareto_front(data["mib"], data["bpb"], higher_is_better=False)
    fig = figure(
        title="Weight memory vs bits per byte", height=height, width=width, tools=TOOLS,
        toolbar_location="above",
    )  # fmt: skip
    fig.line([data["mib"][i] for i in front], [data["bpb"][i] for i in front], color="#999999")
    src = ColumnDataSource(data, name="qviz_frontier")
    fig.scatter("mib", "bpb", source=src, size=10, fill_color="color", line_color="black")
    fig.xaxis.axis_label = "weight memory (MiB)"
    fig.yaxis.axis_label = "bits per byte (lower is better)"
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("model", "@model"),
                ("plan", "@plan"),
                ("MiB", "@mib{0.0}"),
                ("bits/byte", "@bpb{0.000}"),
                ("facts", "@facts{0.00}"),
                ("verdict", "@verdict"),
            ]
        )
    )
    return fig


class FrontierTab(FileTab):
    """Load a ``qviz frontier`` table; show memory against bits per byte with its front."""

    file_error = FrontierFileError

    def __init__(self, path: str | None = None, **params) -> None:
        label = "Frontier table (qviz frontier --json or --csv)"
        super().__init__(path, DEFAULT_OUT, label, "qviz-frontier", **params)
        self.chart = pn.Column()
        self.load_if_there()

    read = staticmethod(load_frontier)

    def show(self, frame: pd.DataFrame) -> None:
        self.chart[:] = [pn.pane.Bokeh(frontier_figure(frame))]

    def summary(self, frame: pd.DataFrame, path: str) -> str:
        models = ", ".join(dict.fromkeys(frame["model"].astype(str)))
        return f"{Path(path).name}: {len(frame)} rows; models {models}"

    def clear(self) -> None:
        self.chart[:] = []

    def __panel__(self):
        return pn.Column(pn.Row(self.path_input, self.load_button), self.message, self.chart)
