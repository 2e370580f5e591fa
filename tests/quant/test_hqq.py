"""HQQ: equal to the hqq library's own result, cached on disk, progress, cancel, clear errors."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from qviz.cancel import Cancelled
from qviz.quant import hqq as hqq_mod
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.engine import QuantEngine
from qviz.quant.memory import footprint
from tests.conftest import tiny_llama

pytest.importorskip("hqq")

CFG = QuantConfig(4, 32, method="hqq")


def _library(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The hqq package called directly, as its README does (independent of qviz's wrapper)."""
    from hqq.core.quantize import Quantizer

    wq, meta = Quantizer.quantize(
        w.float(),
        nbits=bits,
        group_size=group_size,
        axis=1,
        optimize=True,
        compute_dtype=torch.float32,
        bitpack=False,
        device="cpu",
    )
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(wq, meta)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (2, 16)])
def test_equals_the_library(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    before = w.clone()
    out = hqq_mod.hqq_quantize(w, bits, group_size)
    assert torch.equal(out, _library(w, bits, group_size))
    assert torch.equal(w, before)
    assert len(torch.unique(out[0, :group_size])) <= 2**bits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_engine_progress_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    snap = _snapshot(model)
    plan = QuantPlan.uniform(CFG)
    engine = QuantEngine(model)
    engine.progress = False
    seen = []
    weights = engine.materialize(plan, on_progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight
    assert torch.equal(weights[name], _library(w, 4, 32))
    assert _same(model, snap)
    assert len(list((tmp_path / "hqq").glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed instead of loaded")

    monkeypatch.setattr(hqq_mod, "hqq_quantize", boom)
    again = QuantEngine(model)
    again.progress = False
    loaded = again.materialize(plan)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_cancel_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    snap = _snapshot(model)
    engine = QuantEngine(model)
    engine.progress = False
    cancel = threading.Event()

    def progress(done, total):
        if done == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.materialize(QuantPlan.uniform(CFG), cancel=cancel, on_progress=progress)
    assert not list(tmp_path.rglob("*.safetensors"))
    assert engine.cached_plans == []
    assert _same(model, snap)


def test_bad_settings_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    engine = QuantEngine(model)
    # 64 does not divide the 96-wide down_proj
    with pytest.raises(ValueError, match=r"group_size=64.*down_proj.*in_features=96.*\[16, 32"):
        engine.check(QuantPlan.uniform(QuantConfig(4, 64, method="hqq")))
    with pytest.raises(ValueError, match=r"bits=7; choices: \(2, 3, 4, 5, 6, 8\)"):
        engine.check(QuantPlan.uniform(QuantConfig(7, 32, method="hqq")))
    with pytest.raises(ValueError, match="hqq' is asymmetric"):
        engine.check(QuantPlan.uniform(QuantConfig(4, 32, symmetric=True, method="hqq")))
    assert not list(tmp_path.rglob("*.safetensors")) and engine.cached_plans == []


def test_not_installed_names_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    engine = QuantEngine(tiny_llama())
    with pytest.raises(ImportError, match="pip install hqq"):
        engine.check(QuantPlan.uniform(CFG))


def test_footprint_counts_scale_and_zero():
    model = tiny_llama()
    fp = footprint(model, QuantPlan.uniform(CFG), include_embeddings=False)
    df = fp.to_frame()
    assert (df.bytes * 8 / df.params == 4 + 32 / 32).all()
    ch = footprint(model, QuantPlan.uniform(QuantConfig(3, None, method="hqq")), False)
    row = ch.to_frame().set_index("name").loc["model.layers.0.mlp.down_proj"]
    assert row.bytes * 8 == row.params * 3 + 64 * 32  # 64 rows, one scale + zero each


_CHILD = """
import sys, torch
from qviz.quant import hqq as hqq_mod
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.engine import QuantEngine
from tests.conftest import tiny_llama

def boom(*a, **k):
    raise SystemExit("recomputed instead of loaded")

hqq_mod.hqq_quantize = boom
engine = QuantEngine(tiny_llama())
engine.progress = False
w = engine.materialize(QuantPlan.uniform(QuantConfig(4, 32, method="hqq")))
torch.save(w, sys.argv[1])
"""


def test_a_new_process_loads_from_the_disk_cache(tmp_path, monkeypatch):
    import os
    import subprocess
    from pathlib import Path

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    engine = QuantEngine(tiny_llama())
    engine.progress = False
    weights = engine.materialize(QuantPlan.uniform(CFG))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = tmp_path / "child.pt"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out)], cwd=root, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    loaded = torch.load(out)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
