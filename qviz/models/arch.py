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

    @property
    def linears(self) -> tuple[str, ...]:
        """Names (relative to a decoder layer) of every Linear the engine may quantize."""
        return self.attn_linears + self.mlp_linears

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))


def _llama_like(model_type: str) -> Adapter:
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
    )


ADAPTERS: dict[str, Adapter] = {
    name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
}
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
