"""A fused round-to-nearest materialize: ``fake_quantize`` in one read and one write per weight.

``primitives.fake_quantize`` makes about 8 passes over each chunk (aminmax, sub, div, round,
clamp, mul, add, the copy into the output). Here the same formula, in the same operation order
and dtypes, is handed to ``torch.compile`` (inductor: a C++/OpenMP kernel on CPU, Triton on
CUDA), which fuses it into one reduction and one pointwise loop. The result is equal bit for bit
to ``fake_quantize``: every step is an IEEE float32 operation done in the same order (division
stays a division: the divisors are passed as tensors, so inductor cannot turn them into
multiplications by a reciprocal; inductor's C++ flags keep ``-ffp-contract=off`` and
``-fno-unsafe-math-optimizations``, so ``codes * scale + zero`` is not contracted into an FMA).

Compilation never blocks a caller. :func:`fake_quantize` looks up the weight's *key* (shape,
strides, dtype, device, group size, symmetric); a key the background worker has compiled *and
checked* runs the fused kernel, any other key runs today's eager ``fake_quantize`` and is queued
for the worker. The worker (one daemon thread) compiles the key on a random weight of the same
layout, then checks the kernel against the eager formula bit for bit at every bit-width 2..8
(with a constant row: zero range); a key that differs stays eager (logged once). If the compiler
fails (no C++ compiler, no Triton), the failure is logged once and everything stays eager. A
caller's thread never compiles: the kernel runs under ``set_stance("fail_on_recompile")`` (and
outside inference mode), and a guard that fails there (e.g. an inference tensor) means eager.
Compiled kernels persist in inductor's on-disk cache, so a later process compiles in seconds.

``QVIZ_FUSED=0`` forces the eager path (debugging). On CUDA, Triton's kernel is compiled with
``eager_numerics()`` (IEEE division, no FMA contraction) so that it can pass the same check;
tests/test_cuda.py runs it where a GPU is.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import types

import torch

from qviz.quant import primitives
from qviz.quant.config import QuantConfig
from qviz.quant.primitives import fake_quantize as eager_fake_quantize
from qviz.quant.primitives import group_size_for

log = logging.getLogger(__name__)

_Key = tuple  # (shape, strides, dtype, device, group size, symmetric)


def enabled() -> bool:
    """False when ``QVIZ_FUSED=0`` (or ``false``/``off``/``no``): always the eager path."""
    return os.environ.get("QVIZ_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


def _groups(x: torch.Tensor, scale_div, qmax, neg_half, symmetric: bool) -> torch.Tensor:
    """float32 [rows, k, g] -> fake-quantized [rows, k, g]; ``primitives._scale_zero`` and
    ``fake_quantize``'s formula, op for op (the scalars are 0-d float32 tensors)."""
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / scale_div
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = scale * neg_half
    else:
        mn, mx = torch.aminmax(x, dim=-1, keepdim=True)
        scale = (mx - mn) / scale_div
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = mn
    codes = torch.minimum(torch.clamp_min(torch.round((x - zero) / scale), 0), qmax)
    return codes * scale + zero


def _kernel(w: torch.Tensor, g: int, scale_div, qmax, neg_half, symmetric: bool) -> torch.Tensor:
    """w [rows, in] (any float dtype) -> fake-quantized [rows, in] of w's dtype."""
    x = w.float()
    rows, n = x.shape
    k = n // g
    outs = [_groups(x[:, : k * g].reshape(rows, k, g), scale_div, qmax, neg_half, symmetric)]
    if k * g != n:  # the ragged last group of each row
        tail = x[:, k * g :].reshape(rows, 1, n - k * g)
        outs.append(_groups(tail, scale_div, qmax, neg_half, symmetric))
    out = torch.cat([o.reshape(rows, -1) for o in outs], 1) if len(outs) > 1 else outs[0]
    return out.reshape(rows, n).to(w.dtype)


def _scalars(bits: int, symmetric: bool, device: torch.device):
    """The 0-d float32 tensors (scale divisor, qmax, -2**(bits-1)) on ``device``: tensors, not
    Python numbers, so the kernel neither recompiles per bit-width nor folds a division by a
    constant into a multiplication."""
    half = 2 ** (bits - 1)
    div = half - 1 if symmetric else 2**bits - 1
    f = dict(dtype=torch.float32, device=device)
    return (
        torch.tensor(float(div), **f),
        torch.tensor(float(2**bits - 1), **f),
        torch.tensor(float(-half), **f),
    )


def eager_numerics() -> dict:
    """Inductor options that keep a Triton kernel's float32 arithmetic that of eager CUDA kernels:
    division rounded to nearest (Triton's ``/`` is the approximate ``div.full``) and no mul+add
    contracted into one FMA (``emulate_precision_casts`` turns Triton's fp fusion off). Only
    the options this torch knows (their names moved between releases)."""
    from torch._inductor import config

    known = config.get_config_copy()
    wanted = (
        "emulate_precision_casts",
        "eager_numerics.division_rounding",
        "emulate_divison_rounding",  # its name before eager_numerics (sic)
    )
    return {k: True for k in wanted if k in known}


class _Fused:
    """The process's compiled kernel, its checked keys, and the background worker."""

    def __init__(self) -> None:
        self.ready: set[_Key] = set()  # compiled and checked bit for bit
        self.bad: set[_Key] = set()  # compiled but not equal: eager for good
        self.queued: set[_Key] = set()
        self.broken: str | None = None  # the compiler failed: eager for good
        self.compile_s: dict[_Key, float] = {}
        self.lock = threading.Lock()  # held while the worker compiles / while a kernel runs
        self.state = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None
        self.compiled: dict[_Key, object] = {}
        self.scalars: dict[tuple, tuple] = {}
        self.stopping = False
        self.refused: set[_Key] = set()  # ready, but its guards failed in a caller's state

    def _fn(self, key: _Key):
        """The compiled kernel of ``key``: one static-shape graph per layout, each on its own
        copy of ``_kernel``'s code object, so that dynamo's per-code recompile limit (8) never
        sends a layout back to eager, and no shape goes dynamic (slower kernels)."""
        if key not in self.compiled:
            fn = types.FunctionType(_kernel.__code__.replace(), _kernel.__globals__, "_kernel")
            opts = eager_numerics() if key[3].startswith("cuda") else {}
            self.compiled[key] = torch.compile(fn, dynamic=False, options=opts or None)
        return self.compiled[key]

    def scalars_for(self, bits: int, symmetric: bool, device: torch.device):
        key = (bits, symmetric, str(device))
        if key not in self.scalars:
            self.scalars[key] = _scalars(bits, symmetric, device)
        return self.scalars[key]

    def submit(self, key: _Key) -> None:
        with self.state:
            if key in self.queued or key in self.ready or key in self.bad or self.broken:
                return
            self.queued.add(key)
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._work, name="qviz fused", daemon=True)
                self.worker.start()
        self.jobs.put(key)

    def stop(self) -> None:
        """End the worker (at exit: a worker killed mid-call aborts the process in C++)."""
        self.stopping = True
        worker = self.worker
        if worker is not None and worker.is_alive():
            self.jobs.put(None)
            worker.join(timeout=30)

    def _work(self) -> None:
        while True:
            key = self.jobs.get()
            if key is None:
                self.jobs.task_done()
                return
            try:
                if not self.stopping:
                    with self.lock:
                        self._compile(key)
            except Exception as err:  # no compiler, an inductor bug: eager from now on
                if self.stopping:  # the interpreter is shutting down under the compiler
                    continue
                self.broken = f"{type(err).__name__}: {err}"
                log.warning("qviz: fused RTN kernel unavailable, using eager: %s", self.broken)
            finally:
                with self.state:
                    self.queued.discard(key)
                self.jobs.task_done()

    def _compile(self, key: _Key) -> None:
        if self.broken:
            return
        shape, strides, dtype, device, g, symmetric = key
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=gen)
        base[0] = 0.25  # a constant row: zero range
        w = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        w.copy_(base)
        t = time.perf_counter()
        with torch.no_grad():
            self._fn(key)(w, g, *self.scalars_for(8, symmetric, device), symmetric)
            self.compile_s[key] = time.perf_counter() - t
            for bits in range(2, 9):
                cfg = QuantConfig(bits, g, symmetric=symmetric)
                got = self._fn(key)(w, g, *self.scalars_for(bits, symmetric, device), symmetric)
                if not torch.equal(got, eager_fake_quantize(w, cfg)):
                    self.bad.add(key)
                    log.warning("qviz: fused RTN differs from eager for %s; eager kept", key)
                    return
        self.ready.add(key)

    def run(self, w: torch.Tensor, key: _Key, bits: int) -> torch.Tensor | None:
        """The fused result, or None when the kernel is not ready or is busy compiling."""
        if key not in self.ready or not self.lock.acquire(blocking=False):
            return None
        try:
            shape, strides, dtype, device, g, symmetric = key
            # never compile here: a guard that fails (another global state) means eager
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                torch.compiler.set_stance("fail_on_recompile"),
            ):
                return self._fn(key)(w, g, *self.scalars_for(bits, symmetric, device), symmetric)
        except Exception as err:
            if key not in self.refused:
                self.refused.add(key)
                log.info("qviz: fused RTN would recompile for %s (%s); eager", key, err)
            return None
        finally:
            self.lock.release()


_FUSED = _Fused()
atexit.register(lambda: _FUSED.stop())


def _key(w: torch.Tensor, g: int, symmetric: bool) -> _Key:
    return (tuple(w.shape), tuple(w.stride()), w.dtype, str(w.device), g, bool(symmetric))


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> torch.Tensor:
    """``primitives.fake_quantize(w, cfg)``, bit for bit, by the fused kernel when it is
    compiled for this weight's layout; else eagerly (and the layout is queued for compiling).

    w: [out, in] -> new tensor [out, in] of w's dtype, on w's device. Never blocks on the
    compiler; ``w`` is never modified.
    """
    primitives._check(w, name)
    if not enabled() or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return eager_fake_quantize(w, cfg, name)
    g = group_size_for(cfg, w.shape[1], name)
    key = _key(w, g, cfg.symmetric)
    out = _FUSED.run(w.detach(), key, cfg.bits)
    if out is None:
        if key not in _FUSED.ready:
            _FUSED.submit(key)
        return eager_fake_quantize(w, cfg, name)
    return out


def prepare(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> None:
    """Queue the kernel for ``w``'s layout and ``cfg`` (no-op when disabled or already done)."""
    if enabled():
        _FUSED.submit(_key(w, group_size_for(cfg, w.shape[1], name), cfg.symmetric))


def wait(timeout: float | None = None) -> bool:
    """Block until every queued layout is compiled and checked (benchmarks, tests; never the
    UI). True when the queue drained within ``timeout`` seconds."""
    end = None if timeout is None else time.monotonic() + timeout
    while _FUSED.queued:
        if end is not None and time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def status() -> dict:
    """{"enabled", "ready", "bad", "queued", "broken", "compile_s"}: what the kernel does now."""
    return {
        "enabled": enabled(),
        "ready": len(_FUSED.ready),
        "bad": len(_FUSED.bad),
        "queued": len(_FUSED.queued),
        "broken": _FUSED.broken,
        "compile_s": dict(_FUSED.compile_s),
    }


def is_ready(w: torch.Tensor, cfg: QuantConfig) -> bool:
    """Whether ``fake_quantize(w, cfg)`` would run the fused kernel now."""
    g = group_size_for(cfg, w.shape[1])
    return enabled() and _key(w, g, cfg.symmetric) in _FUSED.ready
