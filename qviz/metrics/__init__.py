"""Pure tensor metrics comparing a reference model's internals with a quantized model's."""

from qviz.metrics.attention import js_divergence, normalized_entropy
from qviz.metrics.cka import cka_matrix
from qviz.metrics.ffn import output_cosine, sign_flip_rate, topk_jaccard
from qviz.metrics.lens import logit_lens, target_stats, topk_tokens
from qviz.metrics.residual import mean_token_cosine, residual_drift
from qviz.metrics.tracing import peak_layer, recovery, window_layers
from qviz.metrics.verdict import verdict

__all__ = [
    "cka_matrix",
    "js_divergence",
    "logit_lens",
    "mean_token_cosine",
    "normalized_entropy",
    "output_cosine",
    "peak_layer",
    "recovery",
    "residual_drift",
    "sign_flip_rate",
    "target_stats",
    "topk_jaccard",
    "topk_tokens",
    "verdict",
    "window_layers",
]
