"""Capture activations with self-removing hooks (``qviz.probes.hooks``).

Attention maps are never kept whole unless asked for ("attn"): with "attn_stats" each layer's
[H, T, T] probabilities go to a callback as the forward reaches that layer and are dropped right
after, so memory stays at one layer's maps. Given the reference run's attention inputs and
weights (``AttentionReference``), the callback also receives the reference's maps of that layer,
recomputed on the spot, so reference-vs-quantized statistics (JS divergence) need both runs'
maps of one layer only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qviz.models.arch import Adapter
from qviz.probes.hooks import attached, feed_inputs, hidden_in, record_outputs, with_hidden_in

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


def _probs(out, adapter: Adapter, i: int) -> torch.Tensor:
    if not (isinstance(out, tuple) and len(out) > 1 and out[1] is not None):
        raise RuntimeError(f"{adapter.attn} of layer {i} returned no probabilities")
    return out[1]


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
    bad = set(what) - set(WHAT)
    if bad:
        raise ValueError(f"cannot capture {sorted(bad)}; choose from {WHAT}")
    if "attn_stats" in what and on_attention is None:
        raise ValueError("capturing 'attn_stats' needs an on_attention callback")
    layers = adapter.decoder_layers(model)
    attns = [layer.get_submodule(adapter.attn) for layer in layers]
    store: dict[str, list] = {k: [None] * len(layers) for k in ("attn", "gate", "attn_in")}
    first_in: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach()[0].float().cpu()

    def gate_fn(t: torch.Tensor) -> torch.Tensor:
        g = keep(t)
        return g[..., : g.shape[-1] // 2] if adapter.gate_fused else g

    def attn_hook(i):
        def hook(mod, args, kwargs, out):
            probs = _probs(out, adapter, i)
            if "attn" in what:
                store["attn"][i] = keep(probs)
            if "attn_stats" in what:
                ref = None
                if reference is not None:
                    x = reference.inputs[i][None].to(probs.device, hidden_in(args, kwargs).dtype)
                    a, kw = with_hidden_in(args, kwargs, x)
                    with _swapped(mod, reference.params[i]):
                        ref = _probs(mod.forward(*a, **kw), adapter, i)
                on_attention(i, probs.detach(), None if ref is None else ref.detach())

        return hook

    def attn_in_hook(i):
        def pre(mod, args, kwargs):
            store["attn_in"][i] = keep(hidden_in(args, kwargs))

        return pre

    want_maps = "attn" in what or "attn_stats" in what
    resid_mods = layers if "resid" in what else []
    gate_mods = [ly.get_submodule(adapter.gate) for ly in layers] if "gate" in what else []
    mlp_mods = [ly.get_submodule(adapter.mlp) for ly in layers] if "mlp_out" in what else []
    with (
        attached() as h,
        record_outputs(resid_mods, keep) as resid,
        record_outputs(gate_mods, gate_fn) as gate,
        record_outputs(mlp_mods, keep) as mlp_out,
    ):
        if "resid" in what:
            h.pre(layers[0], lambda m, a, kw: first_in.append(keep(hidden_in(a, kw))))
        for i, mod in enumerate(attns):
            if want_maps:
                h.post(mod, attn_hook(i), with_kwargs=True)
            if "attn_in" in what:
                h.pre(mod, attn_in_hook(i))
        with eager_attention(model, want_maps), torch.no_grad():
            out = model(input_ids, use_cache=False, logits_to_keep=1)
    result = Capture(logits=out.logits.detach()[0, -1:].float().cpu())
    if "resid" in what:
        result.resid = torch.stack([first_in[0], *resid])
    if "attn" in what:
        result.attn = torch.stack(store["attn"])
    if "gate" in what:
        result.gate = torch.stack(gate)
    if "mlp_out" in what:
        result.mlp_out = torch.stack(mlp_out)
    if "attn_in" in what:
        result.attn_in = torch.stack(store["attn_in"])
    return result


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
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, inputs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Outputs [L, T, D] of every decoder layer when layer i is fed ``inputs[i]`` [T, D] (the
    "perfect input" test: each layer sees the reference input whatever came before)."""
    layers = adapter.decoder_layers(model)
    with (
        feed_inputs(layers, [x[None] for x in inputs]),
        record_outputs(layers, lambda x: x[0]) as outs,
        torch.no_grad(),
    ):
        model(input_ids, use_cache=False, logits_to_keep=1)
    return torch.stack(outs)


__all__ = [
    "DEFAULT",
    "WHAT",
    "AttentionReference",
    "Capture",
    "attention_params",
    "capture",
    "eager_attention",
    "isolated_outputs",
    "last_states",
]
