"""Capture activations with self-removing hooks (``qviz.probes.hooks``).

Attention maps are never kept whole unless asked for ("attn"): with "attn_stats" each layer's
[H, T, T] probabilities go to a callback as the forward reaches that layer and are dropped right
after, so memory stays at one layer's maps. Given the reference run's attention inputs and
weights (``AttentionReference``), the callback also receives the reference's maps of that layer,
recomputed on the spot, so reference-vs-quantized statistics (JS divergence) need both runs'
maps of one layer only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qviz.models.arch import Adapter
from qviz.probes.batch import left_pad, pack
from qviz.probes.hooks import (
    attached,
    feed_inputs,
    hidden_in,
    hidden_out,
    record_outputs,
    with_hidden_in,
)

WHAT = ("resid", "attn", "gate", "mlp_out", "attn_in", "attn_stats")
DEFAULT = ("resid", "gate", "mlp_out", "attn_stats")

AttentionCallback = Callable[[int, torch.Tensor, "torch.Tensor | None"], None]


@dataclass
class Capture:
    """Activations of one prompt (batch of 1), all float32 on the CPU.

    resid: [L+1, T, D] (index 0 = input of decoder layer 0, i = output of layer i);
    attn: [L, H, T, T] attention probabilities (only when asked for: quadratic memory);
    gate: [L, T, F] MLP gate pre-activations (fc_in output for non-gated MLPs); mlp_out:
    [L, T, D]; attn_in: [L, T, D] hidden states entering each attention module; logits: [1, V]
    at the last position. ``extra`` holds what a caller's callbacks computed (e.g. per-layer
    attention statistics). Missing entries were not asked for.
    """

    logits: torch.Tensor
    resid: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    attn_in: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (for byte-budgeted caches)."""
        ts = [self.logits, self.resid, self.attn, self.gate, self.mlp_out, self.attn_in]
        ts += [v for v in self.extra.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class AttentionReference:
    """The reference run's view of every attention module: inputs [L, T, D] (a Capture's
    ``attn_in``) and parameters (one {name: tensor} per layer, see ``attention_params``)."""

    inputs: torch.Tensor
    params: list[dict[str, torch.Tensor]]


def attention_params(model: nn.Module, adapter: Adapter) -> list[dict[str, torch.Tensor]]:
    """The active parameter tensors of each decoder layer's attention module (no copies)."""
    return [
        {n: p.data for n, p in layer.get_submodule(adapter.attn).named_parameters()}
        for layer in adapter.decoder_layers(model)
    ]


@contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    params = dict(module.named_parameters())
    saved = {n: params[n].data for n in tensors}
    try:
        for n, t in tensors.items():
            params[n].data = t
        yield
    finally:
        for n, t in saved.items():
            params[n].data = t


@contextmanager
def eager_attention(model: nn.Module, on: bool = True) -> Iterator[None]:
    """The eager attention implementation for the block (probabilities exist only there)."""
    cfg = model.config
    old = getattr(cfg, "_attn_implementation", None)
    if on:
        cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        if on:
            cfg._attn_implementation = old


MMAP_THRESHOLD = int(os.environ.get("QVIZ_MMAP_THRESHOLD", 1 << 20))
_heap_bounded = False


def bound_heap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Ask glibc's malloc to serve every block of ``threshold`` bytes or more (1 MiB by default;
    ``QVIZ_MMAP_THRESHOLD``, 0 = leave malloc alone) from its own mapping, returned to the
    system when freed, once per process; True when set.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), so
    a long prompt's per-layer temporaries (2-40 MB each) land in the heap, where small tensors
    kept alive in between fragment it: at 1,024 tokens ``compare`` kept ~0.3 GiB of freed
    memory resident. Linux/glibc only; elsewhere a no-op."""
    global _heap_bounded
    if _heap_bounded or threshold <= 0 or not sys.platform.startswith("linux"):
        return _heap_bounded
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _heap_bounded = bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        _heap_bounded = False
    return _heap_bounded


class _Slots:
    """Per-layer tensors copied, as the forward reaches each layer, into one preallocated tensor
    [n, ...] (float32 on the CPU, or ``dtype=None``: the tensors' own dtype and device), never a
    list of n tensors stacked afterwards (that held both at once)."""

    def __init__(self, n: int, dtype: torch.dtype | None = torch.float32) -> None:
        self.n, self.dtype, self.out, self.seen = n, dtype, None, set()

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        if self.out is None:
            kw = {"dtype": self.dtype, "device": "cpu"} if self.dtype else {}
            self.out = t.new_empty((self.n, *t.shape), **kw)
        self.out[i].copy_(t)
        self.seen.add(i)

    def full(self, name: str) -> torch.Tensor:
        if len(self.seen) != self.n:
            raise RuntimeError(f"capturing {name!r}: {self.n - len(self.seen)} layers never ran")
        return self.out


def _probs(out, adapter: Adapter, i: int) -> torch.Tensor:
    if not (isinstance(out, tuple) and len(out) > 1 and out[1] is not None):
        raise RuntimeError(f"{adapter.attn} of layer {i} returned no probabilities")
    return out[1]


def _capture(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    what: tuple[str, ...],
    on_attention: AttentionCallback | None,
    reference: AttentionReference | None,
    forward_kw: dict,
    logits_at: torch.Tensor | None = None,
    feeds: Sequence[tuple[object, torch.Tensor]] = (),
) -> Capture:
    """One forward of ``input_ids`` [B, W]; the Capture's tensors keep the batch dimension
    (resid [L+1, B, W, D], logits [B, V] at the last position, ...; with ``logits_at``, the
    positions [K] of a one-row batch whose logits to keep: logits [K, V]). ``feeds``: (index
    into the hidden states [B, W, D], inputs [L, ...]) pairs, each decoder layer's input there
    replaced by its given one (``feed_inputs``; the "perfect input" test of a row or a packed
    sequence, whose captured ``resid[1:]`` are then the layers' outputs on those inputs)."""
    bound_heap()
    bad = set(what) - set(WHAT)
    if bad:
        raise ValueError(f"cannot capture {sorted(bad)}; choose from {WHAT}")
    if "attn_stats" in what and on_attention is None:
        raise ValueError("capturing 'attn_stats' needs an on_attention callback")
    layers = adapter.decoder_layers(model)
    attns = [layer.get_submodule(adapter.attn) for layer in layers]
    n = len(layers)
    slots = {k: _Slots(n + (k == "resid")) for k in ("resid", "attn", "gate", "mlp_out", "attn_in")}

    def gate_fn(t: torch.Tensor) -> torch.Tensor:
        return t[..., : t.shape[-1] // 2] if adapter.gate_fused else t

    def attn_hook(i):
        def hook(mod, args, kwargs, out):
            probs = _probs(out, adapter, i)
            if "attn" in what:
                slots["attn"].put(i, probs)
            if "attn_stats" in what:
                ref = None
                if reference is not None:
                    x = reference.inputs[i]
                    x = (x[None] if x.dim() == 2 else x).to(
                        probs.device, hidden_in(args, kwargs).dtype
                    )
                    a, kw = with_hidden_in(args, kwargs, x)
                    with _swapped(mod, reference.params[i]):
                        ref = _probs(mod.forward(*a, **kw), adapter, i)
                on_attention(i, probs.detach(), None if ref is None else ref.detach())

        return hook

    def record(field, i, fn=None, pre=False):
        def pre_hook(mod, args, kwargs):
            slots[field].put(i, hidden_in(args, kwargs))

        def post_hook(mod, args, out):
            x = hidden_out(out)
            slots[field].put(i, fn(x) if fn is not None else x)

        return pre_hook if pre else post_hook

    want_maps = "attn" in what or "attn_stats" in what
    with ExitStack() as stack, attached() as h:
        for at, inputs in feeds:  # (registered first: the capture's hooks see the fed input)
            stack.enter_context(feed_inputs(layers, inputs.to(input_ids.device), at=at))
        if "resid" in what:
            h.pre(layers[0], record("resid", 0, pre=True))
        for i, layer in enumerate(layers):
            if "resid" in what:
                h.post(layer, record("resid", i + 1))
            if "gate" in what:
                h.post(layer.get_submodule(adapter.gate), record("gate", i, gate_fn))
            if "mlp_out" in what:
                h.post(layer.get_submodule(adapter.mlp), record("mlp_out", i))
            if want_maps:
                h.post(attns[i], attn_hook(i), with_kwargs=True)
            if "attn_in" in what:
                h.pre(attns[i], record("attn_in", i, pre=True))
        with eager_attention(model, want_maps), torch.no_grad():
            keep = 1 if logits_at is None else logits_at
            out = model(input_ids, use_cache=False, logits_to_keep=keep, **forward_kw)
    logits = out.logits.detach()
    result = Capture(logits=(logits[:, -1] if logits_at is None else logits[0]).float().cpu())
    for f in FIELDS:
        if f in what:
            setattr(result, f, slots[f].full(f))
    return result


FIELDS = ("resid", "attn", "gate", "mlp_out", "attn_in")


def _row(batched: Capture, b: int, n: int) -> Capture:
    """Row ``b`` of a batched Capture, its last ``n`` positions (left padding dropped), as a
    one-prompt Capture that owns its memory (a batch of one: views, no copy)."""
    own = (lambda t: t) if batched.logits.shape[0] == 1 else torch.Tensor.clone
    out = Capture(logits=own(batched.logits[b : b + 1]))
    for f in FIELDS:
        t = getattr(batched, f)
        if t is not None:
            setattr(out, f, own(t[:, b, ..., -n:, -n:] if f == "attn" else t[:, b, -n:]))
    return out


def capture(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    what: tuple[str, ...] = DEFAULT,
    on_attention: AttentionCallback | None = None,
    reference: AttentionReference | None = None,
) -> Capture:
    """One forward of ``input_ids`` [1, T] capturing ``what`` (subset of WHAT); no hooks remain.

    "attn_stats" calls ``on_attention(layer, probs [1, H, T, T], ref_probs or None)`` per layer
    as the forward runs (``ref_probs``: the same layer recomputed on ``reference``'s input with
    its weights); the maps are not kept.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one prompt [1, T], got {tuple(input_ids.shape)}")
    return _row(
        _capture(model, adapter, input_ids, what, on_attention, reference, {}),
        0,
        input_ids.shape[1],
    )


def capture_batch(
    model: nn.Module,
    adapter: Adapter,
    seqs: Sequence[torch.Tensor],
    what: tuple[str, ...] = DEFAULT,
    on_attention: AttentionCallback | None = None,
    reference: AttentionReference | None = None,
    fed: dict[int, torch.Tensor] | None = None,
) -> list[Capture]:
    """``capture`` of several prompts (1-D token tensors) in one left-padded forward; one
    Capture per prompt, padding dropped, equal to its own ``capture`` up to float rounding.
    ``fed``: {row: inputs [L, n_b, D]} runs that row isolated (see ``capture_packed``).

    ``on_attention(layer, probs [B, H, W, W], ref_probs or None)``: row b's own maps are
    ``probs[b, :, W - n_b:, W - n_b:]`` (n_b its length). ``reference.inputs``: [L, B, W, D],
    left-padded like the batch (``pad_states``).
    """
    ids, kw = left_pad(seqs, seqs[0].device)
    width = ids.shape[1]
    feeds = [((b, slice(width - len(seqs[b]), None)), x) for b, x in (fed or {}).items()]
    batched = _capture(model, adapter, ids, what, on_attention, reference, kw, feeds=feeds)
    return [_row(batched, b, len(s)) for b, s in enumerate(seqs)]


def capture_packed(
    model: nn.Module,
    adapter: Adapter,
    seqs: Sequence[torch.Tensor],
    what: tuple[str, ...] = ("resid",),
    logits: bool = True,
    fed: dict[int, torch.Tensor] | None = None,
) -> list[Capture]:
    """``capture`` of several prompts (1-D token tensors) in one forward of their tokens packed
    end to end (``pack``: no padding, so fewer tokens through the Linears than a left-padded
    batch of unequal prompts); one Capture per prompt, equal to its own ``capture`` up to float
    rounding. Only for a model that ``packs``; no attention maps ("attn", "attn_stats").

    ``logits=False``: none computed (each Capture's logits empty [0, V]). ``fed``: {index of a
    sequence: inputs [L, n, D]} runs that sequence isolated, each decoder layer fed its given
    input (the "perfect input" test, ``isolated_outputs``): its ``resid[1:]`` are the layers'
    outputs on those inputs."""
    if {"attn", "attn_stats"} & set(what):
        raise ValueError(f"capture_packed keeps no attention maps; asked for {sorted(what)}")
    ids, kw, slices = pack(seqs, seqs[0].device)
    last = [s.stop - 1 for s in slices] if logits else []
    at = torch.tensor(last, dtype=torch.long, device=ids.device)
    feeds = [((0, slices[b]), inputs) for b, inputs in (fed or {}).items()]
    batched = _capture(model, adapter, ids, what, None, None, kw, logits_at=at, feeds=feeds)
    caps = []
    for b, s in enumerate(slices):
        cap = Capture(logits=batched.logits[b : b + 1].clone())
        for f in FIELDS:
            t = getattr(batched, f)
            if t is not None:
                setattr(cap, f, t[:, 0, s].clone())
        caps.append(cap)
    return caps


_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packs(model: nn.Module, adapter: Adapter) -> bool:
    """Whether ``model`` keeps sequences packed in one row apart (``pack``), checked once per
    model: the last states of two short sequences packed must equal those of the second alone
    up to float rounding (a model that ignored the restarting positions would let the second
    attend to the first, and packed captures would mix prompts). Its probe forward hooks the
    model: call it where no other thread runs one (e.g. holding the model's engine lock)."""
    hit = _PACKS.get(model)
    if hit is None:
        dev = next(model.parameters()).device
        vocab = int(model.config.vocab_size)
        a, b = (torch.tensor([11, 23, 5]) % vocab, torch.tensor([7, 31, 2, 19]) % vocab)
        ids, kw, _ = pack([a, b], dev)
        both = last_states(model, adapter, ids, **kw)
        alone = last_states(model, adapter, b[None].to(dev))
        hit = bool((both - alone).abs().max() <= 1e-4 * alone.abs().max())
        _PACKS[model] = hit
    return hit


def pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-prompt [L, T_b, D] tensors left-padded with zeros into [L, B, W, D]."""
    width = max(s.shape[1] for s in states)
    out = states[0].new_zeros(states[0].shape[0], len(states), width, states[0].shape[-1])
    for b, s in enumerate(states):
        out[:, b, width - s.shape[1] :] = s
    return out


def last_states(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, **forward_kw
) -> torch.Tensor:
    """Residual states [L+1, B, D] at the last position of each row (index 0 = embeddings),
    from one forward of ``input_ids`` [B, T] (``forward_kw``: e.g. a left-padding mask)."""
    layers = adapter.decoder_layers(model)
    first: list = []
    with attached() as h, record_outputs(layers, lambda x: x[:, -1]) as outs:
        h.pre(layers[0], lambda m, a, kw: first.append(hidden_in(a, kw)[:, -1].detach()))
        with torch.no_grad():
            model(input_ids, use_cache=False, logits_to_keep=1, **forward_kw)
    return torch.stack([first[0], *outs])


def isolated_outputs(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    **forward_kw,
) -> torch.Tensor:
    """Outputs [L, T, D] of every decoder layer when layer i is fed ``inputs[i]`` [T, D] (the
    "perfect input" test: each layer sees the reference input whatever came before). Batched:
    ``input_ids`` [B, W], ``inputs[i]`` [B, W, D] and ``forward_kw`` (a left-padding mask)
    give [L, B, W, D]."""
    layers = adapter.decoder_layers(model)
    one = inputs[0].dim() == 2
    outs = _Slots(len(layers), dtype=None)

    def keep(i):
        def hook(mod, args, out):
            x = hidden_out(out)
            outs.put(i, x[0] if one else x)

        return hook

    with (
        feed_inputs(layers, [x[None] if one else x for x in inputs]),
        attached() as h,
        torch.no_grad(),
    ):
        for i, layer in enumerate(layers):
            h.post(layer, keep(i))
        model(input_ids, use_cache=False, logits_to_keep=1, **forward_kw)
    return outs.full("isolated outputs")


__all__ = [
    "DEFAULT",
    "WHAT",
    "AttentionReference",
    "Capture",
    "attention_params",
    "capture",
    "capture_batch",
    "capture_packed",
    "eager_attention",
    "isolated_outputs",
    "last_states",
    "packs",
    "pad_states",
]
