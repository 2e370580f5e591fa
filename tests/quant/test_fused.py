"""The fused RTN kernel equals ``primitives.fake_quantize`` bit for bit, and never blocks."""

import threading

import pytest
import torch

from qviz.quant import QuantConfig, QuantPlan, fused
from qviz.quant.primitives import fake_quantize as eager

# (shape, group sizes): divisors, ragged multiples of 32, None (one group per row), g > in
SHAPES = [
    ((7, 96), [None, 32, 96, 12]),
    ((5, 200), [64, 128, None, 40]),  # 200 = 3 x 64 + 8, 128 + 72: ragged last groups
    ((3, 576), [128, 256]),
    ((1, 64), [32, None]),
]


def _compiled(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The fused kernel's own output (compiled and checked first); fails if it is not used."""
    fused.prepare(w, cfg)
    assert fused.wait(timeout=600), "the background compile never finished (deadlock?)"
    st = fused.status()
    if st["broken"]:
        pytest.skip(f"no compiler here: {st['broken']}")
    assert fused.is_ready(w, cfg), st
    g = w.shape[1] if cfg.group_size is None else min(cfg.group_size, w.shape[1])
    out = fused._FUSED.run(w, fused._key(w, g, cfg.symmetric), cfg.bits)
    assert out is not None
    return out


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]
    w[0] = -0.7  # a constant row: zero range in every group
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_equals_eager_bit_for_bit(dtype, symmetric):
    for shape, sizes in SHAPES:
        for g in sizes:
            w = _weight(shape, dtype, seed=shape[1] + (g or 0))
            for bits in range(2, 9):
                cfg = QuantConfig(bits, g, symmetric=symmetric)
                got = _compiled(w, cfg)
                want = eager(w, cfg)
                assert got.dtype == want.dtype == dtype
                assert torch.equal(got, want), (shape, g, bits, symmetric, dtype)


def test_transposed_layout_and_public_entry_point():
    w = _weight((48, 160), torch.float32).t()  # an "in_out" weight seen as [out, in]: strided
    cfg = QuantConfig(3, 32)
    assert torch.equal(_compiled(w, cfg), eager(w, cfg))
    assert torch.equal(fused.fake_quantize(w, cfg), eager(w, cfg))


def test_first_call_is_eager_and_does_not_wait_for_the_compiler(monkeypatch):
    """While the worker holds the compile lock, calls return the eager result at once."""
    w = _weight((4, 96), torch.float32)
    cfg = QuantConfig(4, 32)
    _compiled(w, cfg)
    assert fused._FUSED.lock.acquire(timeout=60)  # as if a compile were running
    try:
        done = threading.Event()
        result = {}

        def call():
            result["out"] = fused.fake_quantize(w, cfg)
            done.set()

        threading.Thread(target=call, daemon=True).start()
        assert done.wait(timeout=60), "fake_quantize blocked on the compile lock"
        assert torch.equal(result["out"], eager(w, cfg))
    finally:
        fused._FUSED.lock.release()


def test_env_forces_eager(monkeypatch):
    monkeypatch.setenv("QVIZ_FUSED", "0")
    assert not fused.enabled()
    w = _weight((3, 33 * 32), torch.float32, seed=5)  # a layout no other test compiles
    cfg = QuantConfig(4, 64)
    before = fused.status()["queued"] + fused.status()["ready"]
    assert torch.equal(fused.fake_quantize(w, cfg), eager(w, cfg))
    fused.prepare(w, cfg)
    assert not fused.is_ready(w, cfg)
    assert fused.status()["queued"] + fused.status()["ready"] == before  # nothing queued


def test_compiler_failure_falls_back_once(monkeypatch):
    """A compiler that raises marks the kernel broken (logged) and every call stays eager."""
    state = fused._Fused()
    monkeypatch.setattr(fused, "_FUSED", state)

    def boom(key):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(state, "_fn", boom)
    w = _weight((4, 64), torch.float32)
    cfg = QuantConfig(2, 32)
    assert torch.equal(fused.fake_quantize(w, cfg), eager(w, cfg))
    assert fused.wait(timeout=600)
    assert "no compiler" in fused.status()["broken"]
    assert torch.equal(fused.fake_quantize(w, cfg), eager(w, cfg))
    fused.prepare(w, cfg)
    assert fused.status()["queued"] == 0


def test_a_mismatching_kernel_is_kept_out(monkeypatch):
    """The self-check: a kernel that differs from eager by one ulp is never used."""
    state = fused._Fused()
    monkeypatch.setattr(fused, "_FUSED", state)

    def off_by_one_ulp(key):
        return lambda w, g, *rest: torch.nextafter(eager(w, QuantConfig(8, g)), torch.tensor(1e9))

    monkeypatch.setattr(state, "_fn", off_by_one_ulp)
    w = _weight((4, 64), torch.float32)
    cfg = QuantConfig(8, 32)
    fused.prepare(w, cfg)
    assert fused.wait(timeout=600)
    assert fused.status()["bad"] == 1 and not fused.is_ready(w, cfg)
    assert torch.equal(fused.fake_quantize(w, cfg), eager(w, cfg))


def test_callers_grad_modes_never_compile_in_the_foreground():
    w = _weight((6, 64), torch.float32, seed=9)
    cfg = QuantConfig(5, 32)
    key = fused._key(w, 32, False)
    _compiled(w, cfg)
    for mode in (torch.inference_mode, torch.enable_grad, torch.no_grad):
        with mode():
            out = fused._FUSED.run(w, key, cfg.bits)
            assert out is not None and torch.equal(out, eager(w, cfg)), mode
    with torch.inference_mode():
        wi = w.clone()  # an inference tensor: other guards, so eager rather than a compile here
    assert fused._FUSED.run(wi, key, cfg.bits) is None
    assert torch.equal(fused.fake_quantize(wi, cfg), eager(w, cfg))


@pytest.mark.parametrize("cfg", [QuantConfig(bits=3, group_size=32), QuantConfig(bits=4)])
def test_stacked_materialize_equals_one_weight_at_a_time(monkeypatch, cfg):
    """The GPU's stacked path (forced here on the CPU) gives every weight bit for bit what
    quantizing it alone gives, as separate results, and leaves the originals alone."""
    from qviz.quant import rtn
    from qviz.quant.engine import QuantEngine
    from tests.conftest import tiny_gpt2, tiny_llama

    for model in (tiny_llama(hidden=64, intermediate=96, layers=3), tiny_gpt2()):
        before = {n: p.clone() for n, p in model.named_parameters()}
        plan = QuantPlan.uniform(cfg)
        alone = QuantEngine(model).materialize(plan)
        monkeypatch.setattr(rtn, "stacks_on", lambda device: True)
        stacked = QuantEngine(model).materialize(plan)
        monkeypatch.undo()
        assert list(stacked) == list(alone)
        for name, w in alone.items():
            assert stacked[name].shape == w.shape and torch.equal(stacked[name], w), name
        # q/k/v of one layer are distinct tensors, not one shared result
        ptrs = {stacked[n].data_ptr() for n in stacked}
        assert len(ptrs) == len(stacked)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
