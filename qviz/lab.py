"""The Lab: the one object users script. It owns the model, the engine and activation caches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from qviz.data import load_facts, load_text
from qviz.metrics.lens import logit_lens as metrics_logit_lens
from qviz.metrics.tracing import RECOVERY_EPS, recovery
from qviz.models.arch import get_adapter
from qviz.models.load import load_model
from qviz.probes.capture import Capture, capture
from qviz.probes.patch import check_args, run_cache, trace_grid
from qviz.quant.config import QuantPlan
from qviz.quant.engine import engine_for
from qviz.results import (
    AttentionStats,
    Comparison,
    Evaluation,
    FFNStats,
    Isolation,
    LayerMap,
    LensCurve,
    LensTrajectory,
    PatchGrid,
    RepairReport,
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
        self._ref_stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

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
        isolation: bool = True,
    ) -> Comparison:
        """Every diagnostic of ``plan`` against full precision.

        ``prompt``: one prompt or a list, pooled for CKA, attention and FFN statistics (tokens as
        samples); the logit lens and the verdict's ranks use the first prompt and ``target``.
        ``isolation``: also run the perfect-input test (``isolate``) on the first prompt (one
        more forward) and add it to the verdict's evidence.
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
        iso = self.isolate(prompts[0], plan) if isolation else None
        verdict = Verdict(
            *metrics.verdict(
                cka.values.diagonal(),
                int(lens.reference.rank[-1]),
                int(lens.quantized.rank[-1]),
                ffn.flip_rate,
                float(ent_q[mid].mean()),
                isolation_delta_cosine=None if iso is None else iso.delta_cosine,
            )
        )
        return Comparison(
            plan.label, prompts, cka, lens, attention, ffn, residual, verdict, isolation=iso
        )

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
        self,
        prompts: list[str],
        targets: list[int],
        scale: tuple[int, float] | None = None,
        max_tokens: int = 4096,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 correctness and rank of each target after its prompt, under the active weights.

        Batched: prompts sorted by length, left-padded with an attention mask and explicit
        position ids (so padding changes nothing), logits at the last position only, at most
        ``max_tokens`` tokens per forward. ``scale=(p, alpha)`` multiplies the residual stream
        leaving decoder layer p by alpha (peak signal amplification).
        """
        encoded = [self.encode(p)[0] for p in prompts]
        correct = np.zeros(len(prompts), dtype=bool)
        ranks = np.zeros(len(prompts), dtype=np.int64)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        handle = None
        if scale is not None:
            layer, alpha = scale

            def amplify(mod, args, out):
                if isinstance(out, tuple):
                    return (out[0] * alpha, *out[1:])
                return out * alpha

            handle = self.adapter.decoder_layers(self.model)[layer].register_forward_hook(amplify)
        try:
            start = 0
            while start < len(order):
                stop = start + 1  # sorted by length: the batch is as wide as its last prompt
                while (
                    stop < len(order)
                    and (stop - start + 1) * len(encoded[order[stop]]) <= max_tokens
                ):
                    stop += 1
                width = len(encoded[order[stop - 1]])
                batch = order[start:stop]
                ids = torch.zeros(len(batch), width, dtype=torch.long, device=self.model.device)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    n = len(encoded[i])
                    ids[row, width - n :] = encoded[i]
                    mask[row, width - n :] = 1
                pos = (mask.cumsum(1) - 1).clamp_min(0)
                kw = {"attention_mask": mask, "position_ids": pos} if mask.min() == 0 else {}
                with torch.no_grad():
                    logits = self.model(ids, use_cache=False, logits_to_keep=1, **kw).logits
                logits = logits[:, -1].float()
                tid = torch.tensor([targets[i] for i in batch], device=logits.device)
                tgt = logits.gather(1, tid[:, None])
                r = ((logits > tgt).sum(1) + 1).cpu().numpy()
                ranks[batch] = r
                correct[batch] = r == 1
                start = stop
        finally:
            if handle is not None:
                handle.remove()
        return correct, ranks

    def _facts(self, prompts: list[dict] | None) -> tuple[list[dict], list[str], list[int]]:
        facts = prompts if prompts is not None else load_facts()
        texts = [f["prompt"] for f in facts]
        tids = [self.tokenizer(f["answer"], add_special_tokens=False).input_ids[0] for f in facts]
        return facts, texts, tids

    def _reference_stats(self, texts: list[str], tids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Full-precision correctness and ranks, cached per (prompts, targets)."""
        key = (tuple(texts), tuple(tids))
        with self._acts_lock:
            hit = self._ref_stats.get(key)
        if hit is None:
            with self.engine.quantized(QuantPlan.none()):
                hit = self._next_token_stats(texts, tids)
            with self._acts_lock:
                self._ref_stats[key] = hit
        return hit

    def evaluate(self, plan: QuantPlan, prompts: list[dict] | None = None) -> Evaluation:
        """Fact-recall accuracy: the answer's first token is the top-1 next token.

        ``prompts``: dicts with "prompt" and "answer" (default: the bundled facts). Prompts run
        in left-padded batches; the reference run is cached per prompt set.
        """
        facts, texts, tids = self._facts(prompts)
        ref_ok, _ = self._reference_stats(texts, tids)
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

    # causal tracing, isolation, repairs ------------------------------------------------------
    def trace(
        self,
        prompt: str,
        target: str | int,
        plan: QuantPlan,
        component: str = "resid",
        direction: str = "restore",
        window: int = 1,
        eps: float = RECOVERY_EPS,
        method: str = "batched",
        max_tokens: int = 4096,
    ) -> PatchGrid:
        """Causal tracing of ``target`` after ``prompt`` over every (decoder layer, position).

        ``direction="restore"``: the quantized run with the reference activation patched in at
        one cell; ``"corrupt"``: the reference run with the quantized activation patched in.
        ``component``: "resid" (input of layer l), "attn" or "mlp" (outputs of layer l);
        ``window``: layers patched together, centred on l. Returns a PatchGrid with prob [L, T]
        and recovery [L, T] (None, with ``recovery_note``, when the plan does not move the
        target's probability by ``eps``). ``method="per_cell"`` is the slow one-forward-per-cell
        baseline.
        """
        check_args(component, direction, window)
        ids = self.encode(prompt)
        tid = self.target_id(target)
        restore = direction == "restore"
        with self.engine.quantized(plan):
            q = run_cache(self.model, self.adapter, ids, tid, kv=restore)
        with self.engine.quantized(QuantPlan.none()):
            r = run_cache(self.model, self.adapter, ids, tid, kv=not restore)
        base, source, base_plan = (q, r, plan) if restore else (r, q, QuantPlan.none())
        with self.engine.quantized(base_plan):
            prob = trace_grid(
                self.model,
                self.adapter,
                ids,
                base,
                source,
                tid,
                component=component,
                window=window,
                max_tokens=max_tokens,
                method=method,
            )
        rec, note = recovery(prob, r.prob, q.prob, eps=eps)
        return PatchGrid(
            prob=prob,
            recovery=rec,
            recovery_note=note,
            p_reference=r.prob,
            p_quantized=q.prob,
            tokens=[self.tokenizer.decode([int(i)]) for i in ids[0]],
            target=self.tokenizer.decode([tid]),
            component=component,
            direction=direction,
            window=window,
            plan_label=plan.label,
        )

    def isolate(self, prompt: str, plan: QuantPlan) -> Isolation:
        """The "perfect input" test: every quantized decoder layer fed the reference input.

        One forward under ``plan`` in which each layer's input is replaced by the reference
        run's input of that layer; its output is compared with the reference layer's output
        (cosine, relative L2 error [L]) and so is its update, output minus input
        (``delta_cosine``, ``delta_rel_error`` [L]). A layer whose update is wrong on a perfect
        input is itself broken (computation collapse); one that is right is only fed noise.
        """
        from qviz import metrics

        ids = self.encode(prompt)
        with self._acts_lock:
            cap = self._acts.get((prompt, QuantPlan.none()))
        if cap is not None and cap.resid is not None:  # reuse compare()'s reference capture
            ref = cap.resid.to(self.model.device, self.model.dtype)
        else:
            with self.engine.quantized(QuantPlan.none()):
                ref = run_cache(self.model, self.adapter, ids, 0).resid  # [L+1, T, D]
        layers = self.adapter.decoder_layers(self.model)
        outs: list = [None] * len(layers)
        handles = []

        def feed(i):
            def pre(mod, args, kwargs):
                x = ref[i][None].to(self.model.dtype)
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            return pre

        def keep(i):
            def hook(mod, args, out):
                outs[i] = (out[0] if isinstance(out, tuple) else out).detach()[0]

            return hook

        try:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(feed(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(keep(i)))
            with self.engine.quantized(plan), torch.no_grad():
                self.model(ids, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        q_out = torch.stack(outs)
        cos, rel = metrics.residual_drift(ref[1:], q_out)
        dcos, drel = metrics.residual_drift(ref[1:] - ref[:-1], q_out - ref[:-1])
        return Isolation(
            cos.numpy(),
            rel.numpy(),
            plan.label,
            delta_cosine=dcos.numpy(),
            delta_rel_error=drel.numpy(),
        )

    def _lens_probs(self, texts: list[str], tids: list[int], max_tokens: int = 4096) -> np.ndarray:
        """Logit-lens probability [N, L+1] of each target at its prompt's last position, under the
        active weights (left-padded batches, as in ``_next_token_stats``)."""
        layers = self.adapter.decoder_layers(self.model)
        norm = self.model.get_submodule(self.adapter.final_norm)
        head = self.model.get_submodule(self.adapter.unembed)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        out = np.zeros((len(texts), len(layers) + 1))
        encoded = [self.encode(p)[0] for p in texts]
        rows_per = max(1, max_tokens // max(len(e) for e in encoded))
        states: list = [None] * (len(layers) + 1)  # [B, D] at the last position, per state

        def pre0(mod, args, kwargs):
            states[0] = (args[0] if args else kwargs["hidden_states"])[:, -1].detach()

        def keep(i):
            def hook(mod, args, o):
                states[i + 1] = (o[0] if isinstance(o, tuple) else o)[:, -1].detach()

            return hook

        handles = [layers[0].register_forward_pre_hook(pre0, with_kwargs=True)]
        try:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_hook(keep(i)))
            for s in range(0, len(texts), rows_per):
                chunk = list(range(s, min(s + rows_per, len(texts))))
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long, device=self.model.device)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    ids[row, width - len(encoded[i]) :] = encoded[i]
                    mask[row, width - len(encoded[i]) :] = 1
                pos = (mask.cumsum(1) - 1).clamp_min(0)
                tid = torch.tensor([tids[i] for i in chunk], device=self.model.device)
                with torch.no_grad():
                    self.model(
                        ids,
                        attention_mask=mask,
                        position_ids=pos,
                        use_cache=False,
                        logits_to_keep=1,
                    )
                    for j, st in enumerate(states):
                        logits = metrics_logit_lens(st, norm, head, softcap).float()
                        prob = torch.softmax(logits, -1).gather(1, tid[:, None])[:, 0]
                        out[chunk, j] = prob.cpu().numpy()
        finally:
            for h in handles:
                h.remove()
        return out

    def peak_layer(
        self, plan: QuantPlan, calibration: list[dict] | None = None, n_max: int = 32
    ) -> int:
        """The decoder layer whose output carries the most answer probability under ``plan``.

        Calibration: ``calibration`` facts (default: the bundled facts), at most ``n_max`` of them
        evenly spaced; the logit-lens probability of each one's answer at the last position is
        averaged over prompts and the best decoder layer is returned, the last layer excluded
        (see ``qviz.metrics.tracing.peak_layer``). One choice per plan: never per evaluated prompt.
        """
        from qviz.metrics.tracing import peak_layer as choose_peak

        facts = calibration if calibration is not None else load_facts()
        if not facts:
            raise ValueError("peak_layer needs at least one calibration fact")
        if len(facts) > n_max:
            facts = [facts[i] for i in np.linspace(0, len(facts) - 1, n_max).round().astype(int)]
        _, texts, tids = self._facts(facts)
        with self.engine.quantized(plan):
            probs = self._lens_probs(texts, tids)
        return choose_peak(probs)

    def repair_report(
        self,
        plan: QuantPlan,
        prompts: list[dict] | None = None,
        alphas: Sequence[float] = (1, 2, 3, 5, 7, 9),
        protect_n: int = 2,
        protect_bits: int = 8,
        domino: Sequence[int] = (1, 2, 3, 4, 5, 6),
        calibration: list[dict] | None = None,
    ) -> RepairReport:
        """The study's repair table: accuracy on ``plan``'s Failure Subset under each repair.

        Failure Subset: the ``prompts`` (default: bundled facts) the reference answers right and
        ``plan`` wrong; its baseline accuracy is 0 by construction. Repairs:
        - source protection: ``QuantPlan.protect_first(plan.default, protect_n, protect_bits)``;
        - peak signal amplification: the residual stream leaving the peak layer multiplied by
          each alpha, on ``plan`` alone and on top of source protection (the study's cumulative
          column: 0 -> 67.91 -> 75.19 on Llama-3.1-8B at 4 bits);
        - domino test: ``QuantPlan.only_layers(plan.default, range(k))`` for each k in
          ``domino`` (also reported on the Robust Subset: reference right, plan right).

        Amplification procedure (the study does not publish its own; this is qviz's). The peak
        layer is chosen once per plan (``Lab.peak_layer``): under the quantized plan, the
        logit-lens probability of the correct answer at the last position is averaged over
        calibration facts and the decoder layer with the highest mean wins. Calibration facts
        are never scored: ``calibration`` if given, else the prompts outside the Failure Subset
        (the Robust Subset and the facts the reference gets wrong; if there are none, the
        bundled facts not among ``prompts``), so no evaluated answer steers the repair. Why
        this layer: it is where the quantized model's answer signal is strongest; later layers
        read the stream through a norm and add their (degraded) updates to it, so scaling the
        stream there by alpha weights the peak signal alpha times more against everything added
        afterwards. The last layer is not eligible: its output goes straight into the final norm,
        which cancels any scale (as scaling the logits cannot change a top-1 answer). Every alpha
        is reported; "best" is the best of them on the evaluated subset, as in the study's table.
        """
        if plan.default is None:
            raise ValueError(
                f"repair_report needs a plan with a default config (e.g. QuantPlan.uniform), "
                f"got {plan.label!r}"
            )
        cfg = plan.default
        facts, texts, tids = self._facts(prompts)
        ev = self.evaluate(plan, facts)
        fail = ev.failure_subset
        robust = sorted(set(ev.reference_correct) - set(fail))

        def acc(p: QuantPlan, idx: list[int], scale=None) -> float:
            if not idx:
                return float("nan")
            with self.engine.quantized(p):
                ok, _ = self._next_token_stats(
                    [texts[i] for i in idx], [tids[i] for i in idx], scale=scale
                )
            return float(ok.mean())

        protect = QuantPlan.protect_first(cfg, n=protect_n, bits=protect_bits)
        if calibration is None:
            failed = set(fail)
            calibration = [f for i, f in enumerate(facts) if i not in failed]
            if not calibration:
                seen = set(texts)
                calibration = [f for f in load_facts() if f["prompt"] not in seen]
        peak = self.peak_layer(plan, calibration)
        peak_p = self.peak_layer(protect, calibration)
        n = self.n_layers
        ks = [int(k) for k in domino if 1 <= int(k) <= n]
        dom_plans = {k: QuantPlan.only_layers(cfg, range(k)) for k in ks}
        return RepairReport(
            plan_label=plan.label,
            n_failures=len(fail),
            baseline=acc(plan, fail),
            protected=acc(protect, fail),
            protect_label=protect.label,
            peak_layer=peak,
            amplification={float(a): acc(plan, fail, scale=(peak, float(a))) for a in alphas},
            protected_amplification={
                float(a): acc(protect, fail, scale=(peak_p, float(a))) for a in alphas
            },
            protected_peak_layer=peak_p,
            domino={k: acc(p, fail) for k, p in dom_plans.items()},
            domino_robust={k: acc(p, robust) for k, p in dom_plans.items()},
            n_robust=len(robust),
        )

    # dashboard support ------------------------------------------------------------------------
    def prepare(self, plan: QuantPlan, cancel=None, on_progress=None) -> None:
        """Materialize ``plan``'s weights now (cached by the engine); ``on_progress(done, total)``
        per decoder layer of calibrated methods; a set ``cancel`` raises qviz.cancel.Cancelled."""
        self.engine.materialize(plan, cancel=cancel, on_progress=on_progress)

    def memory_table(self, plans, n_facts: int = 0, cancel=None):
        """MemoryTable: weight MiB, effective bits and (``n_facts`` > 0) accuracy per plan."""
        from qviz.studies.memory import memory_table

        return memory_table(self, plans, n_facts=n_facts, cancel=cancel)
