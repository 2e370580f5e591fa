"""The quantization engine: materialize a plan's weights, cache them, swap them in, restore.

Original tensors are never modified: a plan's dequantized weights are new tensors, swapped in
by pointing each Parameter's ``.data`` at them and pointed back at the very same original
tensors on exit (so every parameter is ``torch.equal`` -- indeed identical -- to before).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from qviz.models.arch import Adapter, get_adapter, weight_layout
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.primitives import fake_quantize

DEFAULT_BUDGET = int(os.environ.get("QVIZ_CACHE_BYTES", 4 << 30))


@dataclass(frozen=True)
class Target:
    """A quantizable weight: dotted name, parameter, layout, decoder layer (-1: embeddings)."""

    name: str
    param: nn.Parameter
    layout: str
    layer: int


def targets(
    model: nn.Module, adapter: Adapter, plan: QuantPlan
) -> list[tuple[Target, QuantConfig]]:
    """Every weight ``plan`` quantizes, with its config (deduplicated for tied weights)."""
    layers = adapter.decoder_layers(model)
    plan.check_layers(len(layers))
    out, seen = [], set()
    for i, layer in enumerate(layers):
        cfg = plan.config_for(i)
        if cfg is None:
            continue
        for rel in adapter.linears:
            mod = layer.get_submodule(rel)
            out.append(
                (Target(f"{adapter.layers}.{i}.{rel}", mod.weight, weight_layout(mod), i), cfg)
            )
            seen.add(id(mod.weight))
    if plan.embeddings:
        for path in (adapter.embed, adapter.unembed):
            mod = model.get_submodule(path)
            if id(mod.weight) not in seen:
                layout = "out_in"  # embeddings [vocab, d] and unembeddings [vocab, d] alike
                out.append((Target(path, mod.weight, layout, -1), plan.default))
                seen.add(id(mod.weight))
    return out


def quantize_weight(w: torch.Tensor, layout: str, cfg: QuantConfig, name: str) -> torch.Tensor:
    """Fake-quantize one weight along its input dimension, whatever its layout."""
    if cfg.method != "rtn":
        raise NotImplementedError(
            f"method={cfg.method!r} needs calibration data: use QuantEngine.materialize "
            "(or qviz.quant.gptq.gptq_materialize), not quantize_weight"
        )
    if layout == "in_out":
        return fake_quantize(w.t(), cfg, name).t().contiguous()
    return fake_quantize(w, cfg, name)


def _stamp(t: Target, w: torch.Tensor) -> tuple[int, int]:
    """An O(1) fingerprint of an original weight: its storage and its parameter's version
    (bumped by in-place edits such as ``with torch.no_grad(): p.mul_(2)``)."""
    return w.data_ptr(), t.param._version


class QuantEngine:
    """Materializes and caches plans for one model; swaps them in under a per-model lock.

    ``budget_bytes`` bounds the LRU cache of materialized plans (``QVIZ_CACHE_BYTES``, 4 GiB by
    default). The most recently used plan is always kept, even when it alone is over budget.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter | None = None,
        budget_bytes: int = DEFAULT_BUDGET,
        tokenizer=None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # for GPTQ calibration; found from the model's path if None
        self.adapter = adapter or get_adapter(model)
        self.budget_bytes = int(budget_bytes)
        self.lock = threading.RLock()
        self._cache: OrderedDict[QuantPlan, dict[str, torch.Tensor]] = OrderedDict()
        self._sizes: dict[QuantPlan, int] = {}
        self._stamp: dict[str, tuple[int, int]] = {}
        self._targets: dict[QuantPlan, list[tuple[Target, QuantConfig]]] = {}
        self._active: list[dict[str, torch.Tensor]] = []  # originals saved by each open block
        self.materializations = 0

    # cache ------------------------------------------------------------------------------------
    def _originals(self, plan: QuantPlan) -> list[tuple[Target, QuantConfig, torch.Tensor]]:
        def original(t: Target) -> torch.Tensor:
            for saved in self._active:  # the outermost block that swapped it saved the original
                if t.name in saved:
                    return saved[t.name]
            return t.param.data

        return [(t, c, original(t)) for t, c in self.targets(plan)]

    def targets(self, plan: QuantPlan) -> list[tuple[Target, QuantConfig]]:
        """``targets(model, adapter, plan)``, memoized per plan (the module tree is fixed)."""
        if plan not in self._targets:
            self._targets[plan] = targets(self.model, self.adapter, plan)
        return self._targets[plan]

    def _check_stamps(self, items) -> None:
        """Drop every cached plan if an original weight was replaced or changed in place."""
        for t, _, w in items:
            stamp = _stamp(t, w)
            if self._stamp.setdefault(t.name, stamp) != stamp:
                self.clear()
                self._stamp = {t.name: _stamp(t, w) for t, _, w in items}
                return

    def materialize(
        self,
        plan: QuantPlan,
        cancel: threading.Event | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The plan's dequantized weights {name: tensor}, from the cache or computed now.

        ``cancel`` and ``on_progress(done, total)`` reach GPTQ (see ``gptq_materialize``); a
        cancelled run raises ``GPTQCancelled`` and caches nothing.
        """
        with self.lock:
            items = self._originals(plan)
            self._check_stamps(items)
            if plan in self._cache:
                self._cache.move_to_end(plan)
            else:
                if any(c.method == "gptq" for _, c, _ in items):
                    weights = self._materialize_gptq(plan, items, cancel, on_progress)
                else:
                    weights = {t.name: quantize_weight(w, t.layout, c, t.name) for t, c, w in items}
                self.materializations += 1
                self._cache[plan] = weights
                self._sizes[plan] = sum(w.numel() * w.element_size() for w in weights.values())
            while len(self._cache) > 1 and sum(self._sizes.values()) > self.budget_bytes:
                old, _ = self._cache.popitem(last=False)
                del self._sizes[old]
            return self._cache[plan]

    def clear(self) -> None:
        """Forget every materialized plan."""
        with self.lock:
            self._cache.clear()
            self._sizes.clear()

    def _materialize_gptq(
        self, plan: QuantPlan, items, cancel=None, on_progress=None
    ) -> dict[str, torch.Tensor]:
        """GPTQ over the decoder layers (bundled calibration text, verified disk cache) on the
        original weights; embeddings (if the plan has them) by round-to-nearest."""
        from qviz.quant.gptq import cached_gptq_materialize, calibration_ids

        calib = calibration_ids(
            self._calibration_tokenizer(),
            n_seq=int(os.environ.get("QVIZ_GPTQ_NSEQ", 128)),
            seq_len=int(os.environ.get("QVIZ_GPTQ_SEQLEN", 256)),
            vocab_size=getattr(getattr(self.model, "config", None), "vocab_size", None),
        )
        current = {t.name: t.param.data for t, _, _ in items}
        try:  # run calibration on the originals even inside another plan's block
            for t, _, w in items:
                t.param.data = w
            weights = cached_gptq_materialize(
                self.model, self.adapter, plan, calib, cancel=cancel, on_progress=on_progress
            )
        finally:
            for t, _, _ in items:
                t.param.data = current[t.name]
        for t, c, w in items:
            if t.name not in weights:  # embeddings: no Hessian for them, round-to-nearest
                weights[t.name] = quantize_weight(w, t.layout, replace(c, method="rtn"), t.name)
        return weights

    def _calibration_tokenizer(self):
        if self.tokenizer is None:
            path = getattr(getattr(self.model, "config", None), "_name_or_path", "")
            if path:
                try:
                    from transformers import AutoTokenizer

                    self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                except Exception:  # no tokenizer at hand: byte-level calibration ids
                    self.tokenizer = None
        return self.tokenizer

    @property
    def cached_plans(self) -> list[QuantPlan]:
        return list(self._cache)

    # swap -------------------------------------------------------------------------------------
    @contextmanager
    def quantized(self, plan: QuantPlan) -> Iterator[nn.Module]:
        """Swap ``plan``'s weights in for the block; restore the previous tensors on exit."""
        with self.lock:
            weights = self.materialize(plan)
            params = {t.name: t.param for t, _ in self.targets(plan)}
            saved = {name: p.data for name, p in params.items()}
            self._active.append(saved)
            try:
                for name, p in params.items():
                    p.data = weights[name]
                yield self.model
            finally:
                for name, p in params.items():
                    p.data = saved[name]
                self._active.pop()


_ENGINES: weakref.WeakKeyDictionary[nn.Module, QuantEngine] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model: nn.Module) -> QuantEngine:
    """The one engine (and lock and cache) of ``model``."""
    with _ENGINES_LOCK:
        if model not in _ENGINES:
            _ENGINES[model] = QuantEngine(model)
        return _ENGINES[model]


@contextmanager
def quantized(model: nn.Module, plan: QuantPlan) -> Iterator[nn.Module]:
    """``with quantized(model, plan):`` runs the block on the quantized weights."""
    with engine_for(model).quantized(plan) as m:
        yield m
