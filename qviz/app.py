"""The served app (``qviz serve``); the HTML report (``qviz report``) is ``qviz.report``.

One Lab per model is loaded once per process and shared by every browser session (each
session gets its own DashboardState and views). Pages show a loading indicator while the model
loads, and a message (not a server log line) when it cannot be loaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

_LABS: dict[str, object] = {}
# prompts longer than this are refused with a message in the served page (the API's default is
# Lab.max_prompt_tokens = 1024); QVIZ_SERVE_MAX_TOKENS changes it
SERVE_MAX_PROMPT_TOKENS = int(os.environ.get("QVIZ_SERVE_MAX_TOKENS", 256))
_ERRORS: dict[str, str] = {}
_LOAD_LOCK = threading.Lock()


def shared_lab(model: str):
    """The process-wide Lab of ``model``, loaded on first use (thread-safe)."""
    with _LOAD_LOCK:
        if model not in _LABS:
            from qviz.lab import Lab

            lab = Lab.load(model)
            lab.max_prompt_tokens = SERVE_MAX_PROMPT_TOKENS
            _LABS[model] = lab
        return _LABS[model]


_THREADS: dict[str, threading.Thread] = {}


def _loading(model: str) -> bool:
    t = _THREADS.get(model)
    return t is not None and (t.is_alive() or model in _LABS or model in _ERRORS)


def _load_in_background(model: str) -> threading.Thread:
    def run() -> None:
        try:
            shared_lab(model)
        except Exception as err:
            _ERRORS[model] = f"{type(err).__name__}: {err}"

    t = threading.Thread(target=run, name="qviz-load", daemon=True)
    _THREADS[model] = t
    t.start()
    return t


def _dashboard(lab, model: str, methods: Sequence[str]):
    """A session's Dashboard; ``methods`` set its method, then its side-by-side method."""
    from qviz.views import Dashboard
    from qviz.views.state import DashboardState

    state = DashboardState(model=model)
    state.param.update(dict(zip(("method", "method2"), methods, strict=False)))
    return Dashboard(lab, state)


def create_app(model: str = "smollm2-135m", methods: Sequence[str] = ()):
    """One session's page: a loading indicator, replaced by the Dashboard once the model is in.
    ``methods``: the dashboard's method, then the side-by-side one (both optional)."""
    import panel as pn

    header = pn.pane.Markdown(f"## qviz: how weight quantization breaks {model}", margin=(5, 10))
    root = pn.Column(header, sizing_mode="stretch_width")
    if model in _LABS:
        root.append(_dashboard(_LABS[model], model, methods))
        return root
    spinner = pn.indicators.LoadingSpinner(value=True, size=40, name="Loading model ...")
    msg = pn.pane.Str(f"Loading {model} ...", css_classes=["qviz-loading"])
    root.extend([pn.Row(spinner, msg)])

    def swap() -> bool:
        """Replace the spinner once the model is in (or failed); True when done."""
        if model in _LABS:
            root[1:] = [_dashboard(_LABS[model], model, methods)]
        elif model in _ERRORS:
            root[1:] = [
                pn.pane.Alert(
                    f"Could not load model {model!r}: {_ERRORS[model]}",
                    alert_type="danger",
                    css_classes=["qviz-error"],
                )
            ]
        else:
            return False
        return True

    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        # Under a server: poll on the session's own event loop (holds the document lock, no
        # cross-thread document edits), so a slow or racing load can never strand the page.
        if not _loading(model):
            _load_in_background(model)
        holder: dict = {}

        def poll() -> None:
            if swap() and "cb" in holder:
                holder["cb"].stop()

        holder["cb"] = pn.state.add_periodic_callback(poll, period=250)
    else:  # notebook or script: load now
        try:
            shared_lab(model)
        except Exception as err:
            _ERRORS[model] = f"{type(err).__name__}: {err}"
        swap()
    return root


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
