"""Text views: the verdict card's HTML, one-line layer summaries, human labels and numbers.

Shared by the dashboard (both fronts) and the report; pure functions of result objects.
"""

from __future__ import annotations

import html
import math

import numpy as np

from qviz.metrics.verdict import EVIDENCE_LABELS
from qviz.results import Comparison, Verdict

# human labels of verdict evidence and table columns (fallback: snake_case -> words)
LABELS = {
    **EVIDENCE_LABELS,  # the verdict rule's own words for its evidence
    "isolation_first_broken": "first broken layer",
    "effective_bits": "bits per weight",
    "mib": "weight memory (MiB)",
}
RATES = {"max_flip_rate"}  # shown as percentages


def human(key: str) -> str:
    """The human label of an evidence or column key."""
    return LABELS.get(key, key.replace("_", " "))


def fmt(value, key: str = "") -> str:
    """A number as a person reads it: 0.333 not 0.333333, 12% for rates, "-" for missing."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        if key == "isolation_first_broken" and value < 0:
            return "none"
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "-"
        if key in RATES:
            return f"{v:.1%}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(value)


MODE_COLORS = {
    "healthy": "#2e7d32",
    "signal degradation": "#ef6c00",
    "computation collapse": "#c62828",
    "target not predicted": "#616161",
}


def verdict_html(
    verdict: Verdict | None, plan_label: str = "", layer_line: str = "", computing: bool = False
) -> str:
    """The verdict card's HTML: the mode in a coloured badge, the rule's own sentence (or its
    warning when the reference misses the target) and a table of its signs: human label,
    measured value, threshold, seen or not (``qviz.metrics.verdict``). No verdict: "no result
    yet", or with ``computing`` (a first look: the prompt's views shown, its evidence still
    running) that it is being computed, for ``plan_label``."""
    plan = f'<div class="qviz-plan">plan: {html.escape(plan_label)}</div>' if plan_label else ""
    if verdict is None:
        words = "verdict computing ..." if computing else "no result yet"
        data = ' data-mode="computing"' if computing else ""
        return (
            f'<div class="qviz-verdict"{data}><span class="qviz-verdict-mode">{words}</span>'
            f"{plan}</div>"
        )
    color = MODE_COLORS.get(verdict.mode, "#555555")
    rows = []
    for sign in verdict.signs:
        value = sign["value"]
        shown = fmt(value, "max_flip_rate" if sign["name"] == "severe_flips" else "")
        mark = "&#10007; seen" if sign["seen"] else "&#10003; no"
        weight = "bold" if sign["seen"] else "normal"
        rows.append(
            f'<tr style="font-weight:{weight}" data-sign="{html.escape(sign["name"])}">'
            f"<td>{html.escape(sign['label'])}</td><td>{html.escape(shown)}</td>"
            f"<td>{html.escape(str(sign['threshold']))}</td><td>{mark}</td></tr>"
        )
    head = "<tr><th>sign</th><th>measured</th><th>threshold</th><th></th></tr>"
    words = verdict.warning or verdict.sentence
    extra = f'<div class="qviz-layer">{html.escape(layer_line)}</div>' if layer_line else ""
    return (
        f'<div class="qviz-verdict" data-mode="{html.escape(verdict.mode)}">'
        f'<span class="qviz-verdict-mode" style="background:{color};color:white;'
        f'padding:4px 10px;border-radius:4px;font-weight:bold;font-size:1.2em">'
        f"{html.escape(verdict.mode)}</span>{plan}"
        f'<p class="qviz-sentence" style="margin:6px 0">{html.escape(words)}</p>{extra}'
        f'<table class="qviz-evidence" style="margin-top:6px;font-size:0.9em">'
        f"{head}{''.join(rows)}</table></div>"
    )


def layer_summary(cmp: Comparison | None, layer: int | None) -> str:
    """One line about decoder layer ``layer`` of ``cmp`` (for the verdict card)."""
    if cmp is None or layer is None:
        return ""
    n = len(cmp.ffn.flip_rate)
    if not 0 <= layer < n:
        return ""
    return (
        f"layer {layer}: CKA diag {cmp.cka.diagonal[layer + 1]:.3f}, "
        f"gate flips {cmp.ffn.flip_rate[layer]:.1%}, "
        f"attn entropy {float(np.mean(cmp.attention.quant_entropy[layer])):.3f}, "
        f"lens rank {int(cmp.lens.quantized.rank[layer + 1])}"
    )


def stale_note(shown: tuple | None, asked: tuple | None) -> str:
    """What differs between the result ``shown`` and the one ``asked``, both
    (plan label, prompt, target); "" when they agree or nothing is shown yet."""
    if shown is None or asked is None or tuple(shown) == tuple(asked):
        return ""
    if shown[0] != asked[0]:
        return f"stale: showing {shown[0]}, asked {asked[0]}"
    return "stale: showing the previous prompt or target"


def stale_badge(note: str) -> str:
    """A small orange badge holding ``note`` ("" when the note is empty)."""
    if not note:
        return ""
    return (
        '<div class="qviz-stale" style="color:#b26a00;border:1px solid #b26a00;'
        f'border-radius:4px;padding:2px 6px;margin-bottom:4px">{html.escape(note)}</div>'
    )
