"""The served app (``qviz serve``) and the standalone HTML report (``qviz report``).

One Lab per model is loaded once per process and shared by every browser session (each
session gets its own DashboardState and views). Pages show a loading indicator while the model
loads, and a message (not a server log line) when it cannot be loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

_LABS: dict[str, object] = {}
_ERRORS: dict[str, str] = {}
_LOAD_LOCK = threading.Lock()


def shared_lab(model: str):
    """The process-wide Lab of ``model``, loaded on first use (thread-safe)."""
    with _LOAD_LOCK:
        if model not in _LABS:
            from qviz.lab import Lab

            _LABS[model] = Lab.load(model)
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


def create_app(model: str = "smollm2-135m"):
    """One session's page: a loading indicator, replaced by the Dashboard once the model is in."""
    import panel as pn

    from qviz.views import Dashboard

    header = pn.pane.Markdown(f"## qviz: how weight quantization breaks {model}", margin=(5, 10))
    root = pn.Column(header, sizing_mode="stretch_width")
    if model in _LABS:
        root.append(Dashboard(_LABS[model]))
        return root
    spinner = pn.indicators.LoadingSpinner(value=True, size=40, name="Loading model ...")
    msg = pn.pane.Str(f"Loading {model} ...", css_classes=["qviz-loading"])
    root.extend([pn.Row(spinner, msg)])

    def swap() -> bool:
        """Replace the spinner once the model is in (or failed); True when done."""
        if model in _LABS:
            root[1:] = [Dashboard(_LABS[model])]
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
) -> None:
    """Serve the Dashboard with Panel's server (resources served locally); blocks."""
    import panel as pn

    _load_in_background(model)
    origins = [f"127.0.0.1:{port}", f"localhost:{port}"]
    if address not in ("127.0.0.1", "localhost"):
        origins.append(f"{address}:{port}")
    print(f"qviz: serving {model} on http://{address}:{port}/", flush=True)

    def app():
        return create_app(model)

    pn.serve(
        {"/": app},
        port=port,
        address=address,
        websocket_origin=origins,
        show=show,
        title="qviz",
        start=True,
    )


# report ---------------------------------------------------------------------------------------
def build_report(
    lab,
    bits: Sequence[int],
    prompt: str,
    target: str,
    group_size: int | None = 128,
    n_facts: int = 60,
    trace: bool = False,
) -> str:
    """A standalone HTML page (bokeh and CSS inline): every view per bit-width, verdict table."""
    import html

    import pandas as pd
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import Div
    from bokeh.resources import INLINE

    from qviz.data import load_facts
    from qviz.quant.config import QuantConfig, QuantPlan
    from qviz.quant.memory import footprint
    from qviz.views import plots

    facts = load_facts()[:n_facts] if n_facts else None
    sections, verdict_rows, pareto_rows = [], [], []
    for b in bits:
        plan = QuantPlan.uniform(QuantConfig(bits=int(b), group_size=group_size))
        cmp = lab.compare(prompt, target=target, plan=plan)
        layer = len(cmp.ffn.flip_rate) // 2
        views = [plots.cka_plot(cmp.cka), plots.lens_plot(cmp.lens)]
        views += [plots.attention_plot(cmp.attention), plots.ffn_plot(cmp.ffn)]
        grid = None
        if trace and hasattr(lab, "trace"):
            grid = lab.trace(prompt, target=target, plan=plan, component="resid")
            views.append(plots.patch_plot(grid))
        for v in views:
            plots.select(v, layer)
        card = Div(
            text=plots.verdict_html(cmp.verdict, cmp.plan_label, plots.layer_summary(cmp, layer)),
            width=320,
        )
        title = Div(text=f"<h2>{int(b)}-bit ({html.escape(cmp.plan_label)})</h2>")
        roots = [v.root for v in views]
        body = column(
            title,
            row(roots[0], card),
            row(roots[1], column(roots[3], roots[2])),
            *([row(roots[4])] if grid is not None else []),
            css_classes=[f"qviz-bits-{int(b)}"],
        )
        sections.append(body)
        fp = footprint(lab.model, plan)
        acc = lab.evaluate(plan, prompts=facts).accuracy if n_facts else float("nan")
        verdict_rows.append(
            {
                "bits": int(b),
                "plan": cmp.plan_label,
                "verdict": cmp.verdict.mode,
                "MiB": round(fp.bytes / 2**20, 1),
                "bits/weight": round(fp.effective_bits, 3),
                f"accuracy ({n_facts} facts)": acc,
                **{
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in cmp.verdict.evidence.items()
                },
            }
        )
        pareto_rows.append(
            {
                "bits": int(b),
                "label": f"{int(b)}-bit",
                "mib": fp.bytes / 2**20,
                "effective_bits": fp.effective_bits,
                "accuracy": acc,
            }
        )
    table = pd.DataFrame(verdict_rows).to_html(index=False, classes="qviz-verdict-table", border=0)
    head = Div(
        text=(
            f"<h1>qviz report: {html.escape(str(lab.name))}</h1>"
            f"<p>prompt {html.escape(repr(prompt))}, target {html.escape(repr(target))}, "
            f"group size {group_size or 'per channel'}</p><h2>Verdicts</h2>{table}"
        ),
        width=1100,
        css_classes=["qviz-summary"],
    )
    pareto = plots.pareto_plot(pareto_rows)
    summary = column(head, pareto.root, css_classes=["qviz-summary-block"])
    return file_html(column(summary, *sections), INLINE, title=f"qviz report: {lab.name}")


def export_pngs(report: Path, out_dir: Path, bits: Sequence[int]) -> list[Path]:
    """Screenshots of the report (whole page and one per bit-width) through Playwright+chromium.

    Raises RuntimeError with what to install when Playwright or a chromium is missing.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError(
            "--png needs Playwright: pip install playwright (and a chromium, "
            "e.g. apt-get install chromium)"
        ) from err
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(
            "--png needs a chromium browser: apt-get install chromium (or set QVIZ_CHROMIUM)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.route("**/*", _local_only)
            page.goto(report.resolve().as_uri())
            page.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length > 0 && "
                "document.querySelector('.bk-Column, .bk-root, div') !== null"
            )
            page.locator(".qviz-summary-block").first.wait_for()
            path = out_dir / "report.png"
            page.screenshot(path=str(path), full_page=True)
            paths.append(path)
            for b in bits:
                path = out_dir / f"bits{int(b)}.png"
                page.locator(f".qviz-bits-{int(b)}").first.screenshot(path=str(path))
                paths.append(path)
        finally:
            browser.close()
    return paths


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str | None:
    """The chromium executable: $QVIZ_CHROMIUM, /usr/bin/chromium, or one on PATH."""
    import os
    import shutil

    for cand in (os.environ.get("QVIZ_CHROMIUM"), "/usr/bin/chromium"):
        if cand and Path(cand).exists():
            return cand
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _local_only(route) -> None:
    from urllib.parse import urlparse

    url = route.request.url
    host = urlparse(url).hostname
    if url.startswith(("file:", "data:", "blob:")) or host in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


# helpers for browser tests and ``qviz bench ui`` ---------------------------------------------
JS_CKA_FINGERPRINT = """() => {
  if (!window.Bokeh) return null;
  for (const doc of Bokeh.documents) {
    const src = doc.get_model_by_name('qviz_cka');
    if (!src) continue;
    const data = src.data;
    const col = data instanceof Map ? data.get('cka') : data['cka'];
    if (!col || col.length === 0) return null;
    let s = 0;
    for (let i = 0; i < col.length; i++) s += col[i] * ((i % 7) + 1);
    return col.length + ':' + s.toFixed(6);
  }
  return null;
}"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``qviz serve`` in a subprocess on a free 127.0.0.1 port; a context manager giving the URL.

    Waits until the page answers (up to ``timeout`` s); raises RuntimeError with the server's
    output when it does not come up. The process is terminated on exit.
    """

    def __init__(self, model: str = "smollm2-135m", timeout: float = 180.0) -> None:
        self.model = model
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = None
        self._log = None

    def __enter__(self) -> str:
        import os
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.request

        repo = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self._log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "qviz.cli", "serve", "--model", self.model]
        cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.3)
        out = self.output()
        self.__exit__(None, None, None)
        raise RuntimeError(f"qviz serve did not come up on {self.url}:\n{out}")

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the server printed."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-tail:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
