"""Capture activations with forward hooks that remove themselves, also when the forward raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qviz.models.arch import Adapter

WHAT = ("resid", "attn", "gate", "mlp_out")


@dataclass
class Capture:
    """Activations of one prompt (batch of 1), all float32 on the CPU.

    resid: [L+1, T, D] (index 0 = input of decoder layer 0, i = output of layer i);
    attn: [L, H, T, T] attention probabilities; gate: [L, T, F] MLP gate pre-activations
    (fc_in output for non-gated MLPs); mlp_out: [L, T, D]; logits: [T, V] of the model's output
    (last position only when ``last_only``). Missing entries were not asked for.
    """

    logits: torch.Tensor
    resid: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def capture(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, what: tuple[str, ...] = WHAT
) -> Capture:
    """One forward of ``input_ids`` [1, T] capturing ``what`` (subset of WHAT); no hooks remain."""
    bad = set(what) - set(WHAT)
    if bad:
        raise ValueError(f"cannot capture {sorted(bad)}; choose from {WHAT}")
    layers = adapter.decoder_layers(model)
    store: dict[str, list] = {k: [None] * len(layers) for k in ("resid", "attn", "gate", "mlp_out")}
    first_in: list[torch.Tensor] = []
    handles = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach()[0].float().cpu()

    try:
        if "resid" in what:

            def pre(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                first_in.append(keep(h))

            handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i, layer in enumerate(layers):
            if "resid" in what:
                handles.append(
                    layer.register_forward_hook(
                        lambda m, a, o, i=i: store["resid"].__setitem__(i, keep(_first(o)))
                    )
                )
            if "attn" in what:

                def attn_hook(m, a, o, i=i):
                    if not (isinstance(o, tuple) and len(o) > 1 and o[1] is not None):
                        raise RuntimeError(f"{adapter.attn} of layer {i} returned no probabilities")
                    store["attn"][i] = keep(o[1])

                handles.append(layer.get_submodule(adapter.attn).register_forward_hook(attn_hook))
            if "gate" in what:
                gmod = layer.get_submodule(adapter.gate)

                def gate_hook(m, a, o, i=i):
                    g = keep(o)
                    if adapter.gate_fused:
                        g = g[..., : g.shape[-1] // 2]
                    store["gate"][i] = g

                handles.append(gmod.register_forward_hook(gate_hook))
            if "mlp_out" in what:
                handles.append(
                    layer.get_submodule(adapter.mlp).register_forward_hook(
                        lambda m, a, o, i=i: store["mlp_out"].__setitem__(i, keep(_first(o)))
                    )
                )
        cfg = model.config
        old_impl = getattr(cfg, "_attn_implementation", None)
        want_attn = "attn" in what
        if want_attn:
            cfg._attn_implementation = "eager"  # probabilities exist only on the eager path
        try:
            with torch.no_grad():
                out = model(input_ids, use_cache=False)
        finally:
            if want_attn:
                cfg._attn_implementation = old_impl
    finally:
        for h in handles:
            h.remove()
    result = Capture(logits=out.logits.detach()[0].float().cpu())
    if "resid" in what:
        result.resid = torch.stack([first_in[0], *store["resid"]])
    if want_attn:
        result.attn = torch.stack(store["attn"])
    if "gate" in what:
        result.gate = torch.stack(store["gate"])
    if "mlp_out" in what:
        result.mlp_out = torch.stack(store["mlp_out"])
    return result
