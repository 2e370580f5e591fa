"""Explicit architecture adapters: where each model type keeps its parts.

No guessing by attribute names: a model type that is not in ``ADAPTERS`` raises
``NotImplementedError`` naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """Dotted paths of one architecture's parts.

    ``layers``, ``final_norm``, ``unembed`` and ``embed`` are relative to the top-level model;
    every other path is relative to one decoder layer. ``gate`` is the Linear whose output is the
    input of the MLP activation (``fc_in`` for non-gated MLPs); ``gate_fused`` means that Linear
    holds [gate; up] stacked along its outputs, so the gate is its first half.
    """

    model_type: str
    layers: str
    final_norm: str
    unembed: str
    embed: str
    attn: str
    mlp: str
    attn_linears: tuple[str, ...]
    mlp_linears: tuple[str, ...]
    gate: str
    gated: bool = True
    gate_fused: bool = False
    rotary: str | None = None
    fast_tracing: bool = False
    softcap_attr: str | None = None

    # model facts --------------------------------------------------------------------------
    def unembedding(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(final norm, unembedding) modules: the logit lens reads states through both."""
        return model.get_submodule(self.final_norm), model.get_submodule(self.unembed)

    def logit_softcap(self, model: nn.Module) -> float | None:
        """The final-logit softcap (``cap * tanh(logits / cap)``), None when the model has none."""
        if self.softcap_attr is None:
            return None
        cap = getattr(model.config, self.softcap_attr, None)
        return float(cap) if cap else None

    def apply_softcap(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        cap = self.logit_softcap(model)
        return cap * torch.tanh(logits / cap) if cap else logits

    def fast_path(self, model: nn.Module, n_tokens: int) -> bool:
        """Whether causal tracing may call the decoder layers directly with a key/value prefix
        (llama-like layers with a shared rotary embedding, full causal attention at this length)."""
        if not self.fast_tracing or self.rotary is None:
            return False
        cfg = model.config
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        types = getattr(cfg, "layer_types", None)
        if types is not None and any(t != "full_attention" for t in types):
            return False
        sw = getattr(cfg, "sliding_window", None)
        return not (sw is not None and getattr(cfg, "use_sliding_window", True) and n_tokens > sw)

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        if self.rotary is None:
            raise NotImplementedError(f"{self.model_type} has no shared rotary embedding")
        return model.get_submodule(self.rotary)

    @property
    def linears(self) -> tuple[str, ...]:
        """Names (relative to a decoder layer) of every Linear the engine may quantize."""
        return self.attn_linears + self.mlp_linears

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))


def _llama_like(model_type: str, fast: bool = True, softcap: bool = False) -> Adapter:
    return Adapter(
        model_type=model_type,
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
        attn="self_attn",
        mlp="mlp",
        attn_linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ),
        mlp_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        gate="mlp.gate_proj",
        rotary="model.rotary_emb",
        fast_tracing=fast,
        softcap_attr="final_logit_softcapping" if softcap else None,
    )


ADAPTERS: dict[str, Adapter] = {
    name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3")
}
# gemma scales its embeddings and gemma2 alternates sliding windows: the generic tracing path
ADAPTERS["gemma"] = _llama_like("gemma", fast=False)
ADAPTERS["gemma2"] = _llama_like("gemma2", fast=False, softcap=True)
# gemma3 text: sliding and full layers alternate, each type with its own rotary embedding (the
# shared one takes a layer type), so tracing takes the generic path; its scaled embeddings, its
# (1 + w) norms and the extra pre/post-feedforward norms live inside transformers' own modules
ADAPTERS["gemma3_text"] = _llama_like("gemma3_text", fast=False, softcap=True)
ADAPTERS["phi3"] = Adapter(
    model_type="phi3",
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    attn="self_attn",
    mlp="mlp",
    attn_linears=("self_attn.qkv_proj", "self_attn.o_proj"),
    mlp_linears=("mlp.gate_up_proj", "mlp.down_proj"),
    gate="mlp.gate_up_proj",
    gate_fused=True,
    rotary="model.rotary_emb",
)
ADAPTERS["gpt2"] = Adapter(
    model_type="gpt2",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
    attn="attn",
    mlp="mlp",
    attn_linears=("attn.c_attn", "attn.c_proj"),
    mlp_linears=("mlp.c_fc", "mlp.c_proj"),
    gate="mlp.c_fc",
    gated=False,
)
ADAPTERS["gpt_neox"] = Adapter(
    model_type="gpt_neox",
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    embed="gpt_neox.embed_in",
    attn="attention",
    mlp="mlp",
    attn_linears=("attention.query_key_value", "attention.dense"),
    mlp_linears=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    gate="mlp.dense_h_to_4h",
    gated=False,
)


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (or a ``model_type`` string); NotImplementedError if unknown."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"qviz has no adapter for model_type={model_type!r}; "
            f"supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def weight_layout(module: nn.Module) -> str:
    """'out_in' for nn.Linear ([out, in] weights), 'in_out' for GPT-2's Conv1D ([in, out])."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and isinstance(
        getattr(module, "weight", None), torch.Tensor
    ):
        return "in_out"
    raise TypeError(f"{type(module).__name__} is not a Linear layer qviz can quantize")
