"""Figures of a ``qviz.sweep`` results table: bits x group size heatmaps, one per method."""

from __future__ import annotations

import pandas as pd
from bokeh.layouts import row
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from qviz.views.figure import TOOLS

VERDICT_COLORS = {
    "healthy": "#2ca02c",
    "signal degradation": "#ff9f1c",
    "computation collapse": "#d62728",
    "target not predicted": "#9e9e9e",
    "error": "#444444",
}


def _gs(value) -> str:
    return "ch" if value is None or pd.isna(value) else f"g{int(value)}"


def heatmap_data(frame: pd.DataFrame, method: str, plan: str | None = None) -> dict:
    """Cells of one method (and plan: the first one when None): group size (x), bits (y),
    verdict colour; a row with an error shows as "error"."""
    sub = frame[frame["method"] == method]
    if plan is None and len(sub):
        plan = sub["plan"].iloc[0]
    sub = sub[sub["plan"] == plan]
    error = sub["error"] if "error" in sub else pd.Series([None] * len(sub), index=sub.index)
    verdict = sub["verdict"] if "verdict" in sub else pd.Series(["-"] * len(sub), index=sub.index)
    shown = [("error" if isinstance(e, str) else v) for v, e in zip(verdict, error, strict=True)]
    ppl = sub["perplexity"] if "perplexity" in sub else pd.Series([float("nan")] * len(sub))
    return {
        "gs": [_gs(g) for g in sub["group_size"]],
        "bits": [str(int(b)) for b in sub["bits"]],
        "verdict": shown,
        "color": [VERDICT_COLORS.get(v, "#dddddd") for v in shown],
        "perplexity": [float(p) if p is not None else float("nan") for p in ppl],
        "model": list(sub["model"]),
    }


def sweep_heatmaps(frame: pd.DataFrame, plan: str | None = None, size: int = 260):
    """A row of heatmaps, one per method: group size (x) by bits (y), coloured by verdict."""
    figs = []
    gs_order = [_gs(g) for g in sorted(frame["group_size"].dropna().unique())]
    if frame["group_size"].isna().any():
        gs_order.append("ch")
    bits_order = [str(int(b)) for b in sorted(frame["bits"].unique())]
    for method in dict.fromkeys(frame["method"]):
        data = heatmap_data(frame, method, plan)
        fig = figure(
            title=f"{method}: verdict ({plan or frame['plan'].iloc[0]})",
            x_range=gs_order, y_range=bits_order, height=size, width=size,
            tools=TOOLS, toolbar_location=None,
        )  # fmt: skip
        src = ColumnDataSource(data, name=f"qviz_sweep_{method}")
        fig.rect("gs", "bits", 0.95, 0.95, source=src, fill_color="color", line_color=None,
                 legend_field="verdict")  # fmt: skip
        fig.xaxis.axis_label = "group size"
        fig.yaxis.axis_label = "bits"
        fig.legend.label_text_font_size = "7pt"
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("bits", "@bits"),
                    ("group", "@gs"),
                    ("verdict", "@verdict"),
                    ("perplexity", "@perplexity{0.00}"),
                ]
            )
        )
        figs.append(fig)
    return row(*figs)
