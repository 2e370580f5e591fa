"""Figures of the study's sweeps: causal tracing (layer x token) and memory vs accuracy."""

from __future__ import annotations

import html

import numpy as np
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper, Range1d
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from qviz.results import PatchGrid
from qviz.views.figure import (
    QUANT_COLOR,
    SELECT_COLOR,
    TOOLS,
    Plot,
    _heatmap_figure,
    _markers,
    _set_range,
)


# causal tracing -------------------------------------------------------------------------------
def patch_data(grid: PatchGrid | None) -> dict:
    """Cells of the [L, T] grid: position (x), layer (y), recovery (prob when undefined)."""
    if grid is None:
        return {k: [] for k in ("pos", "layer", "value", "prob", "token")}
    prob = np.asarray(grid.prob, dtype=float)
    value = np.asarray(grid.recovery, dtype=float) if grid.recovery is not None else prob
    layer, pos = np.indices(prob.shape)
    return {
        "pos": pos.ravel(),
        "layer": layer.ravel(),
        "value": value.ravel(),
        "prob": prob.ravel(),
        "token": [html.escape(repr(grid.tokens[t])) for t in pos.ravel()],
    }


def patch_plot(grid: PatchGrid | None = None, height: int = 300, width: int = 460) -> Plot:
    """Causal-tracing recovery, token position (x) by decoder layer (y)."""
    fig = _heatmap_figure("Causal tracing: recovery", "token", "decoder layer", height, width)
    src = ColumnDataSource(patch_data(None), name="qviz_patch")
    mapper = LinearColorMapper(
        palette=Viridis256, low=0.0, high=1.0, low_color="#2b2b2b", high_color="#fde725"
    )
    fig.rect(
        "pos", "layer", 1, 1, source=src, fill_color={"field": "value", "transform": mapper},
        line_color=None,
    )  # fmt: skip
    fig.add_layout(ColorBar(color_mapper=mapper, width=10), "right")
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("layer", "@layer"),
                ("token", "@token (@pos)"),
                ("value", "@value{0.000}"),
                ("p(target)", "@prob{0.0000}"),
            ]
        )
    )
    fig.xaxis.major_label_orientation = 0.8
    plot = Plot(fig, {"patch": src}, _markers(fig, ("width",)), {"mapper": mapper})
    update_patch(plot, grid)
    return plot


def patch_title(grid: PatchGrid | None) -> str:
    """The heatmap's title: what the colour means for ``grid``."""
    if grid is None:
        return "Causal tracing: not run yet"
    what = "recovery" if grid.defined else "p(target), recovery undefined"
    win = f", window {grid.window}" if grid.window != 1 else ""
    return (
        f"Causal tracing {grid.component} ({grid.direction}{win}): {what} of {grid.target!r}, "
        f"{grid.plan_label}"
    )


def update_patch(plot: Plot, grid: PatchGrid | None) -> None:
    plot.sources["patch"].data = patch_data(grid)
    fig = plot.root
    n_l, n_t = (1, 1) if grid is None else np.asarray(grid.prob).shape
    _set_range(fig.x_range, -0.5, n_t - 0.5)
    _set_range(fig.y_range, -0.5, n_l - 0.5)
    labels = {} if grid is None else {i: str(t) for i, t in enumerate(grid.tokens)}
    fig.xaxis.ticker = list(range(n_t)) if grid is not None else []
    fig.xaxis.major_label_overrides = labels
    fig.title.text = patch_title(grid)
    if grid is not None and not grid.defined:
        hi = float(np.max(grid.prob)) if np.size(grid.prob) else 1.0
        plot.extra["mapper"].update(low=0.0, high=max(hi, 1e-6))
    else:
        plot.extra["mapper"].update(low=0.0, high=1.0)


# memory / accuracy ----------------------------------------------------------------------------
def pareto_data(rows: list[dict] | None) -> dict:
    """rows: dicts with bits, mib, effective_bits, accuracy (NaN = not measured yet)."""
    rows = rows or []
    acc = np.array([r.get("accuracy", np.nan) for r in rows], dtype=float)
    return {
        "bits": np.array([r["bits"] for r in rows], dtype=float),
        "mib": np.array([r["mib"] for r in rows], dtype=float),
        "eff": np.array([r["effective_bits"] for r in rows], dtype=float),
        "accuracy": acc,
        "acc_y": np.nan_to_num(acc, nan=0.0),
        "label": [str(r.get("label", r["bits"])) for r in rows],
        "size": [14 if np.isfinite(a) else 9 for a in acc],
        "fill": [QUANT_COLOR if np.isfinite(a) else "white" for a in acc],
    }


def pareto_plot(rows: list[dict] | None = None, height: int = 260, width: int = 460) -> Plot:
    """Weight memory (x, MiB) vs fact-recall accuracy (y), one point per bit-width."""
    fig = figure(
        title="Memory vs accuracy", x_range=Range1d(0, 1), y_range=Range1d(-0.05, 1.05),
        height=height, width=width, tools=TOOLS, toolbar_location="above",
    )  # fmt: skip
    src = ColumnDataSource(pareto_data(None), name="qviz_pareto")
    fig.line("mib", "acc_y", source=src, color="#999999")
    fig.scatter("mib", "acc_y", source=src, size="size", fill_color="fill", line_color="black")
    fig.text(
        "mib", "acc_y", text="label", source=src, x_offset=6, y_offset=-6, text_font_size="8pt"
    )
    cur = ColumnDataSource({"mib": [], "acc_y": []}, name="qviz_pareto_current")
    fig.scatter(
        "mib", "acc_y", source=cur, size=20, fill_alpha=0, line_color=SELECT_COLOR, line_width=3
    )
    fig.xaxis.axis_label = "weight memory (MiB)"
    fig.yaxis.axis_label = "fact-recall accuracy"
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("bits", "@label"),
                ("memory", "@mib{0.0} MiB (@eff{0.00} bits/weight)"),
                ("accuracy", "@accuracy{0.0%}"),
            ]
        )
    )
    plot = Plot(fig, {"pareto": src, "current": cur})
    update_pareto(plot, rows)
    return plot


def update_pareto(plot: Plot, rows: list[dict] | None, current_bits: int | None = None) -> None:
    """Replace the points; ring the point of ``current_bits``; hollow = accuracy not measured."""
    data = pareto_data(rows)
    plot.sources["pareto"].data = data
    measured = bool(np.isfinite(data["accuracy"]).any())
    text = "Memory vs accuracy" + ("" if measured or not len(data["mib"]) else " (not measured)")
    if plot.root.title.text != text:
        plot.root.title.text = text
    if len(data["mib"]):
        lo, hi = float(np.min(data["mib"])), float(np.max(data["mib"]))
        pad = max((hi - lo) * 0.1, 1.0)
        _set_range(plot.root.x_range, lo - pad, hi + pad * 2)
    idx = [i for i, b in enumerate(data["bits"]) if current_bits is not None and b == current_bits]
    plot.sources["current"].data = {
        "mib": [data["mib"][i] for i in idx],
        "acc_y": [data["acc_y"][i] for i in idx],
    }
