"""The served app (``qviz serve``); the HTML report (``qviz report``) is ``qviz.report``.

Labs live in one process-wide registry (``qviz.views.models.LabRegistry``): each model is loaded
once, on a background thread, and shared by every browser session that picks it (each session
gets its own DashboardState and views); at most ``QVIZ_SERVE_MODELS`` (default 2) stay resident.
Pages show the model selector, loading progress while a model loads, and a message (not a
server log line) when it cannot be loaded. A second tab shows a sweep's results file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# prompts longer than this are refused with a message in the served page (the API's default is
# Lab.max_prompt_tokens = 1024); QVIZ_SERVE_MAX_TOKENS changes it
SERVE_MAX_PROMPT_TOKENS = int(os.environ.get("QVIZ_SERVE_MAX_TOKENS", 256))
SERVE_MODELS = int(os.environ.get("QVIZ_SERVE_MODELS", 2))  # models resident at most
_REGISTRY = None


def _load_lab(model: str):
    from qviz.lab import Lab

    lab = Lab.load(model)
    lab.max_prompt_tokens = SERVE_MAX_PROMPT_TOKENS
    return lab


def registry():
    """The process-wide LabRegistry of the served app (created on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        from qviz.views.models import LabRegistry

        _REGISTRY = LabRegistry(_load_lab, max_resident=SERVE_MODELS)
    return _REGISTRY


def shared_lab(model: str):
    """The process-wide Lab of ``model``, loaded on first use (thread-safe)."""
    return registry().get(model)


def _load_in_background(model: str):
    """Start loading ``model`` on the registry's thread; its registry entry."""
    return registry().request(model)


def model_choices(model: str) -> list[str]:
    """The selector's models: the embedded ones and ``model`` (``--model``) when another."""
    from qviz.models.load import EMBEDDED

    return list(dict.fromkeys([model, *EMBEDDED]))


def model_page(model: str, methods: Sequence[str] = ()):
    """A session's ModelPage on the shared registry; ``methods`` set its first Dashboard's
    method, then its side-by-side method."""
    from qviz.views.models import ModelPage

    settings = dict(zip(("method", "method2"), methods, strict=False))
    return ModelPage(registry(), model, choices=model_choices(model), settings=settings)


def create_app(model: str = "smollm2-135m", methods: Sequence[str] = ()):
    """One session's page: the model selector, then tabs: the Dashboard (a loading indicator
    until its model is in) and the sweep results view. ``methods``: the dashboard's method,
    then its side-by-side method (both optional; ``qviz serve --method``)."""
    import panel as pn

    from qviz.views.frontier_tab import FrontierTab
    from qviz.views.sweep_tab import SweepTab

    page = model_page(model, methods)
    tabs = pn.Tabs(
        ("Diagnostics", page),
        ("Sweep results", SweepTab()),
        ("Memory frontier", FrontierTab()),
        dynamic=False,
    )
    return pn.Column(page.header, tabs, sizing_mode="stretch_width")


def serve(
    model: str = "smollm2-135m",
    port: int = 5006,
    address: str = "127.0.0.1",
    show: bool = False,
    methods: Sequence[str] = (),
) -> None:
    """Serve the Dashboard with Panel's server (resources served locally); blocks.
    ``methods``: the dashboard's method, then the side-by-side one (``--method``, repeatable)."""
    import panel as pn

    _load_in_background(model)
    origins = [f"127.0.0.1:{port}", f"localhost:{port}"]
    if address not in ("127.0.0.1", "localhost"):
        origins.append(f"{address}:{port}")
    print(f"qviz: serving {model} on http://{address}:{port}/", flush=True)

    def app():
        return create_app(model, methods)

    pn.serve(
        {"/": app},
        port=port,
        address=address,
        websocket_origin=origins,
        show=show,
        title="qviz",
        start=True,
    )
