"""The base of every figure: the Plot record, shared colours, selection markers, the stale
mark and the tap -> layer mapping. Figure triplets (data, build, update) live in ``plots``."""

from __future__ import annotations

from dataclasses import dataclass, field

from bokeh.models import ColumnDataSource, Model, Range1d, Span, Title
from bokeh.plotting import figure

from qviz.metrics.verdict import SEVERE_FLIP  # noqa: F401 (the rule's threshold, drawn)

SELECT_COLOR = "#e4572e"
REF_COLOR = "#4c72b0"
QUANT_COLOR = "#dd8452"
TOOLS = "tap,reset,save"


@dataclass
class Plot:
    """A built view: ``root`` to display, ``sources`` to update, ``markers`` of the selection."""

    root: Model
    sources: dict[str, ColumnDataSource]
    markers: list[Span] = field(default_factory=list)
    extra: dict[str, Model] = field(default_factory=dict)
    state_indexed: bool = False

    @property
    def figures(self) -> list:
        return [m for m in self.root.select({"type": figure})] if self.root else []


def _heatmap_figure(title: str, x_label: str, y_label: str, height: int, width: int):
    fig = figure(
        title=title,
        x_range=Range1d(-0.5, 0.5),
        y_range=Range1d(-0.5, 0.5),
        height=height,
        width=width,
        tools=TOOLS,
        toolbar_location="above",
    )
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    fig.grid.visible = False
    return fig


def _set_range(rng: Range1d, start: float, end: float) -> None:
    if rng.start != start or rng.end != end:
        rng.update(start=start, end=end)


def select(plot: Plot, layer: int | None) -> None:
    """Move the selection markers of ``plot`` to decoder layer ``layer`` (None hides them)."""
    for span in plot.markers:
        if layer is None:
            span.visible = False
        else:
            loc = layer + 1 if plot.state_indexed else layer
            if span.location != loc or not span.visible:
                span.update(location=loc, visible=True)


def _markers(fig, dims: tuple[str, ...]) -> list[Span]:
    spans = []
    for dim in dims:
        span = Span(
            location=0,
            dimension=dim,
            line_color=SELECT_COLOR,
            line_width=2,
            line_alpha=0.9,
            visible=False,
        )
        fig.add_layout(span)
        spans.append(span)
    return spans


# stale marks ------------------------------------------------------------------------------
STALE_COLOR = "#b26a00"


def mark_stale(plot: Plot, note: str = "") -> None:
    """Show ``note`` (e.g. "stale: showing 4-bit, asked 2-bit") above the view and dim it;
    an empty note clears the mark. In place: one Title model made on first use, then toggled."""
    if not _title_above(plot, "stale", note, text_color=STALE_COLOR, text_font_size="9pt"):
        return
    # BokehJS keeps a style that is removed, so clearing sets full opacity explicitly
    styles = {"opacity": "0.45" if note else "1"}
    if dict(plot.root.styles or {}) != styles:
        plot.root.styles = styles


def _title_above(plot: Plot, key: str, note: str, **style) -> bool:
    """Show ``note`` in a Title above the top figure of ``plot`` (made on first use, then
    toggled in place); False when there is none and ``note`` is empty."""
    badge = plot.extra.get(key)
    if badge is None:
        if not note:
            return False
        badge = Title(text=note, visible=False, **style)
        kids = getattr(plot.root, "children", None)  # a column of figures: the top one
        fig = kids[0] if kids else plot.root
        fig.add_layout(badge, "above")
        plot.extra[key] = badge
    if badge.text != note or badge.visible != bool(note):
        badge.update(text=note or badge.text, visible=bool(note))
    return True


def tag_plan(plot: Plot, note: str = "") -> None:
    """Name the plan a figure shows ("A: rtn2-g128") while two are side by side; "" hides it."""
    _title_above(plot, "tag", note, text_font_size="10pt", text_font_style="bold")


def layer_from_tap(plot_kind: str, x: float | None, y: float | None) -> int | None:
    """The decoder layer a click at data coordinates (x, y) selects in view ``plot_kind``."""
    if plot_kind in ("cka", "lens"):
        v = x if x is not None else y
        return None if v is None else max(int(round(v)) - 1, 0)
    if plot_kind in ("attention", "ffn"):
        return None if x is None else max(int(round(x)), 0)
    if plot_kind == "patch":
        return None if y is None else max(int(round(y)), 0)
    return None
