"""GPTQ (Frantar et al. 2022): second-order weight quantization with error feedback.

``gptq_quantize`` quantizes one [out, in] weight given the Hessian proxy H = 2/N * X^T X of its
inputs; ``gptq_materialize`` runs it layer by layer over a model's decoder layers on calibration
inputs (each layer fed the outputs of the already quantized layers before it);
``cached_gptq_materialize`` keeps the results on disk, verified by a content hash (helpers
shared by calibrated methods: ``calibrated.py``). ``GPTQ`` is
the method object registered in ``qviz.quant.METHODS``: its settings are ``damp``,
``act_order`` and the calibration size ``n_seq`` x ``seq_len`` (default: the environment
variables ``QVIZ_GPTQ_NSEQ`` / ``QVIZ_GPTQ_SEQLEN``, else 128 x 256).

Group scale/zero follow ``primitives``: column j belongs to group j // group_size (ragged last
group), with the same ``_scale_zero`` and rounding formula as round-to-nearest; they are computed
from the error-updated weights of the whole group when its first column is reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qviz.cancel import Cancelled
from qviz.models.arch import Adapter, weight_layout
from qviz.quant.calibrated import (  # re-exported: gptq.calibration_ids & co. keep working
    _sha,
    calibration_ids,
    load_cache,
    model_fingerprint,
    save_cache,
)
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.methods import METHODS, Method, Request, apply
from qviz.quant.primitives import _scale_zero, group_size_for

BLOCKSIZE = 128


class GPTQCancelled(Cancelled):
    """Raised when a GPTQ run is cancelled; the model is left exactly as it was."""


# the method ----------------------------------------------------------------------------------
def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int (or None: the default), got {value!r}")
    return value


class GPTQ(Method):
    """GPTQ (Frantar et al. 2022), calibrated on windows of the bundled text.

    Settings: ``damp`` in (0, 1) (fraction of mean diag H added before inverting), ``act_order``
    (quantize columns by decreasing H diagonal), ``n_seq`` x ``seq_len`` calibration tokens
    (None: ``QVIZ_GPTQ_NSEQ`` / ``QVIZ_GPTQ_SEQLEN``, else 128 x 256, read when the plan runs).
    All GPTQ layers of one plan share one calibration pass, so they must agree on its size.
    """

    name = "gptq"
    calibrated = True
    defaults = {"damp": 0.01, "act_order": False, "n_seq": None, "seq_len": None}
    cancelled = GPTQCancelled
    _ENV = {"n_seq": ("QVIZ_GPTQ_NSEQ", 128), "seq_len": ("QVIZ_GPTQ_SEQLEN", 256)}

    def check_setting(self, key: str, value):
        if key == "damp":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"damp must be in (0, 1), got damp={value!r}")
            return float(value)
        if key == "act_order":
            if not isinstance(value, bool):
                raise ValueError(f"act_order must be True or False, got act_order={value!r}")
            return value
        return None if value is None else _positive_int(key, value)

    def resolve(self, settings) -> dict:
        values = super().resolve(settings)
        for key, (env, default) in self._ENV.items():
            if values[key] is None:
                values[key] = _positive_int(env, int(os.environ.get(env, default)))
        return values

    def label_suffix(self, settings) -> str:
        s = dict(settings)
        out = "-ao" if s.get("act_order") else ""
        out += f"-damp{s['damp']:g}" if "damp" in s else ""
        if "n_seq" in s and "seq_len" in s:
            out += f"-cal{s['n_seq']}x{s['seq_len']}"
        else:
            out += f"-nseq{s['n_seq']}" if "n_seq" in s else ""
            out += f"-seqlen{s['seq_len']}" if "seq_len" in s else ""
        return out

    def check_plan(self, cfgs: list[QuantConfig]) -> None:
        sizes = {(dict(c.settings).get("n_seq"), dict(c.settings).get("seq_len")) for c in cfgs}
        if len(sizes) > 1:
            raise ValueError(
                "the GPTQ layers of one plan share one calibration pass: give them the same "
                f"n_seq and seq_len, got (n_seq, seq_len) in {sorted(sizes, key=str)}"
            )

    def materialize(self, req: Request) -> dict[str, torch.Tensor]:
        """GPTQ over the decoder layers on ``req.model`` (bundled calibration text, verified disk
        cache); the plan's other layers as ``req.done`` has them; embeddings round-to-nearest."""
        cfgs = [c for _, c, _ in req.items]
        self.check_plan(cfgs)
        s = self.resolve(cfgs[0].settings)
        calib = calibration_ids(
            req.tokenizer,
            n_seq=s["n_seq"],
            seq_len=s["seq_len"],
            vocab_size=getattr(getattr(req.model, "config", None), "vocab_size", None),
        )
        weights = cached_gptq_materialize(
            req.model,
            req.adapter,
            req.plan,
            calib,
            progress=req.progress,
            cancel=req.cancel,
            on_progress=req.on_progress,
            prior=req.done,
            tokenizer=req.tokenizer,
        )
        rtn = METHODS["rtn"]  # embeddings: no Hessian for them, round-to-nearest
        return {
            t.name: weights[t.name] if t.name in weights else apply(rtn, w, t.layout, c, t.name)
            for t, c, w in req.items
        }


# one weight ------------------------------------------------------------------------------------
def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64; retries more damping."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    mean = H.diagonal().mean()
    for k in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * 10**k * mean * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after extra damping")


def gptq_quantize(
    w: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """GPTQ-quantize ``w`` [out, in] with Hessian ``H`` [in, in]; returns dequantized w' (new
    tensor of w's dtype and device). ``w`` and ``H`` are never modified."""
    if w.ndim != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"expected w [out, in] and H [in, in], got {tuple(w.shape)}, {H.shape}")
    n_in = w.shape[1]
    g = group_size_for(cfg, n_in)
    qmax = 2**cfg.bits - 1
    W = w.detach().float().clone()
    H = H.detach().to(torch.float64, copy=True).to(w.device)

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if cfg.setting("act_order"):
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(n_in, device=w.device)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, cfg.setting("damp")).float()

    group_of = (perm // g).tolist()  # group of each permuted position
    scale = torch.empty(W.shape[0], (n_in + g - 1) // g, device=w.device)
    zero = torch.empty_like(scale)
    done = set()
    Q = torch.empty_like(W)

    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = group_of[i1 + i]
            if j not in done:  # first column of group j: its scale/zero from current weights
                pos = invperm[j * g : min((j + 1) * g, n_in)]
                inside = pos < i2  # (every member is at a position >= i1 + i: unquantized)
                cur = torch.empty(W.shape[0], pos.numel(), device=w.device)
                cur[:, inside] = W1[:, pos[inside] - i1]
                out = pos[~inside]
                if out.numel():  # apply the lazy updates still pending from this block
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


# a model -------------------------------------------------------------------------------------
class _Captured(Exception):
    pass


def _first(out):
    """The hidden states of a layer's output (the models floor's accessor, shared with probes)."""
    from qviz.models.access import hidden_out

    return hidden_out(out)


def _capture_inputs(model: nn.Module, layer0: nn.Module, calib_ids: torch.Tensor, batch: int):
    """[(hidden states, kwargs)] of decoder layer 0, one per batch of calibration sequences."""
    from qviz.models.access import split_hidden_in

    chunks = []

    def hook(_mod, args, kwargs):
        hidden, rest, kw = split_hidden_in(args, kwargs)
        chunks.append((hidden.detach(), kw, rest))
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib_ids.shape[0], batch):
            try:
                model(calib_ids[start : start + batch], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return chunks


def gptq_materialize(
    model: nn.Module,
    adapter: Adapter,
    plan: QuantPlan,
    calib_ids: torch.Tensor,
    progress: bool = True,
    batch: int = 16,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    prior: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> dict[str, torch.Tensor]:
    """{name: dequantized weight} of every decoder Linear ``plan`` quantizes, computed
    sequentially: GPTQ for GPTQ configs; the other layers as ``prior`` has them, else by their
    method's own ``materialize`` (HQQ, GGUF, RTN: see :func:`others`), and fed forward so that
    later layers calibrate
    on the plan's own outputs. Every parameter is left exactly as it was (its ``.data`` is
    swapped temporarily and restored).

    ``cancel``: when set, stops before the next layer with ``GPTQCancelled``.
    ``on_progress(done, total)``: called with done=0 before the calibration inputs are captured,
    then after each decoder layer (e.g. an app's progress bar and time estimate).
    """
    from tqdm.auto import tqdm

    layers = adapter.decoder_layers(model)
    plan.check_layers(len(layers))
    device = next(model.parameters()).device
    calib_ids = calib_ids.to(device)
    if on_progress is not None:
        on_progress(0, len(layers))
    prior = others(model, adapter, plan, prior or {}, tokenizer, progress, cancel)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        chunks = _capture_inputs(model, layers[0], calib_ids, batch)
        for i in tqdm(range(len(layers)), desc="GPTQ", disable=not progress):
            if cancel is not None and cancel.is_set():
                raise GPTQCancelled(f"GPTQ cancelled before decoder layer {i} of {len(layers)}")
            layer, cfg = layers[i], plan.config_for(i)
            mods = {rel: layer.get_submodule(rel) for rel in adapter.linears}
            new: dict[str, torch.Tensor] = {}
            method = METHODS.get_method(cfg.method) if cfg is not None else None
            if isinstance(method, GPTQ):
                hess, shared = _hessians(layer, mods, chunks)
                for rels in shared:  # Linears reading one input share one H (computed once)
                    for rel in rels:  # each quantized alone: bit for bit the per-Linear results
                        mod = mods[rel]
                        q = gptq_quantize(_out_in(mod), hess[rels[0]].to(mod.weight.device), cfg)
                        new[rel] = q.t().contiguous() if weight_layout(mod) == "in_out" else q
            elif method is not None:
                for rel in mods:
                    name = f"{adapter.layers}.{i}.{rel}"
                    if name in prior:
                        new[rel] = prior[name]
            for rel, q in new.items():
                out[f"{adapter.layers}.{i}.{rel}"] = q
            if i + 1 < len(layers):
                chunks = _run_layer(layer, {mods[r]: q for r, q in new.items()}, chunks)
            if on_progress is not None:
                on_progress(i + 1, len(layers))
    return out


def others(
    model: nn.Module,
    adapter: Adapter,
    plan: QuantPlan,
    done: dict[str, torch.Tensor],
    tokenizer=None,
    progress: bool = False,
    cancel: threading.Event | None = None,
) -> dict[str, torch.Tensor]:
    """``done`` plus every decoder weight of ``plan``'s non-GPTQ layers that it lacks, each
    materialized by its own method (on ``model``'s weights, its disk cache included): whatever
    the order in which the engine runs a mixed plan's methods (a slow HQQ or GGUF share may come
    after GPTQ), GPTQ calibrates on the plan's real inputs, never on full-precision layers."""
    from qviz.quant.engine import by_method, targets

    need = [
        (t, c, t.param.data)
        for t, c in targets(model, adapter, plan)
        if t.layer >= 0 and t.name not in done and not isinstance(METHODS[c.method], GPTQ)
    ]
    out = dict(done)
    for method, its in by_method(need).items():
        req = Request(model, adapter, plan, its, dict(out), tokenizer, cancel, progress=progress)
        out.update(method.materialize(req))
    return out


def importance_matrix(
    model: nn.Module, adapter: Adapter, calib_ids: torch.Tensor, batch: int = 8
) -> dict[str, torch.Tensor]:
    """llama.cpp's imatrix: {decoder Linear name: [in] mean of its squared input activations}
    over the calibration windows ``calib_ids`` [n_seq, seq_len], on ``model`` as it is (call it
    on full-precision weights)."""
    from qviz.models.access import hidden_in

    sums: dict[str, list] = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for rel in adapter.linears:
            name = f"{adapter.layers}.{i}.{rel}"

            def hook(_mod, args, name=name):
                x = hidden_in(args, {}).detach().float()
                x = x.reshape(-1, x.shape[-1])
                acc = sums.setdefault(name, [torch.zeros(x.shape[-1], dtype=torch.float64), 0])
                acc[0] += (x * x).sum(0).double().cpu()
                acc[1] += x.shape[0]

            handles.append(layer.get_submodule(rel).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, calib_ids.shape[0], batch):
                model(calib_ids[start : start + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (s / n).float() for name, (s, n) in sums.items()}


def _out_in(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.data
    return w.t() if weight_layout(mod) == "in_out" else w


def _hessians(
    layer: nn.Module, mods: dict[str, nn.Module], chunks
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """H = 2/N * sum x x^T of each Linear's inputs over the calibration chunks, and the groups
    of Linears that read the same tensor (q/k/v, gate/up), which share one H.

    Each chunk's product is taken in float32 (as the GPTQ reference does), summed in float64,
    once per distinct input tensor (its readers share H). The layer's forward stops at its last
    Linear's input.
    """
    from qviz.models.access import hidden_in

    acc: dict[str, list] = {}
    seen: dict[tuple, tuple] = {}  # per chunk: input tensor -> (x^T x, n, x, first reader)
    same_as: dict[str, str] = {}  # Linear -> the first Linear that read the same input
    order: list[str] = []  # the Linears in call order (first chunk), the last one ends a chunk

    def make(rel):
        def hook(_mod, args):
            x = hidden_in(args, {}).detach()
            # one tensor, unmodified (storage, layout and version): one x^T x for its readers
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype)
            if key not in seen:
                flat = x.reshape(-1, x.shape[-1]).float()
                seen[key] = ((flat.t() @ flat).double().cpu(), flat.shape[0], x, rel)
            xtx, n, _, first = seen[key]
            if same_as.setdefault(rel, first) != first:  # sharing must hold on every chunk
                same_as[rel] = rel
            if rel not in acc:
                acc[rel] = [torch.zeros_like(xtx), 0]
                order.append(rel)
            acc[rel][0] += xtx
            acc[rel][1] += n
            if len(acc) == len(mods) and rel == order[-1]:
                raise _Captured  # every input is in: the rest of the layer is not needed

        return hook

    handles = [m.register_forward_pre_hook(make(rel)) for rel, m in mods.items()]
    try:
        for hidden, kwargs, args in chunks:
            seen.clear()  # the stored tensors keep their storage unique while this chunk runs
            try:
                layer(hidden, *args, **kwargs)
            except _Captured:
                pass
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for rel in acc:
        groups.setdefault(same_as.get(rel, rel), []).append(rel)
    return {rel: h * (2 / n) for rel, (h, n) in acc.items()}, list(groups.values())


def _run_layer(layer: nn.Module, weights: dict[nn.Module, torch.Tensor], chunks):
    """The layer's outputs on ``chunks`` with ``weights`` swapped in (restored in finally)."""
    saved = {m: m.weight.data for m in weights}
    try:
        for m, q in weights.items():
            m.weight.data = q
        return [(_first(layer(h, *a, **kw)).detach(), kw, a) for h, kw, a in chunks]
    finally:
        for m, w in saved.items():
            m.weight.data = w


# disk cache ----------------------------------------------------------------------------------
def cache_key(model: nn.Module, plan: QuantPlan, calib_ids: torch.Tensor) -> str:
    ids = calib_ids.to(torch.long)
    raw = json.dumps([model_fingerprint(model), repr(plan), _sha(ids), list(ids.shape)])
    return hashlib.sha256(raw.encode()).hexdigest()


def cache_path(model: nn.Module, plan: QuantPlan, calib_ids: torch.Tensor) -> Path:
    from qviz.models.load import cache_dir

    return cache_dir() / "gptq" / f"{cache_key(model, plan, calib_ids)}.safetensors"


def cached_gptq_materialize(
    model: nn.Module,
    adapter: Adapter,
    plan: QuantPlan,
    calib_ids: torch.Tensor,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    prior: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> dict[str, torch.Tensor]:
    """``gptq_materialize`` through the verified disk cache (a cancelled run writes nothing).

    The key covers the plan, so ``prior`` must be what the plan's other methods give."""
    key = cache_key(model, plan, calib_ids)
    path = cache_path(model, plan, calib_ids)
    loaded = load_cache(path, key)
    if loaded is not None:
        out = {}
        for k, v in loaded.items():
            ref = model.get_submodule(k).weight
            out[k] = v.to(device=ref.device, dtype=ref.dtype)
        return out
    weights = gptq_materialize(
        model,
        adapter,
        plan,
        calib_ids,
        progress=progress,
        cancel=cancel,
        on_progress=on_progress,
        prior=prior,
        tokenizer=tokenizer,
    )
    try:
        save_cache(path, key, weights)
    except OSError as err:
        warnings.warn(f"could not write GPTQ cache {path}: {err}", stacklevel=2)
    return weights
