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


def pareto_front(mib: list[float], quality: list[float], higher_is_better: bool) -> list[int]:
    """Indices of the cells no other cell beats on both memory (less) and quality, by memory
    (``qviz.studies.frontier.pareto_mask``, the one Pareto rule)."""
    from qviz.studies.frontier import pareto_mask

    sign = -1.0 if higher_is_better else 1.0
    on = pareto_mask(mib, [sign * q for q in quality])
    return sorted((i for i in range(len(mib)) if on[i]), key=lambda i: (mib[i], sign * quality[i]))


def sweep_pareto(frame: pd.DataFrame, quality: str = "perplexity", height: int = 300,
                 width: int = 460):  # fmt: skip
    """Weight memory (x, MiB; the ``mib`` metric) vs ``quality`` (y: perplexity, lower is
    better, on a log axis; or facts / cka, higher is better), one point per finished cell
    coloured by verdict, the Pareto front as a line."""
    for col in ("mib", quality):
        if col not in frame:
            raise ValueError(f"the sweep has no {col!r} column: add it to the grid's metrics")
    ok = frame[frame["error"].isna() & frame["mib"].notna() & frame[quality].notna()]
    verdict = ok["verdict"] if "verdict" in ok else pd.Series(["-"] * len(ok), index=ok.index)
    data = {
        "mib": ok["mib"].astype(float).tolist(),
        "q": ok[quality].astype(float).tolist(),
        "label": ok["plan_label"].tolist() if "plan_label" in ok else ok["plan"].tolist(),
        "verdict": verdict.tolist(),
        "color": [VERDICT_COLORS.get(v, "#777777") for v in verdict],
    }
    front = pareto_front(data["mib"], data["q"], higher_is_better=quality != "perplexity")
    fig = figure(
        title=f"Memory vs {quality}", height=height, width=width, tools=TOOLS,
        y_axis_type="log" if quality == "perplexity" else "linear", toolbar_location="above",
    )  # fmt: skip
    fig.line([data["mib"][i] for i in front], [data["q"][i] for i in front], color="#999999")
    src = ColumnDataSource(data, name="qviz_sweep_pareto")
    fig.scatter("mib", "q", source=src, size=10, fill_color="color", line_color="black")
    fig.xaxis.axis_label = "weight memory (MiB)"
    fig.yaxis.axis_label = quality
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("plan", "@label"),
                ("verdict", "@verdict"),
                ("MiB", "@mib{0.0}"),
                (quality, "@q{0.000}"),
            ]
        )  # fmt: skip
    )
    return fig
