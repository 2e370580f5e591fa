"""Memory versus accuracy per plan: the dashboard's trade-off view and the report's table."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence

from qviz.cancel import check_cancel
from qviz.data import load_facts
from qviz.quant.config import QuantPlan
from qviz.quant.memory import footprint
from qviz.results import MemoryTable


def plan_bits(plan: QuantPlan) -> int:
    """The plan's default bit-width (16 for full precision)."""
    return int(plan.default.bits) if plan.default is not None else 16


def evaluate(lab, plan: QuantPlan, facts: list[dict], cancel: threading.Event | None):
    """``lab.evaluate`` on ``facts``, passing ``cancel`` where the Lab accepts it."""
    if cancel is not None and "cancel" in inspect.signature(lab.evaluate).parameters:
        return lab.evaluate(plan, prompts=facts, cancel=cancel)
    return lab.evaluate(plan, prompts=facts)


def memory_table(
    lab,
    plans: Sequence[QuantPlan],
    n_facts: int = 0,
    cancel: threading.Event | None = None,
) -> MemoryTable:
    """Weight memory (MiB, effective bits) of each plan and, when ``n_facts`` > 0, accuracy on
    the first ``n_facts`` bundled facts (checks ``cancel`` before each plan)."""
    facts = load_facts()[:n_facts] if n_facts else []
    rows = []
    for i, plan in enumerate(plans):
        check_cancel(cancel, f"before plan {i + 1} of {len(plans)} ({plan.label})")
        fp = footprint(lab.model, plan)
        acc = evaluate(lab, plan, facts, cancel).accuracy if facts else float("nan")
        rows.append(
            {
                "plan": plan.label,
                "bits": plan_bits(plan),
                "mib": fp.bytes / 2**20,
                "effective_bits": fp.effective_bits,
                "accuracy": float(acc),
            }
        )
    return MemoryTable(rows, n_facts=len(facts))
