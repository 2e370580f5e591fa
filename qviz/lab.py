"""The Lab: the one object users script. It owns the model, the engine and activation caches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from qviz.data import load_facts, load_text
from qviz.models.arch import get_adapter
from qviz.models.load import load_model
from qviz.probes.capture import Capture, capture
from qviz.quant.config import QuantPlan
from qviz.quant.engine import engine_for
from qviz.results import (
    AttentionStats,
    Comparison,
    Evaluation,
    FFNStats,
    LayerMap,
    LensCurve,
    LensTrajectory,
    ResidualStats,
    Verdict,
)


class Lab:
    """Compare a model under quantization plans with its full-precision self.

    Thread-safe: one forward at a time per model (the engine's lock); callers never see another
    caller's plan. Reference activations are cached per prompt, quantized ones per (prompt, plan).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = get_adapter(model)
        self.engine = engine_for(model)
        if self.engine.tokenizer is None:
            self.engine.tokenizer = tokenizer  # GPTQ calibrates on text tokenized like the prompts
        self.name = name or getattr(model.config, "name_or_path", "model")
        self._acts: dict[tuple[str, QuantPlan], Capture] = {}
        self._acts_lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str = "smollm2-135m", **kw) -> Lab:
        """``Lab.load("smollm2-135m")``; any HF id or local directory (see ``load_model``)."""
        model, tok = load_model(name_or_path, **kw)
        return cls(model, tok, name=name_or_path)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @contextmanager
    def quantized(self, plan: QuantPlan):
        """The engine's context manager: ``plan``'s weights swapped in for the block."""
        with self.engine.quantized(plan) as m:
            yield m

    # inputs -----------------------------------------------------------------------------------
    def encode(self, prompt: str) -> torch.Tensor:
        """input_ids [1, T] on the model's device; ValueError for an empty prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        return ids.to(self.model.device)

    def target_id(self, target: str | int) -> int:
        """The token id of a single-token ``target``; ValueError showing how it tokenizes."""
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < self.model.config.vocab_size:
                raise ValueError(f"target id {target} is outside the vocabulary")
            return int(target)
        ids = self.tokenizer(target, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"target {target!r} must encode to exactly one token, but it is {len(ids)}: "
                f"{pieces}; pass its first piece {pieces[0] if pieces else ''!r} or a token id"
            )
        return ids[0]

    # activations ----------------------------------------------------------------------------
    def activations(self, prompt: str, plan: QuantPlan) -> Capture:
        """All captured activations of ``prompt`` under ``plan`` (cached)."""
        key = (prompt, plan)
        with self._acts_lock:
            if key in self._acts:
                return self._acts[key]
        ids = self.encode(prompt)
        with self.engine.quantized(plan):
            cap = capture(self.model, self.adapter, ids)
        with self._acts_lock:
            self._acts[key] = cap
        return cap

    # the study's diagnostics ----------------------------------------------------------------
    def compare(
        self,
        prompt: str | Sequence[str],
        target: str | int,
        plan: QuantPlan,
        cka_estimator: str = "biased",
        drop_first: bool = False,
    ) -> Comparison:
        """Every diagnostic of ``plan`` against full precision.

        ``prompt``: one prompt or a list, pooled for CKA, attention and FFN statistics (tokens as
        samples); the logit lens and the verdict's ranks use the first prompt and ``target``.
        """
        from qviz import metrics

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("compare needs at least one prompt")
        tid = self.target_id(target)
        ref = [self.activations(p, QuantPlan.none()) for p in prompts]
        qnt = [self.activations(p, plan) for p in prompts]
        s = 1 if drop_first else 0

        def pool(caps, field):
            return torch.cat([getattr(c, field)[:, s:] for c in caps], dim=1)

        ref_res, q_res = pool(ref, "resid"), pool(qnt, "resid")
        cka = LayerMap(
            metrics.cka_matrix(ref_res, q_res, estimator=cka_estimator).numpy(),
            n_samples=ref_res.shape[1],
            estimator=cka_estimator,
        )
        lens = LensTrajectory(
            self._lens(ref[0], tid), self._lens(qnt[0], tid), self.tokenizer.decode([tid])
        )
        ent_r = np.mean([metrics.normalized_entropy(c.attn).numpy() for c in ref], axis=0)
        ent_q = np.mean([metrics.normalized_entropy(c.attn).numpy() for c in qnt], axis=0)
        js = np.mean(
            [metrics.js_divergence(r.attn, q.attn).numpy() for r, q in zip(ref, qnt, strict=True)],
            0,
        )
        attention = AttentionStats(ent_r, ent_q, js)
        rg, qg = pool(ref, "gate"), pool(qnt, "gate")
        ffn = FFNStats(
            metrics.sign_flip_rate(rg, qg).numpy(),
            metrics.topk_jaccard(rg, qg).numpy(),
            metrics.output_cosine(pool(ref, "mlp_out"), pool(qnt, "mlp_out")).numpy(),
        )
        cos, rel = metrics.residual_drift(ref_res, q_res)
        residual = ResidualStats(cos.numpy(), rel.numpy())
        n = self.n_layers
        mid = slice(n // 3, max(n // 3 + 1, 2 * n // 3))
        verdict = Verdict(
            *metrics.verdict(
                cka.values.diagonal(),
                int(lens.reference.rank[-1]),
                int(lens.quantized.rank[-1]),
                ffn.flip_rate,
                float(ent_q[mid].mean()),
            )
        )
        return Comparison(plan.label, prompts, cka, lens, attention, ffn, residual, verdict)

    def _lens(self, cap: Capture, tid: int) -> LensCurve:
        from qviz import metrics

        norm = self.model.get_submodule(self.adapter.final_norm)
        head = self.model.get_submodule(self.adapter.unembed)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        states = cap.resid[:, -1].to(self.model.device, next(head.parameters()).dtype)
        with torch.no_grad():
            logits = metrics.logit_lens(states, norm, head, softcap=softcap).float().cpu()
        prob, rank, logit = metrics.target_stats(logits, tid)
        ids, _ = metrics.topk_tokens(logits, k=5)
        tops = [[self.tokenizer.decode([int(t)]) for t in row] for row in ids]
        return LensCurve(prob.numpy(), rank.numpy(), logit.numpy(), tops)

    # task level -------------------------------------------------------------------------------
    def _next_token_stats(
        self, prompts: list[str], targets: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 correctness and rank of each target after its prompt, under the active weights."""
        correct, ranks = [], []
        for p, t in zip(prompts, targets, strict=True):
            with torch.no_grad():
                logits = self.model(self.encode(p), use_cache=False).logits[0, -1].float()
            rank = int((logits > logits[t]).sum()) + 1
            correct.append(rank == 1)
            ranks.append(rank)
        return np.array(correct), np.array(ranks)

    def evaluate(self, plan: QuantPlan, prompts: list[dict] | None = None) -> Evaluation:
        """Fact-recall accuracy: the answer's first token is the top-1 next token.

        ``prompts``: dicts with "prompt" and "answer" (default: the bundled facts).
        """
        facts = prompts if prompts is not None else load_facts()
        texts = [f["prompt"] for f in facts]
        tids = [self.tokenizer(f["answer"], add_special_tokens=False).input_ids[0] for f in facts]
        with self.engine.quantized(QuantPlan.none()):
            ref_ok, _ = self._next_token_stats(texts, tids)
        with self.engine.quantized(plan):
            ok, ranks = self._next_token_stats(texts, tids)
        frame = pd.DataFrame(
            {
                "prompt": texts,
                "answer": [f["answer"] for f in facts],
                "relation": [f.get("relation", "") for f in facts],
                "reference_correct": ref_ok,
                "correct": ok,
                "rank": ranks,
            }
        )
        return Evaluation(
            plan.label,
            float(ok.mean()),
            float(ref_ok.mean()),
            float(ranks.mean()),
            [int(i) for i in np.flatnonzero(ref_ok)],
            [int(i) for i in np.flatnonzero(ref_ok & ~ok)],
            frame,
        )

    def perplexity(self, plan: QuantPlan, text: str | None = None, window: int = 512) -> float:
        """Perplexity of ``text`` (default: the bundled prose) in non-overlapping windows."""
        ids = self.tokenizer(
            text if text is not None else load_text(), return_tensors="pt"
        ).input_ids
        ids = ids.to(self.model.device)
        nll, count = 0.0, 0
        with self.engine.quantized(plan), torch.no_grad():
            for start in range(0, ids.shape[1] - 1, window):
                chunk = ids[:, start : start + window + 1]
                if chunk.shape[1] < 2:
                    break
                logits = self.model(chunk[:, :-1], use_cache=False).logits.float()
                nll += torch.nn.functional.cross_entropy(
                    logits[0], chunk[0, 1:], reduction="sum"
                ).item()
                count += chunk.shape[1] - 1
        return float(np.exp(nll / count))
