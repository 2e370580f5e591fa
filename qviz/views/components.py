"""The Panel view components: one bokeh figure each (built once by :mod:`qviz.views.plots`),
updated in place when the state's results or the selected layer change, marked stale while they
show an older setting than the controls. Clicking a view selects a layer. ``LAYOUT`` and
``arrange`` are the one layout every front (Panel, ipywidgets, the report) builds.
"""

from __future__ import annotations

from collections.abc import Callable

import panel as pn

from qviz.views import plots, text
from qviz.views.session import Worker, is_notebook_comm, server_doc, ui_call  # noqa: F401
from qviz.views.state import (  # noqa: F401 (re-exported: the state's old home)
    DEFAULT_PROMPT,
    DEFAULT_TARGET,
    GROUP_SIZES,
    DashboardState,
    method_names,
)

PAIR_SHRINK = 0.8  # a paired figure's width, relative to its own


class _FigureView(pn.viewable.Viewer):
    """A bokeh figure from ``plots`` bound to a DashboardState; clicking it selects a layer.

    ``pair`` views build a second figure (``plot2``) beside the first, shown only while a second
    plan is (side by side); the others draw both plans on one figure."""

    kind = "base"
    pair = False

    def __init__(self, state: DashboardState, **params) -> None:
        super().__init__(**params)
        self.state = state
        self.plot = self._build()
        self.plot2 = self._build() if self.pair else None
        self.root = self.plot.root
        if self.plot2 is not None:
            from bokeh.layouts import row

            self.plot2.root.visible = False
            for src in self.plot2.sources.values():  # names are unique in a bokeh document
                src.name = f"{src.name}_b"
            self.root = row(self.plot.root, self.plot2.root)
        self._doc = server_doc()
        self._pane = pn.pane.Bokeh(self.root, sizing_mode="fixed")
        for fig in self._tap_figures():
            fig.on_event("tap", self._on_tap)
        state.param.watch(self._on_result, self._watched())
        watched = ["shown", "shown2", *DashboardState.SETTINGS, *DashboardState.SETTINGS2]
        state.param.watch(self._on_stale, watched)
        state.param.watch(self._on_select, "selected_layer")
        self._refresh()
        self._select()

    def _select(self) -> None:
        for plot in (self.plot, self.plot2):
            if plot is not None:
                plots.select(plot, self.state.selected_layer)

    # subclass hooks
    def _build(self) -> plots.Plot:
        raise NotImplementedError

    def _update(self) -> None:
        """Draw both plans: ``_draw`` on each figure, the second shown only when there is one."""
        s = self.state
        self._draw(self.plot, s.comparison)
        if self.plot2 is None:
            return
        two = s.comparison2 is not None
        self._draw(self.plot2, s.comparison2)
        if self.plot2.root.visible != two:
            self.plot2.root.visible = two
        mappers = [p.extra["mapper"] for p in (self.plot, self.plot2) if "mapper" in p.extra]
        if two and mappers:  # difference maps: one colour scale for both, comparable by eye
            hi = max(m.high for m in mappers)
            for m in mappers:
                if m.high != hi:
                    m.update(low=-hi, high=hi)
        for plot in (self.plot, self.plot2):  # narrower while paired: the row stays readable
            full = plot.extra.setdefault("full_width", plot.root.width)
            width = int(full * PAIR_SHRINK) if two else full
            if plot.root.width != width:
                plot.root.width = width
        plots.tag_plan(self.plot, f"A: {s.comparison.plan_label}" if two else "")
        plots.tag_plan(self.plot2, f"B: {s.comparison2.plan_label}" if two else "")

    def _draw(self, plot: plots.Plot, cmp) -> None:
        raise NotImplementedError

    def _watched(self) -> list[str]:
        return ["comparison", "comparison2"]

    def _tap_figures(self) -> list:
        return [self.plot.root] + ([self.plot2.root] if self.plot2 is not None else [])

    def _stale(self) -> str:
        """The stale note of this view ("" when it shows what the controls ask)."""
        return self.state.stale_note()

    # behaviour
    def _refresh(self) -> None:
        self._update()
        self._mark_stale()

    def _mark_stale(self) -> None:
        plots.mark_stale(self.plot, self._stale())
        if self.plot2 is not None:
            plots.mark_stale(self.plot2, self.state.stale_note2())

    def _on_result(self, *_events) -> None:
        ui_call(self._doc, self._apply_result)

    def _apply_result(self) -> None:
        self._refresh()
        self._push()

    def _on_stale(self, *_events) -> None:
        ui_call(self._doc, self._apply_stale)

    def _apply_stale(self) -> None:
        self._mark_stale()
        self._push()

    def _on_select(self, *_events) -> None:
        ui_call(self._doc, self._apply_select)

    def _apply_select(self) -> None:
        self._select()
        self._push()

    def _on_tap(self, event) -> None:
        layer = plots.layer_from_tap(self.kind, event.x, event.y)
        n = self._n_layers()
        if layer is not None and n:
            self.state.selected_layer = min(layer, n - 1)

    def _n_layers(self) -> int:
        cmp = self.state.comparison
        return len(cmp.ffn.flip_rate) if cmp is not None else 0

    def _push(self) -> None:
        if is_notebook_comm():
            pn.io.push_notebook(self._pane)

    def __panel__(self):
        return self._pane


class CKAMap(_FigureView):
    """Reference layer x quantized layer CKA heatmap with a colour bar; diagonal visible."""

    kind = "cka"
    pair = True

    def _build(self) -> plots.Plot:
        return plots.cka_plot()

    def _draw(self, plot: plots.Plot, cmp) -> None:
        plots.update_cka(plot, cmp.cka if cmp is not None else None)


class CKADifference(_FigureView):
    """CKA(reference, quantized) minus CKA(reference, reference): where quantization moved it."""

    kind = "cka"
    pair = True

    def _build(self) -> plots.Plot:
        return plots.cka_diff_plot()

    def _draw(self, plot: plots.Plot, cmp) -> None:
        plots.update_cka_diff(plot, cmp.cka if cmp is not None else None)


class LensView(_FigureView):
    """Target probability and rank (log axis) per layer, reference vs quantized."""

    kind = "lens"

    def _build(self) -> plots.Plot:
        return plots.lens_plot()

    def _tap_figures(self) -> list:
        return [self.plot.extra["prob"], self.plot.extra["rank"]]

    def _update(self) -> None:
        a, b = self.state.comparison, self.state.comparison2
        labels = (a.plan_label if a else "", b.plan_label if b else "")
        plots.update_lens(self.plot, a.lens if a else None, b.lens if b else None, labels)


class AttentionEntropy(_FigureView):
    """Normalized attention entropy of the quantized model, layer x head."""

    kind = "attention"
    pair = True

    def _build(self) -> plots.Plot:
        return plots.attention_plot()

    def _draw(self, plot: plots.Plot, cmp) -> None:
        plots.update_attention(plot, cmp.attention if cmp is not None else None)


class AttentionDifference(_FigureView):
    """Attention entropy, quantized minus reference, layer x head."""

    kind = "attention"
    pair = True

    def _build(self) -> plots.Plot:
        return plots.attention_diff_plot()

    def _draw(self, plot: plots.Plot, cmp) -> None:
        plots.update_attention_diff(plot, cmp.attention if cmp is not None else None)


class FFNSignFlips(_FigureView):
    """Per-layer FFN gate sign flip rate with the study's 30% line."""

    kind = "ffn"

    def _build(self) -> plots.Plot:
        return plots.ffn_plot()

    def _update(self) -> None:
        a, b = self.state.comparison, self.state.comparison2
        plots.update_ffn(self.plot, a.ffn if a else None, b.ffn if b else None)
        two = f"solid A: {a.plan_label}, hatched B: {b.plan_label}" if a and b else ""
        plots.tag_plan(self.plot, two)


class PatchingHeatmap(_FigureView):
    """Causal-tracing recovery, layer x token; empty until a trace has run."""

    kind = "patch"

    def _build(self) -> plots.Plot:
        return plots.patch_plot()

    def _watched(self) -> list[str]:
        return ["patch_grid", "comparison"]

    def _n_layers(self) -> int:
        grid = self.state.patch_grid
        return int(grid.prob.shape[0]) if grid is not None else 0

    def _update(self) -> None:
        plots.update_patch(self.plot, self.state.patch_grid)

    def _stale(self) -> str:
        s = self.state
        grid, asked = s.patch_grid, s.asked()
        if s.budget_on and asked is not None:  # the prescribed plan shown is the one traced
            asked = (s.comparison.plan_label if s.comparison else "", *asked[1:])
        if grid is None or asked is None or grid.plan_label == asked[0]:
            return ""
        return f"stale: traced {grid.plan_label}, asked {asked[0]} (run tracing again)"


class MemoryPareto(_FigureView):
    """Bits vs weight memory vs fact-recall accuracy; the current bit-width is ringed."""

    kind = "pareto"

    def _build(self) -> plots.Plot:
        return plots.pareto_plot()

    def _watched(self) -> list[str]:
        return ["pareto_rows", "bits"]

    def _tap_figures(self) -> list:
        return []

    def _on_select(self, *_events) -> None:
        pass

    def _update(self) -> None:
        plots.update_pareto(self.plot, self.state.pareto_rows, current_bits=self.state.bits)

    def _stale(self) -> str:
        return ""  # one point per bit-width: never shows an older setting than the controls


class BudgetBits(_FigureView):
    """The budget plan: prescribed bits per decoder layer beside the budget and the uniform
    plan of the same budget; hidden unless the budget plan is on."""

    kind = "ffn"

    def _build(self) -> plots.Plot:
        return plots.budget_plot()

    def _watched(self) -> list[str]:
        return ["budget_result", "budget_on"]

    def _n_layers(self) -> int:
        res = self.state.budget_result
        return len(res[0].bits) if res is not None else 0

    def _update(self) -> None:
        s = self.state
        plots.update_budget(self.plot, s.budget_result if s.budget_on else None)

    def _stale(self) -> str:
        return self.state.stale_note() if self.state.budget_on else ""


class DivPane(pn.viewable.Viewer):
    """A raw bokeh ``Div`` in a Panel pane; setting ``text`` changes one property in place.

    (Panel's HTML panes re-apply their theme stylesheets, from a CDN under ipywidgets comms,
    whenever their text changes; a Div's text change touches nothing else.)
    """

    def __init__(self, text: str = "", css_classes: list[str] | None = None, **kw) -> None:
        super().__init__()
        from bokeh.models import Div

        self.div = Div(text=text, css_classes=css_classes or [], **kw)
        self._pane = pn.pane.Bokeh(self.div)
        self._doc = server_doc()
        self._want = {"text": self.div.text, "visible": self.div.visible}

    @property
    def text(self) -> str:
        return self._want["text"]

    @text.setter
    def text(self, value: str) -> None:
        self._set("text", value)

    @property
    def visible(self) -> bool:
        return self._want["visible"]

    @visible.setter
    def visible(self, value: bool) -> None:
        self._set("visible", bool(value))

    def _set(self, name: str, value) -> None:
        if self._want[name] != value:
            self._want[name] = value
            ui_call(self._doc, self._apply)

    def _apply(self) -> None:
        changes = {k: v for k, v in self._want.items() if getattr(self.div, k) != v}
        if changes:
            self.div.update(**changes)
            if is_notebook_comm():
                pn.io.push_notebook(self._pane)

    def __panel__(self):
        return self._pane


class VerdictCard(pn.viewable.Viewer):
    """The verdict's mode in a coloured badge, its evidence, and a line on the selected layer."""

    def __init__(self, state: DashboardState, **params) -> None:
        super().__init__(**params)
        self.state = state
        self.card = DivPane(self._text(), css_classes=["qviz-verdict-card"], width=330)
        state.param.watch(self._refresh, VERDICT_WATCHED)

    @property
    def text(self) -> str:
        return self.card.text

    def _text(self) -> str:
        return verdict_card_html(self.state)

    def _refresh(self, *_events) -> None:
        self.card.text = self._text()

    def __panel__(self):
        return pn.Column(pn.pane.Markdown("### Verdict", margin=(0, 10)), self.card)


VERDICT_WATCHED = [
    "comparison", "comparison2", "selected_layer", "shown", "shown2",
    *DashboardState.SETTINGS, *DashboardState.SETTINGS2,
]  # fmt: skip


def verdict_card_html(state: DashboardState) -> str:
    """The verdict card of ``state`` (both fronts): mode, plan, selected layer, stale badge;
    with a second plan, both cards (A above B)."""

    def card(cmp, note: str, side: str = "") -> str:
        head = f'<div class="qviz-side" style="font-weight:bold">{side}</div>' if side else ""
        html = text.verdict_html(
            cmp.verdict if cmp is not None else None,
            cmp.plan_label if cmp is not None else "",
            text.layer_summary(cmp, state.selected_layer),
            computing=cmp is not None and cmp.verdict is None,  # a first look
        )
        return head + text.stale_badge(note) + html

    if state.comparison2 is None:
        return card(state.comparison, state.stale_note())
    return card(state.comparison, state.stale_note(), "A") + card(
        state.comparison2, state.stale_note2(), "B"
    )


def figure_views(state: DashboardState) -> dict[str, _FigureView]:
    """Every figure view bound to ``state`` (both dashboard fronts show these)."""
    return {
        "cka": CKAMap(state),
        "cka_diff": CKADifference(state),
        "lens": LensView(state),
        "patch": PatchingHeatmap(state),
        "attention": AttentionEntropy(state),
        "attention_diff": AttentionDifference(state),
        "ffn": FFNSignFlips(state),
        "pareto": MemoryPareto(state),
        "budget": BudgetBits(state),
    }


# The one layout of the dashboard: rows of view names, a nested list is a column. The Panel
# Dashboard, the ipywidgets front and the HTML report all arrange their views with it.
LAYOUT: list[list] = [
    ["budget"],
    ["cka", "cka_diff", "verdict"],
    ["lens", ["ffn", "attention"]],
    ["patch", "attention_diff", "pareto"],
]


def arrange(items: dict, row: Callable, column: Callable, layout: list[list] = LAYOUT):
    """``layout`` built with ``row(*children)`` / ``column(*children)`` from ``items[name]``;
    names missing from ``items`` are left out (the report has no patch view unless traced)."""

    def build(entry, horizontal: bool):
        if isinstance(entry, str):
            return items.get(entry)
        kids = [k for k in (build(e, not horizontal) for e in entry) if k is not None]
        if not kids:
            return None
        return row(*kids) if horizontal else column(*kids)

    return column(*[r for r in (build(r, True) for r in layout) if r is not None])
