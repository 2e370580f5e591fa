"""Dashboard state (``param``), a superseding background worker, and the Panel view components.

Views hold one figure each (built once by :mod:`qviz.views.plots`) and update its data sources
in place when the state's results or the selected layer change. Clicking a view selects a layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import panel as pn
import param

from qviz.quant.config import QuantConfig, QuantPlan
from qviz.results import Comparison, PatchGrid
from qviz.views import plots, text

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TARGET = " Paris"
GROUP_SIZES = {"32": 32, "64": 64, "128": 128, "per channel": None}


def method_names() -> list[str]:
    """The quantization methods of the registry ``qviz.quant.METHODS`` (names, in order)."""
    try:
        from qviz.quant import METHODS
    except ImportError:  # before the registry: the tuple of names in quant.config
        from qviz.quant.config import METHODS
    return list(METHODS)


class DashboardState(param.Parameterized):
    """Everything one session sets, plus the results shown; one instance per browser session."""

    model = param.String(default="smollm2-135m", doc="model name or path (set by the app)")
    prompt = param.String(default=DEFAULT_PROMPT)
    target = param.String(default=DEFAULT_TARGET, doc="a single-token expected answer")
    bits = param.Integer(default=4, bounds=(2, 8))
    group_size = param.Selector(default=128, objects=list(GROUP_SIZES.values()))
    symmetric = param.Boolean(default=False)
    method = param.Selector(default="rtn", objects=method_names())
    protect_first = param.Integer(default=0, bounds=(0, 8), doc="first k layers kept at 8 bits")
    selected_layer = param.Integer(default=None, allow_None=True, doc="decoder layer")
    component = param.Selector(default="resid", objects=["resid", "attn", "mlp"])

    comparison = param.ClassSelector(class_=Comparison, default=None, allow_None=True)
    patch_grid = param.ClassSelector(class_=PatchGrid, default=None, allow_None=True)
    pareto_rows = param.List(default=[])
    shown = param.Tuple(default=None, allow_None=True, length=3,
                        doc="(plan label, prompt, target) of the comparison shown")  # fmt: skip
    error = param.String(default="", doc="the last error message, shown in the app")
    busy = param.Boolean(default=False)
    status = param.String(default="")

    SETTINGS = ("prompt", "target", "bits", "group_size", "symmetric", "method", "protect_first")

    def asked(self) -> tuple[str, str, str] | None:
        """(plan label, prompt, target) the controls ask for; None when they are invalid."""
        try:
            return (self.plan().label, self.prompt, self.target)
        except ValueError:
            return None

    def stale_note(self) -> str:
        """ "stale: showing rtn4-g128, asked rtn2-g128" while the comparison shown is older."""
        return text.stale_note(self.shown, self.asked())

    def config(self) -> QuantConfig:
        """The QuantConfig of the current settings (raises ValueError when invalid)."""
        return QuantConfig(
            bits=int(self.bits),
            group_size=self.group_size,
            symmetric=bool(self.symmetric),
            method=self.method,
        )

    def plan(self) -> QuantPlan:
        """The plan of the current settings: uniform, or source protection of the first k."""
        cfg = self.config()
        if self.protect_first > 0:
            return QuantPlan.protect_first(cfg, n=int(self.protect_first), bits=8)
        return QuantPlan.uniform(cfg)


class Worker:
    """Runs one kind of slow job off the UI thread; a newer request supersedes older ones.

    ``submit(job)`` queues ``job`` (a no-argument callable); at most one runs at a time and only
    the latest queued job runs next. ``deliver(result, error, token)`` is called with the outcome
    of the most recent request only (stale outcomes are dropped), through ``dispatch``, which
    moves the call onto the UI thread (e.g. a bokeh document's ``add_next_tick_callback``).
    """

    def __init__(
        self,
        deliver: Callable[[object, BaseException | None, int], None],
        dispatch: Callable[[Callable[[], None]], None],
        name: str = "qviz-worker",
    ) -> None:
        self._deliver = deliver
        self._dispatch = dispatch
        self._name = name
        self._lock = threading.Lock()
        self._pending: tuple[int, Callable[[], object]] | None = None
        self._running = False
        self._token = 0
        self._idle = threading.Event()
        self._idle.set()

    @property
    def token(self) -> int:
        """The id of the latest request."""
        return self._token

    def submit(self, job: Callable[[], object]) -> int:
        with self._lock:
            self._token += 1
            token = self._token
            self._pending = (token, job)
            self._idle.clear()
            if self._running:
                return token
            self._running = True
        threading.Thread(target=self._loop, name=self._name, daemon=True).start()
        return token

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (for tests and scripts)."""
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._running = False
                    self._idle.set()
                    return
                token, job = self._pending
                self._pending = None
            result, error = None, None
            try:
                result = job()
            except Exception as err:  # shown in the app, never only logged
                error = err
            with self._lock:
                latest = token == self._token
            if latest:
                try:
                    self._dispatch(lambda r=result, e=error, t=token: self._deliver(r, e, t))
                except Exception:  # nowhere to deliver (a closed session): keep the loop alive
                    pass


def is_notebook_comm() -> bool:
    """True inside a Jupyter kernel (notebook or Voila), where raw bokeh changes need a push."""
    import sys

    return "ipykernel" in sys.modules and not (pn.state.curdoc and pn.state.curdoc.session_context)


def server_doc():
    """This session's bokeh document under a Panel server, else None (notebook, scripts)."""
    doc = pn.state.curdoc
    return doc if doc is not None and doc.session_context is not None else None


def ui_call(doc, fn: Callable[[], None]) -> None:
    """Run ``fn`` (which edits raw bokeh models) where that is safe.

    Under a server the edit must hold the document lock, which widget callbacks do not:
    schedule it on the document's next tick (thread-safe, keeps order). Elsewhere run it now.
    """
    if doc is None:
        fn()
        return
    try:
        doc.add_next_tick_callback(fn)
    except Exception:  # the session is gone: nothing to update
        pass


class _FigureView(pn.viewable.Viewer):
    """A bokeh figure from ``plots`` bound to a DashboardState; clicking it selects a layer."""

    kind = "base"

    def __init__(self, state: DashboardState, **params) -> None:
        super().__init__(**params)
        self.state = state
        self.plot = self._build()
        self._doc = server_doc()
        self._pane = pn.pane.Bokeh(self.plot.root, sizing_mode="fixed")
        for fig in self._tap_figures():
            fig.on_event("tap", self._on_tap)
        state.param.watch(self._on_result, self._watched())
        state.param.watch(self._on_stale, ["shown", *DashboardState.SETTINGS])
        state.param.watch(self._on_select, "selected_layer")
        self._refresh()
        plots.select(self.plot, state.selected_layer)

    # subclass hooks
    def _build(self) -> plots.Plot:
        raise NotImplementedError

    def _update(self) -> None:
        raise NotImplementedError

    def _watched(self) -> list[str]:
        return ["comparison"]

    def _tap_figures(self) -> list:
        return [self.plot.root]

    def _stale(self) -> str:
        """The stale note of this view ("" when it shows what the controls ask)."""
        return self.state.stale_note()

    # behaviour
    def _refresh(self) -> None:
        self._update()
        plots.mark_stale(self.plot, self._stale())

    def _on_result(self, *_events) -> None:
        ui_call(self._doc, self._apply_result)

    def _apply_result(self) -> None:
        self._refresh()
        self._push()

    def _on_stale(self, *_events) -> None:
        ui_call(self._doc, self._apply_stale)

    def _apply_stale(self) -> None:
        plots.mark_stale(self.plot, self._stale())
        self._push()

    def _on_select(self, *_events) -> None:
        ui_call(self._doc, self._apply_select)

    def _apply_select(self) -> None:
        plots.select(self.plot, self.state.selected_layer)
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

    def _build(self) -> plots.Plot:
        return plots.cka_plot()

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_cka(self.plot, cmp.cka if cmp is not None else None)


class CKADifference(_FigureView):
    """CKA(reference, quantized) minus CKA(reference, reference): where quantization moved it."""

    kind = "cka"

    def _build(self) -> plots.Plot:
        return plots.cka_diff_plot()

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_cka_diff(self.plot, cmp.cka if cmp is not None else None)


class LensView(_FigureView):
    """Target probability and rank (log axis) per layer, reference vs quantized."""

    kind = "lens"

    def _build(self) -> plots.Plot:
        return plots.lens_plot()

    def _tap_figures(self) -> list:
        return [self.plot.extra["prob"], self.plot.extra["rank"]]

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_lens(self.plot, cmp.lens if cmp is not None else None)


class AttentionEntropy(_FigureView):
    """Normalized attention entropy of the quantized model, layer x head."""

    kind = "attention"

    def _build(self) -> plots.Plot:
        return plots.attention_plot()

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_attention(self.plot, cmp.attention if cmp is not None else None)


class AttentionDifference(_FigureView):
    """Attention entropy, quantized minus reference, layer x head."""

    kind = "attention"

    def _build(self) -> plots.Plot:
        return plots.attention_diff_plot()

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_attention_diff(self.plot, cmp.attention if cmp is not None else None)


class FFNSignFlips(_FigureView):
    """Per-layer FFN gate sign flip rate with the study's 30% line."""

    kind = "ffn"

    def _build(self) -> plots.Plot:
        return plots.ffn_plot()

    def _update(self) -> None:
        cmp = self.state.comparison
        plots.update_ffn(self.plot, cmp.ffn if cmp is not None else None)


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
        grid, asked = self.state.patch_grid, self.state.asked()
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
        state.param.watch(
            self._refresh, ["comparison", "selected_layer", "shown", *DashboardState.SETTINGS]
        )

    @property
    def text(self) -> str:
        return self.card.text

    def _text(self) -> str:
        return verdict_card_html(self.state)

    def _refresh(self, *_events) -> None:
        self.card.text = self._text()

    def __panel__(self):
        return pn.Column(pn.pane.Markdown("### Verdict", margin=(0, 10)), self.card)


def verdict_card_html(state: DashboardState) -> str:
    """The verdict card of ``state`` (both fronts): mode, plan, selected layer, stale badge."""
    cmp = state.comparison
    card = text.verdict_html(
        cmp.verdict if cmp is not None else None,
        cmp.plan_label if cmp is not None else "",
        text.layer_summary(cmp, state.selected_layer),
    )
    return text.stale_badge(state.stale_note()) + card


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
    }


# The one layout of the dashboard: rows of view names, a nested list is a column. The Panel
# Dashboard, the ipywidgets front and the HTML report all arrange their views with it.
LAYOUT: list[list] = [
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
