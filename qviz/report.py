"""``qviz report``: a standalone HTML page a person reads (bokeh and CSS inline, offline).

A verdict table (human labels, formatted numbers, a full-precision row), one sentence per
bit-width, the memory/accuracy trade-off, then every view per bit-width arranged with the
dashboard's own layout (``qviz.views.components.LAYOUT``). The page fits 1,300 px.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

PAGE_WIDTH = 1240  # px of content; the page fits a 1,300 px window

# the verdict table's columns: (heading, evidence key or row field)
COLUMNS = [
    ("method", "method"),
    ("bits", "bits"),
    ("plan", "plan"),
    ("verdict", "verdict"),
    ("weight memory", "mib"),
    ("bits per weight", "effective_bits"),
    ("accuracy", "accuracy"),
    ("CKA diagonal (mean)", "cka_diag_mean"),
    ("answer rank", "quant_rank"),
    ("max gate sign flips", "max_flip_rate"),
    ("attention entropy (middle)", "mid_attn_entropy"),
    ("broken layers (isolation)", "isolation_broken_layers"),
]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"


def sentence(bits: int | str, cmp, row: dict) -> str:
    """One sentence on ``cmp`` (a Comparison at ``bits``, e.g. 4 or "gguf 4") for a reader."""
    from qviz.views.text import fmt

    ev = cmp.verdict.evidence
    signs = [k for k, v in ev.items() if k.startswith("sign_") and v is True]
    parts = [f"<b>{bits}-bit</b> ({html.escape(cmp.plan_label)}): {html.escape(cmp.verdict.mode)}"]
    facts = []
    if "cka_diag_mean" in ev:
        facts.append(f"the mean CKA diagonal is {fmt(ev['cka_diag_mean'])}")
    if "quant_rank" in ev and "ref_rank" in ev:
        facts.append(
            f"the answer ranks {_ordinal(int(ev['quant_rank']))} "
            f"(full precision: {_ordinal(int(ev['ref_rank']))})"
        )
    if "max_flip_rate" in ev:
        facts.append(f"at most {fmt(ev['max_flip_rate'], 'max_flip_rate')} of FFN gates flip sign")
    if ev.get("isolation_broken_layers"):
        facts.append(f"{ev['isolation_broken_layers']} layers are broken even on a perfect input")
    n_signs = sum(1 for k in ev if k.startswith("sign_"))
    if n_signs:
        facts.append(f"{len(signs)} of {n_signs} collapse signs show")
    if row.get("accuracy") == row.get("accuracy"):  # not NaN
        facts.append(f"fact recall {row['accuracy']:.0%}")
    return parts[0] + (": " + "; ".join(facts) if facts else "") + "."


def verdict_rows(comparisons: dict, memory: dict, fp_row: dict) -> list[dict]:
    """The table's rows: full precision first, then one per (method, bit-width) key of
    ``comparisons`` (a key is a bit-width, or (method spelling, bit-width)); values unformatted."""
    first = next(iter(comparisons.values()), None)
    ref_rank = first.verdict.evidence.get("ref_rank") if first is not None else None
    rows = [
        {
            **fp_row,
            "method": "-",
            "bits": 16,
            "plan": "full precision (fp16)",
            "verdict": "reference",
            "cka_diag_mean": 1.0,
            "quant_rank": ref_rank,
            "max_flip_rate": 0.0,
            "isolation_broken_layers": 0,
        }
    ]
    for key, cmp in comparisons.items():
        method, b = key if isinstance(key, tuple) else ("rtn", key)
        rows.append({**cmp.verdict.evidence, **memory[key], "method": method, "bits": b,
                     "plan": cmp.plan_label, "verdict": cmp.verdict.mode})  # fmt: skip
    return rows


def report_plans(methods: Sequence[str], bits: Sequence[int], group_size: int | None) -> dict:
    """{(method spelling, bits): QuantPlan} of every method at every bit-width, in order; a
    spelling that fixes its bits (``gguf:Q4_K``) gives one plan. Raises ValueError naming a bad
    spelling and the choices (``QuantConfig.from_spec``)."""
    from qviz.quant.config import QuantConfig, QuantPlan

    plans: dict = {}
    for spec in methods:
        for b in bits:
            cfg = QuantConfig.from_spec(spec, int(b), group_size)
            if all(p.default != cfg for p in plans.values()):
                plans[(spec, cfg.bits)] = QuantPlan.uniform(cfg)
    return plans


def section_class(key: tuple[str, int]) -> str:
    """The CSS class of a report section: ``qviz-bits-4`` for rtn, ``qviz-gguf-q4-k-bits-4``."""
    spec, b = key
    slug = "".join(c if c.isalnum() else "-" for c in spec.lower())
    return f"qviz-bits-{b}" if spec == "rtn" else f"qviz-{slug}-bits-{b}"


def table_html(rows: list[dict], n_facts: int) -> str:
    """The verdict table as HTML: human headings, formatted numbers, a badge per verdict."""
    from qviz.views.text import MODE_COLORS, fmt

    heads = [h if k != "accuracy" else f"accuracy ({n_facts} facts)" for h, k in COLUMNS]
    out = ["<table class='qviz-verdict-table'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in heads] + ["</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for _, key in COLUMNS:
            v = r.get(key)
            if key == "verdict":
                color = MODE_COLORS.get(str(v), "#555555")
                cell = f"<span class='qviz-badge' style='background:{color}'>{html.escape(str(v))}</span>"  # noqa: E501
            elif key == "mib":
                cell = f"{v:,.1f} MiB"
            elif key == "accuracy":
                cell = "-" if v is None or v != v else f"{v:.0%}"
            elif key == "effective_bits":
                cell = f"{v:.2f}"
            else:
                cell = html.escape(fmt(v, key))
            out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


STYLE = """<style>
.qviz-verdict-table { border-collapse: collapse; font: 13px sans-serif; max-width: 1240px; }
.qviz-verdict-table th { text-align: left; border-bottom: 2px solid #444; padding: 4px 8px;
  font-weight: 600; vertical-align: bottom; max-width: 110px; }
.qviz-verdict-table td { border-bottom: 1px solid #ddd; padding: 4px 8px; white-space: nowrap; }
.qviz-verdict-table tr:first-child td { background: #f4f4f4; }
.qviz-badge { color: white; padding: 1px 6px; border-radius: 3px; }
.qviz-sentences li { margin: 4px 0; font: 14px sans-serif; }
</style>"""


def build_report(
    lab,
    bits: Sequence[int],
    prompt: str,
    target: str,
    group_size: int | None = 128,
    n_facts: int = 60,
    trace: bool = False,
    methods: Sequence[str] = ("rtn",),
) -> str:
    """A standalone HTML page (bokeh and CSS inline): verdict table, a sentence per bit-width,
    the memory/accuracy trade-off and every view per bit-width; one section per method and
    bit-width when ``methods`` (CLI spellings: "rtn", "hqq", "gptq", "gguf", "gguf:Q4_K")
    names several, side by side in the table."""
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import Div
    from bokeh.resources import INLINE

    from qviz.lab import CKA_CONTEXT
    from qviz.quant.config import QuantPlan
    from qviz.views import plots, text
    from qviz.views.components import arrange

    plans = report_plans(methods, bits, group_size)
    table = lab.memory_table([QuantPlan.none(), *plans.values()], n_facts=n_facts)
    fp_row, memory = table.rows[0], dict(zip(plans, table.rows[1:], strict=True))
    comparisons, sections = {}, []
    for key, plan in plans.items():
        cmp = comparisons[key] = lab.compare(
            prompt, target=target, plan=plan, cka_context=CKA_CONTEXT
        )
        layer = len(cmp.ffn.flip_rate) // 2
        views = {
            "cka": plots.cka_plot(cmp.cka),
            "cka_diff": plots.cka_diff_plot(cmp.cka),
            "lens": plots.lens_plot(cmp.lens),
            "ffn": plots.ffn_plot(cmp.ffn),
            "attention": plots.attention_plot(cmp.attention),
            "attention_diff": plots.attention_diff_plot(cmp.attention),
        }
        if trace:
            views["patch"] = plots.patch_plot(lab.trace(prompt, target=target, plan=plan))
        for v in views.values():
            plots.select(v, layer)
        card = text.verdict_html(cmp.verdict, cmp.plan_label, text.layer_summary(cmp, layer))
        items = {k: v.root for k, v in views.items()}
        items["verdict"] = Div(text=card, width=330)
        title = Div(text=f"<h2>{_name(key)}-bit ({html.escape(cmp.plan_label)})</h2>")
        body = arrange(items, row, column)
        sections.append(column(title, body, css_classes=[section_class(key)]))
    rows = verdict_rows(comparisons, memory, fp_row)
    sentences = "".join(
        f"<li>{sentence(_name(k), cmp, memory[k])}</li>" for k, cmp in comparisons.items()
    )
    head = Div(
        text=(
            f"{STYLE}<h1>qviz report: {html.escape(str(lab.name))}</h1>"
            f"<p>prompt {html.escape(repr(prompt))}, target {html.escape(repr(target))}, "
            f"group size {group_size or 'per channel'}</p><h2>Verdicts</h2>"
            f"{table_html(rows, table.n_facts)}<ul class='qviz-sentences'>{sentences}</ul>"
        ),
        width=PAGE_WIDTH,
        css_classes=["qviz-summary"],
    )
    pareto = plots.pareto_plot([{**memory[k], "label": f"{_name(k)}-bit"} for k in plans])
    summary = column(head, pareto.root, css_classes=["qviz-summary-block"])
    return file_html(column(summary, *sections), INLINE, title=f"qviz report: {lab.name}")


def _name(key: tuple[str, int]) -> str:
    """How a section is named: "4" for rtn at 4 bits, "gguf:Q4_K 4" otherwise."""
    spec, b = key
    return str(b) if spec == "rtn" else f"{html.escape(spec)} {b}"


def export_pngs(
    report: Path, out_dir: Path, bits: Sequence[int], methods: Sequence[str] = ("rtn",)
) -> list[Path]:
    """Screenshots of the report (whole page and one per method and bit-width) through
    Playwright + chromium (rtn: ``bits4.png``; others ``gguf-q4-k-bits4.png``).

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
            for key in report_plans(methods, bits, 128):
                cls = section_class(key)
                path = out_dir / f"{cls.removeprefix('qviz-').replace('bits-', 'bits')}.png"
                page.locator(f".{cls}").first.screenshot(path=str(path))
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
