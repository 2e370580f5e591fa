"""Activation patching (causal tracing), batched, with hooks that remove themselves.

A cell (l, t) replaces one activation of the *base* run at decoder layer l, position t, with the
*source* run's: "resid" is the residual stream entering layer l, "attn" the attention output of
layer l, "mlp" the MLP output of layer l (``window`` > 1 patches the layers centred on l, as ROME
does). The grid reads the target probability at the last position.

Batched, and only what a patch can change is computed: where the adapter allows it
(``Adapter.fast_path``) the decoder layers are called directly, grouped by position t. A patch
at (l, t) changes nothing before layer l (the row starts from the cached base input of layer l)
and nothing at positions before t (their keys and values come from the base run's cache, at
every layer), so each row computes positions t..T-1 of layers l..L-1 only, and logits at the
last position only. Rows starting at later layers join the batch as the layer loop reaches
them. Other architectures take the generic path: whole-model forwards over a batch of copies,
patched by hooks, logits at the last position only. Both are chunked to ``max_tokens`` query
tokens per forward.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qviz.cancel import check_cancel
from qviz.models.arch import Adapter
from qviz.probes.hooks import (
    attached,
    hidden_in,
    hidden_out,
    record_outputs,
    with_hidden_in,
    with_hidden_out,
)

COMPONENTS = ("resid", "attn", "mlp")
DIRECTIONS = ("restore", "corrupt")


@dataclass
class RunCache:
    """One run of a prompt (batch of 1), in the model's dtype and device.

    resid: [L+1, T, D] (index l = input of decoder layer l, L = output of the last layer);
    attn: [L, T, D] attention outputs; mlp: [L, T, D] MLP outputs; kv: per layer (keys, values)
    [1, H_kv, T, d_head] as the attention saw them (None unless asked for); prob: the target's
    probability at the last position.
    """

    resid: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    prob: float
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def component(self, name: str) -> torch.Tensor:
        """[L, T, D] activations of ``name`` (resid: the inputs of the L decoder layers)."""
        return {"resid": self.resid[:-1], "attn": self.attn, "mlp": self.mlp}[name]


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The decoder layers patched together for cell ``layer``: ``window`` layers centred on it.

    ROME's causal tracing rule: range(max(0, l - w // 2), min(L, l - (-w // 2))), clipped at the
    ends (so the window holds fewer layers near layer 0 and layer L - 1).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got window={window}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in 0..{n_layers - 1}, got layer={layer}")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _target_prob(logits: torch.Tensor, target_id: int) -> torch.Tensor:
    """logits [B, V] -> probability of ``target_id`` [B] (float32 softmax)."""
    return torch.softmax(logits.float(), dim=-1)[:, target_id]


def check_args(component: str, direction: str = "restore", window: int = 1) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got component={component!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got direction={direction!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got window={window!r}")


def run_cache(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, target_id: int, kv: bool = False
) -> RunCache:
    """One forward of ``input_ids`` [1, T] under the active weights, capturing every patchable
    activation (and the key/value cache when ``kv``); no hooks remain afterwards."""
    layers = adapter.decoder_layers(model)
    first: list = []
    with (
        attached() as h,
        record_outputs(layers, lambda x: x[0]) as resid,
        record_outputs([ly.get_submodule(adapter.attn) for ly in layers], lambda x: x[0]) as attn,
        record_outputs([ly.get_submodule(adapter.mlp) for ly in layers], lambda x: x[0]) as mlp,
    ):
        h.pre(layers[0], lambda m, a, kw: first.append(hidden_in(a, kw).detach()[0]))
        with torch.no_grad():
            out = model(input_ids, use_cache=kv)
    cache = None
    if kv:
        # (outputs of transformers >= 5.2x name it "cache"; reading past_key_values warns)
        pkv = out.cache if "cache" in out else out.past_key_values
        cache = [(lay.keys, lay.values) for lay in pkv.layers]
    prob = float(_target_prob(out.logits[:, -1], target_id)[0])
    return RunCache(
        torch.stack([first[0], *resid]), torch.stack(attn), torch.stack(mlp), prob, cache
    )


@contextmanager
def _replace_output(module: nn.Module, rows, pos, values) -> Iterator[None]:
    """Forward hook setting output[rows, pos] = values [n, D] (its hidden states)."""

    def hook(mod, args, out):
        x = hidden_out(out).clone()
        x[rows, pos] = values.to(x.dtype)
        return with_hidden_out(out, x)

    with attached() as h:
        h.post(module, hook)
        yield


@contextmanager
def _replace_input(layer: nn.Module, rows, pos, values) -> Iterator[None]:
    """Forward pre-hook setting hidden_states[rows, pos] = values [n, D]."""

    def pre(mod, args, kwargs):
        x = hidden_in(args, kwargs).clone()
        x[rows, pos] = values.to(x.dtype)
        return with_hidden_in(args, kwargs, x)

    with attached() as h:
        h.pre(layer, pre)
        yield


class _PrefixKV:
    """Stands in for a Cache: prepends the base run's keys/values of positions < t."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], t: int) -> None:
        self.kv, self.t = kv, t

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *a, **kw):
        if self.t == 0:
            return keys, values
        pk, pv = self.kv[layer_idx]
        b = keys.shape[0]
        pk = pk[:, :, : self.t].expand(b, -1, -1, -1)
        pv = pv[:, :, : self.t].expand(b, -1, -1, -1)
        return torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)


def _cells(
    n_layers: int, n_tokens: int, window: int, layers: Sequence[int] | None, positions
) -> list[tuple[int, int, range]]:
    ls = range(n_layers) if layers is None else layers
    ts = range(n_tokens) if positions is None else positions
    return [(int(i), int(t), window_layers(int(i), window, n_layers)) for t in ts for i in ls]


def _fast_grid(
    model,
    adapter,
    base: RunCache,
    source: RunCache,
    target_id,
    component,
    cells,
    max_tokens,
    cancel=None,
) -> dict[tuple[int, int], float]:
    layers = adapter.decoder_layers(model)
    n_layers, n_tok = len(layers), base.resid.shape[1]
    rotary = adapter.rotary_embedding(model)
    norm, head = adapter.unembedding(model)
    src = source.component(component)
    out: dict[tuple[int, int], float] = {}
    by_t: dict[int, list] = {}
    for c in cells:
        by_t.setdefault(c[1], []).append(c)
    dtype, device = base.resid.dtype, base.resid.device
    # transformers >= 5.2x names a decoder layer's cache argument "cache" ("past_key_values"
    # warns that it goes away); older ones only know "past_key_values"
    params = inspect.signature(type(layers[0]).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    for t, group in sorted(by_t.items()):
        q = n_tok - t
        pos = torch.arange(t, n_tok, device=device)[None]
        cos_sin = rotary(base.resid[:1, t:], position_ids=pos)
        keys = torch.arange(n_tok, device=device)
        mask = torch.zeros(1, 1, q, n_tok, dtype=dtype, device=device)
        mask.masked_fill_(keys[None, :] > pos[0, :, None], torch.finfo(dtype).min)
        prefix = _PrefixKV(base.kv, t)
        group = sorted(group, key=lambda c: c[2].start)
        rows_per = max(1, max_tokens // q)
        for c0 in range(0, len(group), rows_per):
            check_cancel(cancel, f"before the cells at position {t} of {n_tok}")
            chunk = group[c0 : c0 + rows_per]
            starts = [c[2].start for c in chunk]
            h = base.resid[starts[0], t:][None][:0]  # [0, q, D]
            for m in range(starts[0], n_layers):
                joining = [i for i, s in enumerate(starts) if s == m]
                if joining:
                    h = torch.cat([h, base.resid[m, t:][None].expand(len(joining), -1, -1)])
                rows = [i for i, c in enumerate(chunk[: h.shape[0]]) if m in c[2]]
                with ExitStack() as stack:
                    if rows:
                        r = torch.tensor(rows, device=device)
                        vals = src[m, t][None].expand(len(rows), -1)
                        if component == "resid":
                            h = h.clone()
                            h[r, 0] = vals
                        else:
                            mod = layers[m].get_submodule(getattr(adapter, component))
                            stack.enter_context(_replace_output(mod, r, 0, vals))
                    h = hidden_out(
                        layers[m](
                            h,
                            attention_mask=mask,
                            position_ids=pos,
                            use_cache=False,
                            **{cache_kw: prefix},
                            position_embeddings=cos_sin,
                        )
                    )
            probs = _target_prob(adapter.apply_softcap(model, head(norm(h[:, -1]))), target_id)
            for c, p in zip(chunk, probs.tolist(), strict=True):
                out[(c[0], c[1])] = p
    return out


def _generic_grid(
    model,
    adapter,
    input_ids,
    source: RunCache,
    target_id,
    component,
    cells,
    max_tokens,
    last_only: bool = True,
    cancel=None,
) -> dict[tuple[int, int], float]:
    layers = adapter.decoder_layers(model)
    n_tok = input_ids.shape[1]
    src = source.component(component)
    out: dict[tuple[int, int], float] = {}
    rows_per = max(1, max_tokens // n_tok)
    device = input_ids.device
    for c0 in range(0, len(cells), rows_per):
        check_cancel(cancel, f"before cell {c0 + 1} of {len(cells)}")
        chunk = cells[c0 : c0 + rows_per]
        with ExitStack() as stack:
            for m in sorted({m for c in chunk for m in c[2]}):
                rows = [i for i, c in enumerate(chunk) if m in c[2]]
                r = torch.tensor(rows, device=device)
                p = torch.tensor([chunk[i][1] for i in rows], device=device)
                vals = src[m, p]
                if component == "resid":
                    stack.enter_context(_replace_input(layers[m], r, p, vals))
                else:
                    mod = layers[m].get_submodule(getattr(adapter, component))
                    stack.enter_context(_replace_output(mod, r, p, vals))
            kw = {"logits_to_keep": 1} if last_only else {}
            with torch.no_grad():
                logits = model(input_ids.expand(len(chunk), -1), use_cache=False, **kw).logits
        probs = _target_prob(logits[:, -1], target_id)
        for c, p in zip(chunk, probs.tolist(), strict=True):
            out[(c[0], c[1])] = p
    return out


def per_cell_last(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    source: RunCache,
    target_id: int,
    component: str = "resid",
    window: int = 1,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    last_only: bool = True,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """Target probability [L, T], one whole-model forward of ``input_ids`` [1, T] per cell, the
    plain loop a user would write: the fair baseline of the batched grid. ``last_only``: logits
    at the last position only (else at every position, the old baseline). The model must carry
    the base run's weights; cells outside ``layers``/``positions`` are NaN."""
    check_args(component, window=window)
    n_layers, n_tok = adapter.n_layers(model), input_ids.shape[1]
    grid = np.full((n_layers, n_tok), np.nan)
    with torch.no_grad():
        for c in _cells(n_layers, n_tok, window, layers, positions):
            vals = _generic_grid(
                model, adapter, input_ids, source, target_id, component, [c], 1, last_only, cancel
            )
            grid[c[0], c[1]] = vals[(c[0], c[1])]
    return grid


def trace_grid(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    base: RunCache,
    source: RunCache,
    target_id: int,
    component: str = "resid",
    window: int = 1,
    max_tokens: int = 4096,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    method: str = "batched",
    cancel: threading.Event | None = None,
    cells: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Target probability [L, T] with each cell patched from ``source`` into the base run.

    The model must carry the base run's weights. ``base`` must hold the key/value cache
    (``run_cache(..., kv=True)``) for the fast path. ``layers``/``positions`` restrict the grid
    (other cells are NaN); ``cells``, a list of (layer, position), overrides them. ``method``:
    "batched" (default) or "per_cell", the plain loop of one full forward per cell (logits at
    every position), kept as the benchmark's baseline.
    ``cancel`` is checked before each chunk of cells (``qviz.cancel.Cancelled``). Batched cells
    whose patch writes values equal to the base run's own (e.g. the unquantized embeddings
    entering layer 0) take the base probability without a forward.
    """
    check_args(component, window=window)
    n_layers, n_tok = adapter.n_layers(model), input_ids.shape[1]
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    if cells is None:
        cells = _cells(n_layers, n_tok, window, layers, positions)
    else:
        cells = [(int(i), int(t), window_layers(int(i), window, n_layers)) for i, t in cells]
    vals: dict = {}
    if method == "batched":  # a patch that writes the base's own values changes nothing
        src, own = source.component(component), base.component(component)
        same = [c for c in cells if all(torch.equal(src[m, c[1]], own[m, c[1]]) for m in c[2])]
        vals = {(c[0], c[1]): base.prob for c in same}
        cells = [c for c in cells if (c[0], c[1]) not in vals]
    with torch.no_grad():
        if method == "per_cell":
            vals.update(
                _generic_grid(
                    model, adapter, input_ids, source, target_id, component, cells, 1, False, cancel
                )
            )
        elif method != "batched":
            raise ValueError(f"method must be 'batched' or 'per_cell', got method={method!r}")
        elif not cells:
            pass
        elif base.kv is not None and adapter.fast_path(model, n_tok):
            vals.update(
                _fast_grid(
                    model, adapter, base, source, target_id, component, cells, max_tokens, cancel
                )
            )
        else:
            vals.update(
                _generic_grid(
                    model,
                    adapter,
                    input_ids,
                    source,
                    target_id,
                    component,
                    cells,
                    max_tokens,
                    cancel=cancel,
                )
            )
    grid = np.full((n_layers, n_tok), np.nan)
    for (i, t), p in vals.items():
        grid[i, t] = p
    return grid
