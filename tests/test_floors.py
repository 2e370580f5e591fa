"""The one-way flow: no module imports a higher floor (models -> quant -> probes -> metrics ->
results -> studies -> Lab -> views -> app/cli), views never reach into the model, and no hooks
are registered outside qviz/probes/ (GPTQ's calibration capture excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qviz"
FLOORS = {
    "qviz.cancel": 0,
    "qviz.data": 0,
    "qviz.models": 1,
    "qviz.quant": 2,
    "qviz.probes": 3,
    "qviz.metrics": 4,
    "qviz.results": 5,
    "qviz.studies": 6,
    "qviz.lab": 7,
    "qviz.views": 8,
    "qviz.widgets": 9,
    "qviz.report": 9,
    "qviz.app": 9,
    "qviz.sweep": 9,
    "qviz.bench": 10,
    "qviz.cli": 10,
    "qviz": 10,  # the package's __init__ re-exports the API
}


def floor(module: str) -> int:
    """The floor of a dotted module name (the longest known prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in FLOORS:
            return FLOORS[name]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def runtime_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(imported qviz module, line) of every import outside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("qviz"):
                for alias in node.names:  # "from qviz import metrics" imports qviz.metrics
                    sub = f"qviz.{alias.name}"  # a subpackage, else a name of the API facade
                    full = (
                        (sub if sub in FLOORS else "qviz") if node.module == "qviz" else node.module
                    )
                    out.append((full, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("qviz")]
    return out


FILES = sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_reaches_a_higher_floor(path):
    me = module_name(path)
    mine = floor(me)
    up = [
        (m, line)
        for m, line in runtime_imports(ast.parse(path.read_text()))
        if floor(m) > mine and m != me
    ]
    assert not up, f"{me} (floor {mine}) imports higher floors: {up}"


def test_views_never_reach_the_model_engine_or_bundled_data():
    for path in (ROOT / "views").rglob("*.py"):
        text = path.read_text()
        for needle in (".model", ".engine", ".adapter", "qviz.data"):
            bad = [
                n
                for n, line in enumerate(text.splitlines(), 1)
                if f"lab{needle}" in line or (needle == "qviz.data" and needle in line)
            ]
            assert not bad, f"{path.name} uses {needle!r} at lines {bad}"


def test_forward_hooks_live_in_probes():
    allowed = {ROOT / "quant" / "gptq.py"}  # calibration capture, through models/access.py
    for path in FILES:
        if ROOT / "probes" in path.parents or path in allowed:
            continue
        assert "register_forward" not in path.read_text(), f"{path} registers a hook"


def test_a_higher_import_is_caught():
    tree = ast.parse("from qviz.lab import Lab\nfrom qviz import views\n")
    assert [floor(m) for m, _ in runtime_imports(tree)] == [7, 8] and floor("qviz.quant.rtn") == 2
