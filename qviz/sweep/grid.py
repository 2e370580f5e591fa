"""A sweep's grid: the choices, validated whole before any task starts, and its cells."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("verdict", "perplexity", "facts", "cka", "mib")
PLAN_KINDS = ("uniform", "protect_first:N[:BITS]", "only_first:N")
PROMPT, TARGET = "The capital of France is", " Paris"
PPL_CHARS = 2000  # perplexity over the first PPL_CHARS characters of the bundled prose
N_FACTS = 16  # fact recall over the first N_FACTS bundled facts
KEY_COLUMNS = ("model", "method", "bits", "group_size", "plan")
CONNECT_TIMEOUT = 5.0  # seconds to reach a tcp:// scheduler


# validation -----------------------------------------------------------------------------------
def check_model(name: str) -> str:
    """An embedded name, an existing local directory or an ``org/name`` hub id; else ValueError."""
    from qviz.models.load import EMBEDDED

    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name in EMBEDDED or Path(name).is_dir():
        return name
    if name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "/")):
        return name  # a hub id: resolved by the worker that loads it
    raise ValueError(
        f"unknown model {name!r}: choices are the embedded models {list(EMBEDDED)}, an existing "
        "local directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
    )


def parse_plan(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"uniform"`` | ``"protect_first:N[:BITS]"`` | ``"only_first:N"`` -> (kind, ints)."""
    kind, _, rest = str(spec).partition(":")
    try:
        args = tuple(int(a) for a in rest.split(":")) if rest else ()
    except ValueError:
        args = None
    ok = args is not None and (
        (kind == "uniform" and not args)
        or (kind == "protect_first" and len(args) <= 2 and all(a >= 0 for a in args))
        or (kind == "only_first" and len(args) == 1 and args[0] >= 0)
    )
    if kind == "protect_first" and ok and len(args) == 2:
        ok = 2 <= args[1] <= 8
    if not ok:
        raise ValueError(f"unknown plan spelling {spec!r}: choices are {list(PLAN_KINDS)}")
    return kind, args


def make_plan(spec: str, method: str, bits: int, group_size: int | None):
    """The ``QuantPlan`` of one cell (raises ValueError for a bad combination)."""
    from qviz.quant.config import QuantConfig, QuantPlan

    cfg = QuantConfig(bits, group_size, method=method)
    kind, args = parse_plan(spec)
    if kind == "protect_first":
        return QuantPlan.protect_first(cfg, *args)
    if kind == "only_first":
        return QuantPlan.only_layers(cfg, range(args[0]))
    return QuantPlan.uniform(cfg)


def _choice(kind: str, value: Any, choices: Sequence) -> Any:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}: choices are {list(choices)}")
    return value


def _tuple(values: Any) -> tuple:
    if isinstance(values, (str, int)) or values is None:
        return (values,)
    return tuple(values)


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights: the GGUF sha256 of an embedded model, a hash of a local
    directory's config and file sizes, else the name itself (a hub id)."""
    from qviz.models.load import EMBEDDED

    if name in EMBEDDED:
        return f"{name}@{EMBEDDED[name].sha256[:16]}"
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
        return f"{path.resolve()}@{h.hexdigest()[:16]}"
    return name


def calibration_id() -> str:
    """The data every cell is measured on (bundled prose and facts, slice sizes, probe prompt)
    and that calibrated methods calibrate on: part of each row's key."""
    from qviz.data import load_facts, load_text

    blob = json.dumps([load_text(), load_facts(), PPL_CHARS, N_FACTS, PROMPT, TARGET])
    return "bundled@" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One task's specification: plain values only (it travels to the workers)."""

    model: str
    method: str
    bits: int
    group_size: int | None
    plan: str
    metrics: tuple[str, ...]
    plan_label: str
    key: str


@dataclass(frozen=True)
class Grid:
    """The cross product models x methods x bits x group_sizes x plans, measured by ``metrics``.

    group_sizes: ints, or None / 0 for one group per output row. plans: ``"uniform"``,
    ``"protect_first:N[:BITS]"`` (layers 0..N-1 at BITS, default 8), ``"only_first:N"``.
    metrics: any of ``METRICS``. Every value is checked here, naming the bad one and the choices.
    """

    models: tuple[str, ...]
    methods: tuple[str, ...]
    bits: tuple[int, ...]
    group_sizes: tuple[int | None, ...]
    plans: tuple[str, ...] = ("uniform",)
    metrics: tuple[str, ...] = ("verdict", "perplexity")
    cells: tuple[Cell, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from qviz.quant.methods import METHODS

        norm = {
            "models": tuple(check_model(m) for m in _tuple(self.models)),
            "methods": tuple(_choice("method", m, list(METHODS)) for m in _tuple(self.methods)),
            "bits": _tuple(self.bits),
            "group_sizes": tuple(g or None for g in _tuple(self.group_sizes)),
            "plans": _tuple(self.plans),
            "metrics": tuple(_choice("metric", m, METRICS) for m in _tuple(self.metrics)),
        }
        for name, values in norm.items():
            if not values:
                raise ValueError(f"{name} is empty: give at least one value")
            object.__setattr__(self, name, values)
        for p in self.plans:
            parse_plan(p)
        calib = calibration_id()
        metrics = tuple(sorted(set(self.metrics)))
        cells = []
        for model in self.models:
            fp = model_fingerprint(model)
            for method in self.methods:
                for bits in self.bits:
                    for gs in self.group_sizes:
                        for spec in self.plans:
                            label = make_plan(spec, method, bits, gs).label  # validates bits, gs
                            blob = json.dumps([fp, label, calib, metrics])
                            key = hashlib.sha256(blob.encode()).hexdigest()[:20]
                            cells.append(Cell(model, method, bits, gs, spec, metrics, label, key))
        object.__setattr__(self, "cells", tuple(cells))

    def __len__(self) -> int:
        return len(self.cells)
