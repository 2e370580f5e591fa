"""Result -> bokeh figure, as pure functions; figures are built once and updated in place.

Every view is a :class:`Plot`: the figure (or column of figures), its named
``ColumnDataSource`` objects and the models that mark the selected layer. ``*_data`` functions
turn a result object into the plain dict a source holds; ``update_*`` functions assign that
dict to ``source.data`` (and move ranges and markers), so a slider move never rebuilds a
figure. Layer convention: ``selected`` is a decoder layer ``l``; views indexed by residual state
(CKA, logit lens) mark state ``l + 1``, the output of layer ``l``.
"""

from __future__ import annotations

import html

import numpy as np
from bokeh.core.properties import value
from bokeh.layouts import column
from bokeh.models import (
    BasicTicker,
    ColorBar,
    ColumnDataSource,
    HoverTool,
    LinearColorMapper,
    Range1d,
    Span,
    Title,
)
from bokeh.palettes import Cividis256, RdBu11, Viridis256
from bokeh.plotting import figure

from qviz.results import (
    AttentionStats,
    FFNStats,
    LayerMap,
    LensTrajectory,
    Prescription,
)
from qviz.views.figure import (  # noqa: F401 (re-exported: the figures' common base)
    QUANT_COLOR,
    REF_COLOR,
    SELECT_COLOR,
    SEVERE_FLIP,
    STALE_COLOR,
    TOOLS,
    Plot,
    _heatmap_figure,
    _markers,
    _set_range,
    layer_from_tap,
    mark_stale,
    select,
    tag_plan,
)
from qviz.views.sweeps import (  # noqa: F401 (re-exported: tracing and memory figures)
    pareto_data,
    pareto_plot,
    patch_data,
    patch_plot,
    patch_title,
    update_pareto,
    update_patch,
)
from qviz.views.text import MODE_COLORS, layer_summary, verdict_html  # noqa: F401 (re-export)

B_COLOR = "#55a868"  # the second plan's curves (side by side)


# CKA ------------------------------------------------------------------------------------------
def cka_data(cka: LayerMap | None) -> dict:
    """Long-form cells of the [L+1, L+1] CKA map: ref (x), quant (y), cka, and a diagonal flag."""
    if cka is None:
        return {"ref": [], "quant": [], "cka": [], "diag": []}
    v = np.asarray(cka.values, dtype=float)
    r, q = np.indices(v.shape)
    return {
        "ref": r.ravel(),
        "quant": q.ravel(),
        "cka": v.ravel(),
        "diag": (r == q).ravel().astype(np.int8),
    }


def cka_plot(cka: LayerMap | None = None, height: int = 360, width: int = 420) -> Plot:
    """Reference layer (x) by quantized layer (y) CKA heatmap with a colour bar, diagonal drawn."""
    fig = _heatmap_figure(
        "CKA: reference vs quantized layer", "reference layer", "quantized layer", height, width
    )
    src = ColumnDataSource(cka_data(None), name="qviz_cka")
    mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=1.0)
    fig.rect(
        "ref", "quant", 1, 1, source=src, fill_color={"field": "cka", "transform": mapper},
        line_color=None,
    )  # fmt: skip
    diag = ColumnDataSource({"x": [-0.5, 0.5], "y": [-0.5, 0.5]}, name="qviz_cka_diag")
    fig.line("x", "y", source=diag, line_color="white", line_dash="dashed", line_alpha=0.6)
    bar = ColorBar(color_mapper=mapper, ticker=BasicTicker(desired_num_ticks=5), width=10)
    bar.title = "CKA"
    fig.add_layout(bar, "right")
    fig.add_tools(
        HoverTool(tooltips=[("ref", "@ref"), ("quant", "@quant"), ("CKA", "@cka{0.000}")])
    )
    how = Title(text=cka_caption(None), text_font_size="8pt", text_font_style="italic")
    fig.add_layout(how, "below")
    plot = Plot(fig, {"cka": src, "diag": diag}, _markers(fig, ("width", "height")), {"how": how})
    plot.state_indexed = True
    update_cka(plot, cka)
    return plot


def update_cka(plot: Plot, cka: LayerMap | None) -> None:
    """Replace the CKA cells in place; resize ranges when the layer count changes."""
    plot.sources["cka"].data = cka_data(cka)
    caption = cka_caption(cka)
    if plot.extra["how"].text != caption:
        plot.extra["how"].text = caption
    n = 1 if cka is None else cka.values.shape[0]
    fig = plot.root
    _set_range(fig.x_range, -0.5, n - 0.5)
    _set_range(fig.y_range, -0.5, n - 0.5)
    if len(plot.sources["diag"].data["x"]) != 2 or plot.sources["diag"].data["x"][1] != n - 0.5:
        plot.sources["diag"].data = {"x": [-0.5, n - 0.5], "y": [-0.5, n - 0.5]}


def cka_caption(cka: LayerMap | None) -> str:
    """How the map was computed, for the figure: "pooled over 32 prompts, first token left out"."""
    return "" if cka is None else f"linear CKA: {cka.how}"


# differences (quantized minus reference) --------------------------------------------------
def diff_data(values: np.ndarray | None, x_name: str, y_name: str) -> dict:
    """Cells of a [X, Y] difference grid: x, y, diff (quantized minus reference)."""
    if values is None:
        return {x_name: [], y_name: [], "diff": []}
    v = np.asarray(values, dtype=float)
    x, y = np.indices(v.shape)
    return {x_name: x.ravel(), y_name: y.ravel(), "diff": v.ravel()}


def _diff_plot(title: str, name: str, x: tuple[str, str], y: tuple[str, str], height, width):
    """A diverging heatmap (blue below zero, red above) of quantized minus reference."""
    fig = _heatmap_figure(title, x[1], y[1], height, width)
    src = ColumnDataSource(diff_data(None, x[0], y[0]), name=name)
    mapper = LinearColorMapper(palette=RdBu11, low=-1.0, high=1.0)
    fig.rect(
        x[0], y[0], 1, 1, source=src, fill_color={"field": "diff", "transform": mapper},
        line_color=None,
    )  # fmt: skip
    fig.add_layout(ColorBar(color_mapper=mapper, width=10, title="quant - ref"), "right")
    fig.add_tools(
        HoverTool(tooltips=[(f"{x[1]}, {y[1]}", f"@{x[0]}, @{y[0]}"), ("diff", "@diff{+0.000}")])
    )
    return Plot(fig, {"diff": src}, extra={"mapper": mapper, "base_title": title})


def _update_diff(plot: Plot, values: np.ndarray | None, x_name: str, y_name: str) -> None:
    plot.sources["diff"].data = diff_data(values, x_name, y_name)
    n_x, n_y = (1, 1) if values is None else np.shape(values)
    _set_range(plot.root.x_range, -0.5, n_x - 0.5)
    _set_range(plot.root.y_range, -0.5, n_y - 0.5)
    hi = float(np.nanmax(np.abs(values))) if values is not None and np.size(values) else 1.0
    hi = max(hi, 1e-3)
    if plot.extra["mapper"].high != hi:
        plot.extra["mapper"].update(low=-hi, high=hi)
    title = plot.extra["base_title"] + ("" if values is not None else " (no reference)")
    if plot.root.title.text != title:
        plot.root.title.text = title


def cka_diff_plot(cka: LayerMap | None = None, height: int = 360, width: int = 420) -> Plot:
    """CKA(reference, quantized) minus CKA(reference, reference), reference (x) by quantized (y)."""
    plot = _diff_plot(
        "CKA difference: quantized - reference", "qviz_cka_diff",
        ("ref", "reference layer"), ("quant", "quantized layer"), height, width,
    )  # fmt: skip
    plot.markers = _markers(plot.root, ("width", "height"))
    plot.state_indexed = True
    update_cka_diff(plot, cka)
    return plot


def update_cka_diff(plot: Plot, cka: LayerMap | None) -> None:
    """Replace the difference cells in place (empty when ``cka`` has no reference map)."""
    _update_diff(plot, None if cka is None else cka.difference, "ref", "quant")


def attention_diff_plot(
    att: AttentionStats | None = None, height: int = 280, width: int = 460
) -> Plot:
    """Attention entropy, quantized minus reference, decoder layer (x) by head (y)."""
    plot = _diff_plot(
        "Attention entropy difference: quantized - reference", "qviz_attention_diff",
        ("layer", "decoder layer"), ("head", "head"), height, width,
    )  # fmt: skip
    plot.markers = _markers(plot.root, ("height",))
    update_attention_diff(plot, att)
    return plot


def update_attention_diff(plot: Plot, att: AttentionStats | None) -> None:
    diff = None if att is None else np.asarray(att.quant_entropy) - np.asarray(att.ref_entropy)
    _update_diff(plot, diff, "layer", "head")


# logit lens -----------------------------------------------------------------------------------
def lens_data(lens: LensTrajectory | None) -> dict:
    """Per residual state: layer, probability and rank of the target, reference and quantized."""
    if lens is None:
        return {k: [] for k in ("layer", "p_ref", "p_quant", "r_ref", "r_quant", "top_q")}
    n = len(lens.reference.prob)
    return {
        "layer": np.arange(n),
        "p_ref": np.asarray(lens.reference.prob, dtype=float),
        "p_quant": np.asarray(lens.quantized.prob, dtype=float),
        "r_ref": np.asarray(lens.reference.rank, dtype=float),
        "r_quant": np.asarray(lens.quantized.rank, dtype=float),
        "top_q": [html.escape(repr(t[0])) if t else "" for t in lens.quantized.top_tokens],
    }


def lens_plot(lens: LensTrajectory | None = None, height: int = 200, width: int = 460) -> Plot:
    """Target probability (linear) and rank (log axis) per residual state, ref vs quantized."""
    x_range = Range1d(-0.5, 0.5)
    pfig = figure(
        title="Logit lens: target probability", x_range=x_range, y_range=Range1d(0, 1),
        height=height, width=width, tools=TOOLS, toolbar_location="above",
    )  # fmt: skip
    rfig = figure(
        title="Logit lens: target rank (1 = top)", x_range=x_range, y_axis_type="log",
        y_range=Range1d(1e4, 0.8), height=height, width=width, tools=TOOLS,
        toolbar_location="above",
    )  # fmt: skip
    src = ColumnDataSource(lens_data(None), name="qviz_lens")
    src2 = ColumnDataSource(lens_data(None), name="qviz_lens2")  # the second plan, if any
    for fig, ref, qnt in ((pfig, "p_ref", "p_quant"), (rfig, "r_ref", "r_quant")):
        fig.line("layer", ref, source=src, color=REF_COLOR, line_width=2, legend_label="reference")
        fig.scatter("layer", ref, source=src, color=REF_COLOR, size=4)
        fig.line(
            "layer", qnt, source=src, color=QUANT_COLOR, line_width=2, legend_label="quantized"
        )
        fig.scatter("layer", qnt, source=src, color=QUANT_COLOR, size=4)
        kw = {"source": src2, "color": B_COLOR, "line_width": 2, "line_dash": "dashed"}
        fig.line("layer", qnt, legend_label="second plan", **kw)
        fig.scatter("layer", qnt, source=src2, color=B_COLOR, size=4)
        fig.legend.location = "top_left" if fig is pfig else "top_right"
        fig.legend.label_text_font_size = "8pt"
        fig.legend.background_fill_alpha = 0.5
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("state", "@layer"),
                    ("p ref / quant", "@p_ref{0.0000} / @p_quant{0.0000}"),
                    ("rank ref / quant", "@r_ref{0} / @r_quant{0}"),
                    ("quantized top-1", "@top_q"),
                ],
                mode="vline",
            )
        )
    rfig.xaxis.axis_label = "residual state (0 = embeddings)"
    markers = _markers(pfig, ("height",)) + _markers(rfig, ("height",))
    plot = Plot(
        column(pfig, rfig), {"lens": src, "lens2": src2}, markers, {"prob": pfig, "rank": rfig}
    )
    plot.state_indexed = True
    update_lens(plot, lens)
    return plot


def update_lens(
    plot: Plot,
    lens: LensTrajectory | None,
    lens2: LensTrajectory | None = None,
    labels: tuple[str, str] = ("", ""),
) -> None:
    """Replace the lens curves in place; the title names the target. ``lens2``: a second
    plan's quantized curves on the same axes (dashed), the legend naming both ``labels``."""
    data, data2 = lens_data(lens), lens_data(lens2)
    plot.sources["lens"].data = data
    plot.sources["lens2"].data = data2
    n = len(data["layer"]) or 1
    pfig, rfig = plot.extra["prob"], plot.extra["rank"]
    _set_range(pfig.x_range, -0.5, n - 0.5)
    two = lens2 is not None
    for fig in (pfig, rfig):
        items = fig.legend[0].items  # reference, quantized, second plan
        want = [("reference", True), (f"A: {labels[0]}" if two else "quantized", True)]
        for item, (text, shown) in zip(items, [*want, (f"B: {labels[1]}", two)], strict=True):
            if item.label != value(text) or item.visible != shown:
                item.update(label=value(text), visible=shown)
    if lens is not None:
        pq = [*data["p_quant"], *data2["p_quant"]]
        rq = [*data["r_quant"], *data2["r_quant"]]
        pmax = float(max(np.max(data["p_ref"]), np.max(pq), 1e-3))
        _set_range(pfig.y_range, 0.0, min(1.0, pmax * 1.1))
        rmax = float(max(np.max(data["r_ref"]), np.max(rq), 10.0))
        _set_range(rfig.y_range, rmax * 2, 0.8)
        text = f"Logit lens: probability of {lens.target!r}"
        if pfig.title.text != text:
            pfig.title.text = text


# attention ------------------------------------------------------------------------------------
def attention_data(att: AttentionStats | None) -> dict:
    """Cells of the [L, H] grid: layer (x), head (y), entropies and JS divergence."""
    if att is None:
        return {k: [] for k in ("layer", "head", "entropy", "ref_entropy", "delta", "js")}
    layer, head = np.indices(att.quant_entropy.shape)
    q = np.asarray(att.quant_entropy, dtype=float)
    r = np.asarray(att.ref_entropy, dtype=float)
    return {
        "layer": layer.ravel(),
        "head": head.ravel(),
        "entropy": q.ravel(),
        "ref_entropy": r.ravel(),
        "delta": (q - r).ravel(),
        "js": np.asarray(att.js, dtype=float).ravel(),
    }


def attention_plot(att: AttentionStats | None = None, height: int = 280, width: int = 460) -> Plot:
    """Normalized attention entropy of the quantized model, layer (x) by head (y)."""
    fig = _heatmap_figure(
        "Attention entropy (quantized, normalized)", "decoder layer", "head", height, width
    )
    src = ColumnDataSource(attention_data(None), name="qviz_attention")
    mapper = LinearColorMapper(palette=Cividis256, low=0.0, high=1.0)
    fig.rect(
        "layer", "head", 1, 1, source=src, fill_color={"field": "entropy", "transform": mapper},
        line_color=None,
    )  # fmt: skip
    bar = ColorBar(color_mapper=mapper, ticker=BasicTicker(desired_num_ticks=5), width=10)
    fig.add_layout(bar, "right")
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("layer, head", "@layer, @head"),
                ("entropy quant / ref", "@entropy{0.000} / @ref_entropy{0.000}"),
                ("JS divergence", "@js{0.0000}"),
            ]
        )
    )
    plot = Plot(fig, {"attention": src}, _markers(fig, ("height",)))
    update_attention(plot, att)
    return plot


def update_attention(plot: Plot, att: AttentionStats | None) -> None:
    plot.sources["attention"].data = attention_data(att)
    n_l, n_h = (1, 1) if att is None else att.quant_entropy.shape
    _set_range(plot.root.x_range, -0.5, n_l - 0.5)
    _set_range(plot.root.y_range, -0.5, n_h - 0.5)


# FFN ------------------------------------------------------------------------------------------
def ffn_data(ffn: FFNStats | None, offset: float = 0.0, width: float = 0.8) -> dict:
    """Per decoder layer: gate sign flip rate, a colour (severe above 30%), Jaccard, cosine;
    the bar's centre x (layer + ``offset``: paired bars side by side) and ``width``."""
    if ffn is None:
        return {k: [] for k in ("layer", "x", "w", "flip", "color", "jaccard", "cosine")}
    flip = np.asarray(ffn.flip_rate, dtype=float)
    return {
        "layer": np.arange(len(flip)),
        "x": np.arange(len(flip)) + offset,
        "w": np.full(len(flip), width),
        "flip": flip,
        "color": [SELECT_COLOR if f > SEVERE_FLIP else "#8c8c8c" for f in flip],
        "jaccard": np.asarray(ffn.jaccard, dtype=float),
        "cosine": np.asarray(ffn.out_cosine, dtype=float),
    }


def ffn_plot(ffn: FFNStats | None = None, height: int = 240, width: int = 460) -> Plot:
    """Per-layer bars of the FFN gate sign flip rate, with the study's 30% line."""
    fig = figure(
        title="FFN gate sign flips per layer", x_range=Range1d(-0.5, 0.5), y_range=Range1d(0, 0.5),
        height=height, width=width, tools=TOOLS, toolbar_location="above",
    )  # fmt: skip
    src = ColumnDataSource(ffn_data(None), name="qviz_ffn")
    fig.vbar("x", top="flip", width="w", source=src, fill_color="color", line_color=None)
    src2 = ColumnDataSource(ffn_data(None), name="qviz_ffn2")  # the second plan: hatched bars
    fig.vbar(
        "x", top="flip", width="w", source=src2, fill_color="color", fill_alpha=0.5,
        line_color="#333333", hatch_pattern="/", hatch_alpha=0.6,
    )  # fmt: skip
    fig.add_layout(
        Span(location=SEVERE_FLIP, dimension="width", line_color="black", line_dash="dashed")
    )
    fig.add_layout(Title(text="dashed: 30% (severe)", text_font_size="8pt"), "below")
    fig.xaxis.axis_label = "decoder layer"
    fig.yaxis.axis_label = "flip rate"
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("layer", "@layer"),
                ("flip rate", "@flip{0.0%}"),
                ("top-1% Jaccard", "@jaccard{0.000}"),
                ("MLP out cosine", "@cosine{0.000}"),
            ]
        )
    )
    plot = Plot(fig, {"ffn": src, "ffn2": src2}, _markers(fig, ("height",)))
    update_ffn(plot, ffn)
    return plot


def update_ffn(plot: Plot, ffn: FFNStats | None, ffn2: FFNStats | None = None) -> None:
    """Replace the bars in place; with ``ffn2`` each layer gets a pair (left first plan,
    right, hatched, the second)."""
    two = ffn2 is not None
    data = ffn_data(ffn, -0.2, 0.4) if two else ffn_data(ffn)
    data2 = ffn_data(ffn2, 0.2, 0.4)
    plot.sources["ffn"].data = data
    plot.sources["ffn2"].data = data2
    n = len(data["layer"]) or 1
    _set_range(plot.root.x_range, -0.5, n - 0.5)
    flips = [*data["flip"], *data2["flip"]]
    top = max(0.4, float(np.max(flips)) * 1.1) if flips else 0.5
    _set_range(plot.root.y_range, 0.0, round(top, 3))


# the budget plan (prescription) -----------------------------------------------------------------
BITS_COLORS = {2: "#c62828", 3: "#ef6c00", 4: "#9e9d24", 5: "#7cb342", 6: "#43a047", 8: "#2e7d32"}


def budget_data(pres: Prescription | None) -> dict:
    """Per decoder layer: the prescribed bits, the option's label, its KL increase, a colour."""
    if pres is None:
        return {k: [] for k in ("layer", "bits", "option", "kl", "color")}
    frame = pres.to_frame()
    bits = frame["bits"].to_numpy(dtype=float)
    return {
        "layer": frame["layer"].to_numpy(),
        "bits": bits,
        "option": list(frame["option"]),
        "kl": frame["kl_increase"].to_numpy(dtype=float),
        "color": [BITS_COLORS.get(int(b), "#1565c0") for b in bits],
    }


def budget_plot(height: int = 220, width: int = 900) -> Plot:
    """The prescribed plan: bits per decoder layer, the budget (solid) and the uniform plan of
    the same budget (dashed); hidden until a prescription is shown."""
    fig = figure(
        title="Budget plan: bits per layer", x_range=Range1d(-0.5, 0.5), y_range=Range1d(0, 9),
        height=height, width=width, tools=TOOLS, toolbar_location="above", visible=False,
    )  # fmt: skip
    src = ColumnDataSource(budget_data(None), name="qviz_budget")
    fig.vbar("layer", top="bits", width=0.8, source=src, fill_color="color", line_color=None)
    budget = Span(location=0, dimension="width", line_color="black", line_width=2)
    uniform = Span(location=0, dimension="width", line_color=B_COLOR, line_dash="dashed",
                   line_width=2)  # fmt: skip
    fig.add_layout(budget)
    fig.add_layout(uniform)
    how = Title(text="", text_font_size="8pt")
    fig.add_layout(how, "below")
    fig.xaxis.axis_label = "decoder layer"
    fig.yaxis.axis_label = "bits"
    fig.add_tools(
        HoverTool(tooltips=[("layer", "@layer"), ("option", "@option"), ("KL", "@kl{0.0000}")])
    )
    extra = {"budget": budget, "uniform": uniform, "how": how}
    return Plot(fig, {"budget": src}, _markers(fig, ("height",)), extra)


def update_budget(plot: Plot, result: tuple | None) -> None:
    """Show ``(Prescription, uniform plan label, its bits/weight)`` in place; None hides it."""
    pres = None if result is None else result[0]
    data = budget_data(pres)
    plot.sources["budget"].data = data
    fig = plot.root
    if fig.visible != (pres is not None):
        fig.visible = pres is not None
    if pres is None:
        return
    _set_range(fig.x_range, -0.5, len(data["layer"]) - 0.5)
    _, uni_label, uni_bits = result
    plot.extra["budget"].location = float(pres.budget_bits)
    plot.extra["uniform"].location = float(uni_bits)
    fig.title.text = (
        f"Budget {pres.budget_bits:g} bits/weight: prescribed plan {pres.effective_bits:.2f} "
        f"bits/weight (bars, bits per layer), uniform {uni_label} {uni_bits:.2f} (dashed)"
    )
    plot.extra[
        "how"
    ].text = (
        "solid line: the budget; each layer's bits chosen to least raise KL on calibration text"
    )
