"""Attribution patching: a first-order estimate of every causal-tracing cell at once.

Patching cell (l, t) of ``component`` replaces the base run's activation a[l, t] with the source
run's s[l, t]. To first order the target probability moves by (s[l, t] - a[l, t]) . dP/da[l, t],
the gradient taken on the base run (Nanda 2023, "attribution patching"; Syed et al. 2023). One
forward with gradients and one backward give dP/da for every cell of the three components, so
the whole [L, T] grid costs about three forwards. The estimate is good where the patch is small
and poor where the model is far from linear (e.g. saturated softmaxes); callers patch the cells
that matter exactly (``qviz.studies.tracing.trace(mode="fast")``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qviz.models.arch import Adapter
from qviz.probes.hooks import attached, hidden_in, hidden_out, with_hidden_in
from qviz.probes.patch import COMPONENTS, RunCache, _target_prob, window_layers


def target_grads(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, target_id: int
) -> dict[str, torch.Tensor]:
    """dP(target at the last position) / d activation under the active weights, for each
    component: {"resid": [L, T, D] (inputs of the decoder layers), "attn": [L, T, D],
    "mlp": [L, T, D]}, float32. One forward with gradients and one backward (no parameter
    gradients are computed); no hooks remain afterwards."""
    layers = adapter.decoder_layers(model)
    acts: dict[str, list[torch.Tensor]] = {c: [] for c in COMPONENTS}

    def leaf(mod, args, kwargs):  # the graph starts at layer 0's input
        x = hidden_in(args, kwargs).detach().requires_grad_(True)
        return with_hidden_in(args, kwargs, x)

    def keep(name):
        def hook(mod, args, out):
            acts[name].append(hidden_out(out))

        return hook

    with attached() as h, torch.enable_grad():
        h.pre(layers[0], leaf)
        for ly in layers:
            h.pre(ly, lambda m, a, kw: acts["resid"].append(hidden_in(a, kw)))
            h.post(ly.get_submodule(adapter.attn), keep("attn"))
            h.post(ly.get_submodule(adapter.mlp), keep("mlp"))
        logits = model(input_ids, use_cache=False, logits_to_keep=1).logits
        prob = _target_prob(logits[:, -1], target_id)[0]
        flat = [a for c in COMPONENTS for a in acts[c]]
        grads = torch.autograd.grad(prob, flat, allow_unused=True)
    out, i = {}, 0
    for c in COMPONENTS:
        pairs = zip(flat[i : i + len(acts[c])], grads[i : i + len(acts[c])], strict=True)
        out[c] = torch.stack([(a * 0 if g is None else g).detach()[0].float() for a, g in pairs])
        i += len(acts[c])
    return out


def estimate_grid(
    base: RunCache,
    source: RunCache,
    grads: dict[str, torch.Tensor],
    component: str = "resid",
    window: int = 1,
) -> np.ndarray:
    """Estimated target probability [L, T] with each cell patched from ``source`` into ``base``:
    base.prob + sum over the window's layers m of (source - base)[m, t] . grad[m, t], clipped
    to [0, 1]. ``grads`` from ``target_grads`` on the base run."""
    diff = (source.component(component).float() - base.component(component).float()).cpu()
    per_layer = (diff * grads[component].cpu()).sum(-1)  # [L, T]
    n_layers = per_layer.shape[0]
    delta = torch.stack(
        [per_layer[list(window_layers(i, window, n_layers))].sum(0) for i in range(n_layers)]
    )
    return np.clip(base.prob + delta.double().numpy(), 0.0, 1.0)


def cells_to_refine(
    estimate: np.ndarray, p_base: float, p_reference: float, p_quantized: float, top: int
) -> list[tuple[int, int]]:
    """(layer, position) of the ``top`` cells whose estimated effect |estimate - p_base| is
    largest, and of each layer's best cell by estimated recovery (the views' per-layer
    summaries: ``PatchGrid.mean_best_recovery``, ``best_cell``), sorted, without repeats."""
    if top < 0:
        raise ValueError(f"top must be >= 0, got top={top}")
    order = np.argsort(-np.abs(estimate - p_base), axis=None, kind="stable")[:top]
    cells = {tuple(int(v) for v in np.unravel_index(k, estimate.shape)) for k in order}
    sign = 1.0 if p_reference >= p_quantized else -1.0
    best = np.argmax(sign * estimate, axis=1)
    cells |= {(i, int(t)) for i, t in enumerate(best)}
    return sorted(cells)
