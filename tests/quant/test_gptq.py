"""GPTQ: beats round-to-nearest on its calibration inputs, leaves weights intact, caches."""

from __future__ import annotations

import warnings

import pytest
import torch

from qviz.data import load_text
from qviz.models.arch import get_adapter, weight_layout
from qviz.quant import gptq
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.engine import QuantEngine
from qviz.quant.primitives import fake_quantize
from tests.conftest import tiny_llama

CFGS = [
    QuantConfig(bits=3, group_size=32, method="gptq"),
    # 64 leaves a ragged last group on the 96-wide down_proj
    QuantConfig(bits=4, group_size=64, symmetric=True, method="gptq", act_order=True),
]


def _ids(n_seq=8, seq_len=32):
    return gptq.calibration_ids(None, n_seq=n_seq, seq_len=seq_len, vocab_size=97)


def _fp_inputs(model, adapter, ids):
    """{name: [N, in] inputs} of every decoder Linear in the full-precision model."""
    xs, handles = {}, []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for rel in adapter.linears:
            name = f"{adapter.layers}.{i}.{rel}"

            def hook(_m, args, name=name):
                xs[name] = args[0].reshape(-1, args[0].shape[-1]).double()

            handles.append(layer.get_submodule(rel).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return xs


def _oi(w, mod):
    return w.t() if weight_layout(mod) == "in_out" else w


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.label)
def test_gptq_beats_rtn_and_restores(tiny_model, cfg):
    model, adapter = tiny_model, get_adapter(tiny_model)
    ids = _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = _fp_inputs(model, adapter, ids)
    out = gptq.gptq_materialize(model, adapter, QuantPlan.uniform(cfg), ids, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert set(out) == set(xs)
    rtn_cfg = QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric)
    for name, x in xs.items():
        mod = model.get_submodule(name)
        w = _oi(mod.weight, mod).double()
        assert out[name].shape == mod.weight.shape
        # direct: GPTQ with this layer's own Hessian; and the sequential result
        direct = gptq.gptq_quantize(w.float(), 2 * x.t() @ x / x.shape[0], cfg).double()
        seq = _oi(out[name], mod).double()
        rtn = fake_quantize(w.float(), rtn_cfg).double()

        def err(q, w=w, x=x):
            return torch.linalg.norm(x @ (w - q).t())

        assert err(direct) <= err(rtn), name
        assert err(seq) <= err(rtn), name


def test_identity_hessian_is_rtn():
    """With H diagonal there is no error feedback: GPTQ is RTN (also with act_order, ragged)."""
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    for cfg in CFGS:
        H = torch.diag(torch.rand(96) + 0.5)
        rtn = fake_quantize(w, QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric))
        torch.testing.assert_close(gptq.gptq_quantize(w, H, cfg), rtn)


def test_dead_columns():
    torch.manual_seed(0)
    x = torch.randn(200, 64, dtype=torch.float64)
    x[:, 5] = 0
    w = torch.randn(16, 64)
    q = gptq.gptq_quantize(w, 2 * x.t() @ x / 200, CFGS[0])
    assert torch.isfinite(q).all() and q.shape == w.shape


def test_calibration_ids_deterministic():
    a, b = _ids(4, 16), _ids(4, 16)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert not torch.equal(a, gptq.calibration_ids(None, n_seq=4, seq_len=16, seed=1))


def test_disk_cache_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    calls = []
    real = gptq.gptq_materialize

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gptq, "gptq_materialize", counting)
    model, plan, ids = tiny_llama(), QuantPlan.uniform(CFGS[0]), _ids(4, 16)
    adapter = get_adapter(model)
    first = gptq.cached_gptq_materialize(model, adapter, plan, ids, progress=False)
    path = gptq.cache_path(model, plan, ids)
    assert path.exists() and len(calls) == 1
    second = gptq.cached_gptq_materialize(model, adapter, plan, ids, progress=False)
    assert len(calls) == 1  # loaded from disk
    assert all(torch.equal(first[k], second[k]) for k in first) and set(first) == set(second)

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncate
    with pytest.warns(UserWarning, match="rebuilding"):
        third = gptq.cached_gptq_materialize(model, adapter, plan, ids, progress=False)
    assert len(calls) == 2 and all(torch.equal(first[k], third[k]) for k in first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq.cached_gptq_materialize(model, adapter, plan, ids, progress=False)
    assert len(calls) == 2  # the rebuilt file is good

    data = bytearray(path.read_bytes())  # a flipped byte in the tensor data
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        gptq.cached_gptq_materialize(model, adapter, plan, ids, progress=False)
    assert len(calls) == 3


def test_engine_dispatches_gptq(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("QVIZ_GPTQ_NSEQ", "4")
    monkeypatch.setenv("QVIZ_GPTQ_SEQLEN", "16")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = QuantPlan.protect_first(CFGS[0], n=1, bits=8)
    plan = QuantPlan(default=plan.default, overrides=plan.overrides, embeddings=True)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        ref = model(ids).logits
        with QuantEngine(model).quantized(plan) as m:
            q = m(ids).logits
    assert not torch.equal(ref, q)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert len(list((tmp_path / "gptq").glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(gptq, "gptq_materialize", lambda *a, **k: calls.append(1))
    weights = QuantEngine(model).materialize(plan)  # a fresh engine: from disk
    assert not calls and "model.embed_tokens" in weights


@pytest.mark.model
def test_embedded_gptq_perplexity(embedded, tmp_path, monkeypatch):
    """SmolLM2-135M, group 128, 8 x 64 calibration tokens: at 3 bits GPTQ has lower perplexity
    than round-to-nearest; at 8 bits both are within 1% of full precision."""
    from qviz.lab import Lab

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("QVIZ_GPTQ_NSEQ", "8")
    monkeypatch.setenv("QVIZ_GPTQ_SEQLEN", "64")
    model, tok = embedded
    lab = Lab(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = load_text()[:6000]  # ~1,300 tokens: enough to separate the methods

    def ppl(bits, method):
        plan = QuantPlan.uniform(QuantConfig(bits=bits, method=method)) if bits else None
        return lab.perplexity(plan or QuantPlan.none(), text=text)

    fp = ppl(None, None)
    rtn3, gptq3 = ppl(3, "rtn"), ppl(3, "gptq")
    assert gptq3 < rtn3, (gptq3, rtn3)
    for method in ("rtn", "gptq"):
        assert abs(ppl(8, method) / fp - 1) < 0.01, method
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_cancel_leaves_model_and_cache_untouched(tmp_path, monkeypatch):
    """A cancelled run raises, changes no weight, caches nothing; progress reports each layer."""
    import threading

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("QVIZ_GPTQ_NSEQ", "4")
    monkeypatch.setenv("QVIZ_GPTQ_SEQLEN", "16")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine, plan, cancel, seen = QuantEngine(model), QuantPlan.uniform(CFGS[0]), None, []
    cancel = threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done == 1:
            cancel.set()  # as a user pressing "cancel" while layer 1 is running

    with pytest.raises(gptq.GPTQCancelled, match="layer 1 of 3"):
        engine.materialize(plan, cancel=cancel, on_progress=progress)
    assert seen == [(0, 3), (1, 3)]  # done=0 before the calibration inputs are captured
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert engine.cached_plans == [] and not list(tmp_path.rglob("*.safetensors"))
    steps = []
    engine.materialize(plan, on_progress=lambda d, t: steps.append(d))
    assert steps == [0, 1, 2, 3] and engine.cached_plans == [plan]


# concurrency: GPTQ off the engine lock, one run per plan ----------------------------------------
SMALL = QuantConfig(bits=3, group_size=32, method="gptq", n_seq=4, seq_len=16)
JOIN_S = 120  # only to detect a deadlock


def _start(fn):
    import threading

    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_rtn_plans_run_while_gptq_is_paused(tmp_path, monkeypatch):
    """A GPTQ run paused inside on_progress holds no lock: another thread materializes an RTN
    plan and runs a forward under it meanwhile. GPTQ then finishes while that RTN plan is swapped
    into the shared model, and its result equals a run on the untouched model."""
    import threading

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    engine, plan = QuantEngine(model), QuantPlan.uniform(SMALL)
    rtn = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    paused, resume, last_layer, seen = threading.Event(), threading.Event(), threading.Event(), []

    def on_progress(done, total):
        seen.append(done)
        if done == 1:
            paused.set()
            resume.wait(JOIN_S)
        if done == total:
            last_layer.set()

    gptq_thread, gptq_box = _start(lambda: engine.materialize(plan, on_progress=on_progress))
    assert paused.wait(JOIN_S)

    def rtn_work():
        engine.materialize(rtn)
        with engine.quantized(rtn), torch.no_grad():
            return model(torch.arange(8)[None]).logits

    rtn_thread, rtn_box = _start(rtn_work)
    rtn_thread.join(JOIN_S)
    assert not rtn_thread.is_alive(), "RTN waited for the paused GPTQ run"
    assert "error" not in rtn_box and torch.isfinite(rtn_box["result"]).all()
    assert gptq_thread.is_alive() and seen == [0, 1]  # still paused at layer 1

    with engine.quantized(rtn):  # the shared weights are RTN's while GPTQ runs layers 1 and 2
        resume.set()
        assert last_layer.wait(JOIN_S)
    gptq_thread.join(JOIN_S)
    assert not gptq_thread.is_alive() and "error" not in gptq_box
    assert seen == [0, 1, 2, 3] and set(engine.cached_plans) == {rtn, plan}
    for k, v in model.state_dict().items():
        assert torch.equal(snap[k], v), k
    calib = gptq.calibration_ids(None, n_seq=4, seq_len=16, vocab_size=97)
    ref = gptq.gptq_materialize(model, get_adapter(model), plan, calib, progress=False)
    assert set(ref) == set(gptq_box["result"])
    assert all(torch.equal(ref[k], gptq_box["result"][k]) for k in ref)


def test_two_requests_share_one_run_and_one_may_leave(tmp_path, monkeypatch):
    """The second request for a running plan joins it (one GPTQ run); when the first is
    cancelled the run goes on for the second, which gets the result."""
    import threading

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    calls, real = [], gptq.gptq_materialize

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gptq, "gptq_materialize", counting)
    model = tiny_llama()
    engine, plan = QuantEngine(model), QuantPlan.uniform(SMALL)
    paused, resume = threading.Event(), threading.Event()
    first_cancel, second_seen = threading.Event(), []

    def first_progress(done, total):
        if done == 1:
            paused.set()
            resume.wait(JOIN_S)

    first, first_box = _start(
        lambda: engine.materialize(plan, cancel=first_cancel, on_progress=first_progress)
    )
    assert paused.wait(JOIN_S)
    second, second_box = _start(
        lambda: engine.materialize(plan, on_progress=lambda d, t: second_seen.append(d))
    )
    while not second_seen:  # the late joiner hears the latest progress at once
        second.join(0.01)
    first_cancel.set()
    first.join(JOIN_S)
    assert isinstance(first_box.get("error"), gptq.GPTQCancelled)
    assert "layer 1 of 3" in str(first_box["error"])
    resume.set()
    second.join(JOIN_S)
    assert not second.is_alive() and "error" not in second_box
    assert len(calls) == 1 and second_seen == [1, 2, 3]
    assert engine.cached_plans == [plan] and engine.materializations == 1
    assert engine.materialize(plan) is second_box["result"]


def test_a_plan_mixing_methods_feeds_gptq_the_rtn_layers(tmp_path, monkeypatch):
    """RTN on layer 0 (materialized first, handed to GPTQ), GPTQ on layers 1-2 calibrated on
    layer 0's RTN outputs: the same weights as one sequential run over the whole plan."""
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    rtn = QuantConfig(bits=4, group_size=32)
    plan = QuantPlan(default=SMALL, overrides=((0, rtn),))
    engine = QuantEngine(model)
    engine.progress = False
    weights = engine.materialize(plan)
    q0 = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weights["model.layers.0.self_attn.q_proj"], fake_quantize(q0, rtn))
    calib = gptq.calibration_ids(None, n_seq=4, seq_len=16, vocab_size=97)
    ref = gptq.gptq_materialize(model, get_adapter(model), plan, calib, progress=False)
    assert set(ref) == set(weights) and all(torch.equal(ref[k], weights[k]) for k in ref)


# the implementation before the speed-up, kept verbatim as the reference ------------------------
def _reference_quantize(w, H, cfg, blocksize=128):
    """gptq_quantize as it was (per-column loop on [out, in], lazy block updates)."""
    from qviz.quant.primitives import _scale_zero, group_size_for

    n_in = w.shape[1]
    g = group_size_for(cfg, n_in)
    qmax = 2**cfg.bits - 1
    W = w.detach().float().clone()
    H = H.detach().to(torch.float64, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if cfg.setting("act_order"):
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(n_in)
    invperm = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = gptq._inverse_cholesky(H, cfg.setting("damp")).float()
    group_of = (perm // g).tolist()
    scale = torch.empty(W.shape[0], (n_in + g - 1) // g)
    zero = torch.empty_like(scale)
    done, Q = set(), torch.empty_like(W)
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = group_of[i1 + i]
            if j not in done:
                pos = invperm[j * g : min((j + 1) * g, n_in)]
                inside = pos < i2
                cur = torch.empty(W.shape[0], pos.numel())
                cur[:, inside] = W1[:, pos[inside] - i1]
                out = pos[~inside]
                if out.numel():
                    cur[:, ~inside] = W[:, out] - Err1[:, :i] @ Hinv[i1 : i1 + i, out]
                s, z = _scale_zero(cur, cfg)
                scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
                done.add(j)
            s, z = scale[:, j], zero[:, j]
            col = W1[:, i]
            q = torch.sub(col, z).div_(s).round_().clamp_(0, qmax).mul_(s).add_(z)
            Q[:, i1 + i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, invperm].to(w.dtype)


def _reference_materialize(model, adapter, cfg, ids, batch=16):
    """gptq_materialize as it was, for a uniform GPTQ plan: each Linear's own H (float32 per
    chunk, float64 sum) from a full layer forward, quantized alone, then the outputs forward."""
    from qviz.models.access import hidden_out

    layers = adapter.decoder_layers(model)
    out = {}
    with torch.no_grad():
        chunks = gptq._capture_inputs(model, layers[0], ids, batch)
        for i, layer in enumerate(layers):
            mods = {rel: layer.get_submodule(rel) for rel in adapter.linears}
            acc = {rel: [0, 0] for rel in mods}

            def hook(_m, args, rel, acc=acc):
                flat = args[0].reshape(-1, args[0].shape[-1]).float()
                acc[rel][0] = acc[rel][0] + (flat.t() @ flat).double()
                acc[rel][1] += flat.shape[0]

            hs = [
                m.register_forward_pre_hook(lambda m, a, r=r, f=hook: f(m, a, r))
                for r, m in mods.items()
            ]
            for h, kw, a in chunks:
                layer(h, *a, **kw)
            for h in hs:
                h.remove()
            new = {}
            for rel, mod in mods.items():
                H = acc[rel][0] * (2 / acc[rel][1])
                q = _reference_quantize(_oi(mod.weight.data, mod), H, cfg)
                new[rel] = _oi(q, mod).contiguous()
                out[f"{adapter.layers}.{i}.{rel}"] = new[rel]
            saved = {r: mods[r].weight.data for r in new}
            for r, q in new.items():
                mods[r].weight.data = q
            chunks = [(hidden_out(layer(h, *a, **kw)), kw, a) for h, kw, a in chunks]
            for r, w in saved.items():
                mods[r].weight.data = w
    return out


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.label)
def test_equal_to_the_implementation_before_the_speed_up(tiny_model, cfg):
    """One x^T x per distinct input (shared by its readers) and the calibration forward cut
    after the last Linear's input change nothing: the same weights, bit for bit."""
    model, adapter = tiny_model, get_adapter(tiny_model)
    ids = _ids(n_seq=20, seq_len=32)  # two chunks of 16 and 4 sequences
    want = _reference_materialize(model, adapter, cfg, ids)
    got = gptq.gptq_materialize(model, adapter, QuantPlan.uniform(cfg), ids, progress=False)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    torch.manual_seed(0)
    w, x = torch.randn(96, 200), torch.randn(500, 200)
    H = 2 * x.t().double() @ x.double() / 500
    for c in CFGS:
        q, ref = gptq.gptq_quantize(w, H, c, blocksize=64), _reference_quantize(w, H, c, 64)
        assert torch.equal(q, ref)


def test_hqq_layers_of_a_mixed_plan_are_quantized_while_gptq_calibrates(tmp_path, monkeypatch):
    """GPTQ on layers 0 and 2, HQQ on layer 1 (GPTQ's share runs first: layer 0 is GPTQ):
    layer 2 calibrates on layer 1's HQQ outputs, not on full-precision ones."""
    pytest.importorskip("hqq")
    from qviz.quant.hqq import hqq_quantize

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    model = tiny_llama()
    hqq = QuantConfig(bits=2, group_size=32, method="hqq")
    plan = QuantPlan(default=SMALL, overrides=((1, hqq),))
    engine = QuantEngine(model)
    engine.progress = False
    weights = engine.materialize(plan)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(weights[name], hqq_quantize(model.get_submodule(name).weight, 2, 32))
    calib = gptq.calibration_ids(None, n_seq=4, seq_len=16, vocab_size=97)
    adapter = get_adapter(model)
    layer1 = {k: v for k, v in weights.items() if ".layers.1." in k}
    ref = gptq.gptq_materialize(model, adapter, plan, calib, progress=False, prior=layer1)
    fp1 = QuantPlan(default=SMALL, overrides=((1, None),))
    at_fp = gptq.gptq_materialize(model, adapter, fp1, calib, progress=False)
    q2 = "model.layers.2.self_attn.q_proj"
    assert torch.equal(ref[q2], weights[q2])
    assert not torch.equal(at_fp[q2], weights[q2])  # the bug: layer 1 left at full precision
    # without a prior, gptq_materialize quantizes the HQQ layer itself (from HQQ's disk cache)
    alone = gptq.gptq_materialize(model, adapter, plan, calib, progress=False)
    assert all(torch.equal(alone[k], weights[k]) for k in weights)
