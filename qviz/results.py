"""Result objects: plain dataclasses of numpy arrays with ``.to_frame()``; no plotting here.

Layer index 0 is the residual stream entering decoder layer 0 (the embedding output), index i
the output of decoder layer i; per-layer component statistics are indexed by decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class LayerMap:
    """values: [L+1, L+1] linear CKA, row = reference layer, column = quantized layer."""

    values: np.ndarray
    n_samples: int
    estimator: str
    reference: np.ndarray | None = None  # [L+1, L+1] reference-vs-reference CKA
    n_prompts: int = 1
    drop_first: bool = False  # the first (attention-sink) position left out of every prompt

    @property
    def difference(self) -> np.ndarray | None:
        """[L+1, L+1] quantized-vs-reference minus reference-vs-reference (None without it)."""
        return None if self.reference is None else self.values - self.reference

    @property
    def how(self) -> str:
        """How the map was computed, in words: "pooled over 32 prompts, first token left out"."""
        pooled = "1 prompt" if self.n_prompts == 1 else f"pooled over {self.n_prompts} prompts"
        tokens = "first token left out" if self.drop_first else "all tokens"
        return f"{pooled}, {tokens} ({self.n_samples} samples, {self.estimator})"

    def to_frame(self) -> pd.DataFrame:
        r, q = np.indices(self.values.shape)
        return pd.DataFrame(
            {"ref_layer": r.ravel(), "quant_layer": q.ravel(), "cka": self.values.ravel()}
        )

    @property
    def diagonal(self) -> np.ndarray:
        return np.diag(self.values)


@dataclass
class LensCurve:
    """Per state [L+1]: target probability, rank (1 = top) and logit; top-5 tokens per state."""

    prob: np.ndarray
    rank: np.ndarray
    logit: np.ndarray
    top_tokens: list[list[str]]


@dataclass
class LensTrajectory:
    """Logit lens of the target at the last position, reference vs quantized."""

    reference: LensCurve
    quantized: LensCurve
    target: str

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for model, c in (("reference", self.reference), ("quantized", self.quantized)):
            for i in range(len(c.prob)):
                rows.append(
                    {
                        "model": model,
                        "layer": i,
                        "prob": c.prob[i],
                        "rank": int(c.rank[i]),
                        "logit": c.logit[i],
                        "top1": c.top_tokens[i][0],
                    }
                )
        return pd.DataFrame(rows)


@dataclass
class AttentionStats:
    """[L, H]: normalized entropy of both patterns, and their JS divergence."""

    ref_entropy: np.ndarray
    quant_entropy: np.ndarray
    js: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        layer, head = np.indices(self.js.shape)
        return pd.DataFrame(
            {
                "layer": layer.ravel(),
                "head": head.ravel(),
                "ref_entropy": self.ref_entropy.ravel(),
                "quant_entropy": self.quant_entropy.ravel(),
                "js": self.js.ravel(),
            }
        )


@dataclass
class FFNStats:
    """[L]: gate sign flip rate, Jaccard of the top-1% neurons, cosine of the MLP outputs."""

    flip_rate: np.ndarray
    jaccard: np.ndarray
    out_cosine: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "layer": np.arange(len(self.flip_rate)),
                "flip_rate": self.flip_rate,
                "jaccard": self.jaccard,
                "out_cosine": self.out_cosine,
            }
        )


@dataclass
class ResidualStats:
    """[L+1]: cosine similarity and relative L2 error of the residual stream."""

    cosine: np.ndarray
    rel_l2: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"layer": np.arange(len(self.cosine)), "cosine": self.cosine, "rel_l2": self.rel_l2}
        )


@dataclass
class Verdict:
    """mode: "healthy" | "signal degradation" | "computation collapse" | "target not predicted"
    (the full-precision model misses the target: no quantization verdict, see ``warning``);
    evidence: named figures (``qviz.metrics.verdict.verdict``).

    ``signs``, ``sentence``, ``warning`` and ``labels`` are read from the evidence by the rule's
    own module, ``qviz.metrics.verdict``, so the words always match the figures.
    """

    mode: str
    evidence: dict = field(default_factory=dict)

    @property
    def signs(self) -> list[dict]:
        """Each sign: name, label, kind, value, threshold, seen, text (see ``metrics.verdict``)."""
        from qviz.metrics.verdict import signs

        return signs(self.evidence)

    @property
    def sentence(self) -> str:
        """The signs seen, with measured values and thresholds, in one sentence."""
        from qviz.metrics.verdict import sentence

        return sentence(self.mode, self.evidence)

    @property
    def warning(self) -> str | None:
        """Why there is no quantization verdict (the reference misses the target), else None."""
        from qviz.metrics.verdict import warning

        return warning(self.evidence)

    @property
    def labels(self) -> dict[str, str]:
        """A human label for each evidence key (the key itself where none is known)."""
        from qviz.metrics.verdict import EVIDENCE_LABELS

        return {k: EVIDENCE_LABELS.get(k, k) for k in self.evidence}

    def to_frame(self) -> pd.DataFrame:
        row = {"mode": self.mode, **self.evidence, "sentence": self.sentence}
        return pd.DataFrame([{**row, "warning": self.warning}])


@dataclass
class Comparison:
    """Everything ``Lab.compare`` measures for one plan against full precision."""

    plan_label: str
    prompts: list[str]
    cka: LayerMap
    lens: LensTrajectory
    attention: AttentionStats
    ffn: FFNStats
    residual: ResidualStats
    verdict: Verdict
    isolation: Isolation | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per decoder-layer output (1..L): the per-layer figures side by side."""
        n = len(self.ffn.flip_rate)
        idx = np.arange(1, n + 1)
        return pd.DataFrame(
            {
                "plan": self.plan_label,
                "layer": idx,
                "cka_diag": self.cka.diagonal[idx],
                "resid_cosine": self.residual.cosine[idx],
                "resid_rel_l2": self.residual.rel_l2[idx],
                "lens_prob_ref": self.lens.reference.prob[idx],
                "lens_prob_quant": self.lens.quantized.prob[idx],
                "lens_rank_quant": self.lens.quantized.rank[idx],
                "attn_entropy_quant": self.attention.quant_entropy.mean(1),
                "attn_js": self.attention.js.mean(1),
                "gate_flip_rate": self.ffn.flip_rate,
                "top1pct_jaccard": self.ffn.jaccard,
                "mlp_out_cosine": self.ffn.out_cosine,
            }
        )


@dataclass
class Evaluation:
    """Fact-recall accuracy; ``failure_subset``: indices reference-right, quantized-wrong."""

    plan_label: str
    accuracy: float
    reference_accuracy: float
    mean_rank: float
    reference_correct: list[int]
    failure_subset: list[int]
    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.frame


@dataclass
class PatchGrid:
    """Causal tracing over (decoder layer l, position t), target probability at the last position.

    prob: [L, T] target probability with the activation at (l, t) patched. ``direction`` is
    "restore" (reference activation into the quantized run) or "corrupt" (the reverse).
    recovery: [L, T] = (prob - p_quantized) / (p_reference - p_quantized), or None when the
    denominator is below ``eps`` (the plan does not change the target's probability);
    ``recovery_note`` then says so. ``window``: layers patched together, centred on l.
    exact: [L, T] bool, the cells patched exactly (None: every cell is exact); the others hold
    the attribution-patching estimate of a fast trace. estimate: [L, T] that first-order
    estimate of prob for every cell (None for an exact trace).
    """

    prob: np.ndarray
    recovery: np.ndarray | None
    recovery_note: str
    p_reference: float
    p_quantized: float
    tokens: list[str]
    target: str
    component: str
    direction: str
    window: int
    plan_label: str
    exact: np.ndarray | None = None
    estimate: np.ndarray | None = None

    @property
    def all_exact(self) -> bool:
        """Whether every cell was patched exactly (no estimated cell)."""
        return self.exact is None or bool(np.all(self.exact))

    @property
    def defined(self) -> bool:
        return self.recovery is not None

    @property
    def mean_best_recovery(self) -> float:
        """Mean over layers of each layer's best cell (max over positions); NaN when undefined."""
        if self.recovery is None:
            return float("nan")
        return float(np.mean(np.max(self.recovery, axis=1)))

    @property
    def best_cell(self) -> tuple[int, int] | None:
        """(layer, position) of the largest recovery; None when undefined."""
        if self.recovery is None:
            return None
        layer, pos = np.unravel_index(int(np.argmax(self.recovery)), self.recovery.shape)
        return int(layer), int(pos)

    @property
    def best_recovery(self) -> float:
        """Largest recovery over all cells (NaN when undefined)."""
        return float(np.max(self.recovery)) if self.recovery is not None else float("nan")

    def to_frame(self) -> pd.DataFrame:
        layer, pos = np.indices(self.prob.shape)
        rec = self.recovery if self.recovery is not None else np.full(self.prob.shape, np.nan)
        return pd.DataFrame(
            {
                "layer": layer.ravel(),
                "position": pos.ravel(),
                "token": [self.tokens[t] for t in pos.ravel()],
                "prob": self.prob.ravel(),
                "recovery": rec.ravel(),
            }
        )


@dataclass
class Isolation:
    """Each quantized decoder layer fed the reference input ("perfect input" test).

    cosine, rel_error: [L] mean token cosine and relative L2 error between the quantized layer's
    output and the reference layer's output on the same (reference) input. delta_cosine,
    delta_rel_error: [L] the same for the layers' updates (output minus input), which the shared
    residual copy does not dilute. ``broken``: layers whose update cosine is below
    ``qviz.metrics.verdict.BROKEN_LAYER_COSINE`` -- broken even on a perfect input.
    """

    cosine: np.ndarray
    rel_error: np.ndarray
    plan_label: str
    delta_cosine: np.ndarray | None = None
    delta_rel_error: np.ndarray | None = None

    @property
    def broken(self) -> list[int]:
        from qviz.metrics.verdict import BROKEN_LAYER_COSINE

        if self.delta_cosine is None:
            return []
        return [int(i) for i in np.flatnonzero(self.delta_cosine < BROKEN_LAYER_COSINE)]

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "layer": np.arange(len(self.cosine)),
                "cosine": self.cosine,
                "rel_error": self.rel_error,
            }
        )
        if self.delta_cosine is not None:
            frame["delta_cosine"] = self.delta_cosine
        if self.delta_rel_error is not None:
            frame["delta_rel_error"] = self.delta_rel_error
        return frame


@dataclass
class RepairReport:
    """The study's repair table on one plan's Failure Subset (accuracies in [0, 1]).

    amplification: accuracy per alpha; domino: accuracy of only_layers(range(k)) per k;
    domino_robust: the same on the Robust Subset (reference right, plan right; n_robust prompts).
    protected_amplification: accuracy per alpha with amplification on top of source protection
    (its peak layer chosen under the protected plan: protected_peak_layer).
    """

    plan_label: str
    n_failures: int
    baseline: float
    protected: float
    protect_label: str
    peak_layer: int
    amplification: dict[float, float]
    domino: dict[int, float]
    domino_robust: dict[int, float] = field(default_factory=dict)
    n_robust: int = 0
    protected_amplification: dict[float, float] = field(default_factory=dict)
    protected_peak_layer: int = -1

    @property
    def best_alpha(self) -> float:
        return max(self.amplification, key=lambda a: np.nan_to_num(self.amplification[a], nan=-1))

    @property
    def amplified(self) -> float:
        """Accuracy at the best alpha."""
        return self.amplification[self.best_alpha] if self.amplification else float("nan")

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"repair": "none", "setting": self.plan_label, "accuracy": self.baseline},
            {
                "repair": "source protection",
                "setting": self.protect_label,
                "accuracy": self.protected,
            },
        ]
        if self.amplification:
            rows.append(
                {
                    "repair": "amplification (best)",
                    "setting": f"alpha={self.best_alpha:g} at layer {self.peak_layer}",
                    "accuracy": self.amplified,
                }
            )
        rows += [
            {
                "repair": "amplification",
                "setting": f"alpha={a:g} at layer {self.peak_layer}",
                "accuracy": v,
            }
            for a, v in self.amplification.items()
        ]
        if self.protected_amplification:
            best = max(
                self.protected_amplification,
                key=lambda a: np.nan_to_num(self.protected_amplification[a], nan=-1),
            )
            rows += [
                {
                    "repair": "protection + amplification (best)",
                    "setting": f"alpha={best:g} at layer {self.protected_peak_layer}",
                    "accuracy": self.protected_amplification[best],
                }
            ]
            rows += [
                {
                    "repair": "protection + amplification",
                    "setting": f"alpha={a:g} at layer {self.protected_peak_layer}",
                    "accuracy": v,
                }
                for a, v in self.protected_amplification.items()
            ]
        rows += [
            {
                "repair": "domino",
                "setting": f"first {k} layers quantized",
                "accuracy": v,
                "robust_accuracy": self.domino_robust.get(k, np.nan),
            }
            for k, v in self.domino.items()
        ]
        frame = pd.DataFrame(rows)
        frame["n_failures"] = self.n_failures
        return frame


@dataclass
class MemoryTable:
    """Weight memory and fact-recall accuracy per plan (``Lab.memory_table``).

    rows: one dict per plan, in the order asked: plan (label), bits (the plan's bit-width, 16
    for full precision), mib (weight memory), effective_bits (stored bits per weight, scales
    and zeros included) and accuracy (NaN when not measured); n_facts: facts per accuracy.
    """

    rows: list[dict]
    n_facts: int = 0

    def to_frame(self) -> pd.DataFrame:
        cols = ["plan", "bits", "mib", "effective_bits", "accuracy"]
        return pd.DataFrame(self.rows, columns=cols)

    def row(self, plan_label: str) -> dict | None:
        """The row of ``plan_label`` (None when absent)."""
        return next((r for r in self.rows if r["plan"] == plan_label), None)


@dataclass
class Prescription:
    """The per-layer plan ``Lab.prescribe`` chose under a bits-per-weight budget.

    plan: the QuantPlan; choice [L] / bits [L]: each decoder layer's option label and bits;
    effective_bits: the plan's decoder bits per weight (scales included, no embeddings);
    sensitivity: [L, n_options] KL increase with only that layer quantized (calibration text);
    predicted_kl: the sum the allocation minimized; calib_kl: the final plan's measured joint KL;
    forward_passes: forwards the search spent (reference, suffix check, sensitivity, the
    allocation's and the fitting uniform plans measured whole, refinement moves);
    verdict: the check on a bundled fact prompt (None when skipped); baselines: one row per
    plan scored on held-out text (kind, plan, effective_bits, calib_kl, perplexity,
    fact_accuracy, forward_passes), the prescribed plan first.
    """

    plan: object
    budget_bits: float
    options: list[str]
    choice: list[str]
    bits: list[int]
    effective_bits: float
    sensitivity: pd.DataFrame
    predicted_kl: float
    calib_kl: float
    forward_passes: int
    verdict: Verdict | None = None
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_frame(self) -> pd.DataFrame:
        """One row per decoder layer: the chosen option, its bits and its sensitivity."""
        kl = [float(self.sensitivity.iloc[i][c]) for i, c in enumerate(self.choice)]
        return pd.DataFrame(
            {
                "layer": np.arange(len(self.choice)),
                "option": self.choice,
                "bits": self.bits,
                "kl_increase": kl,
            }
        )

    def comparison(self) -> pd.DataFrame:
        """The baselines frame with, per row, how much the prescription beats it: perplexity
        ratio (baseline / prescribed, > 1 = prescription better) and accuracy gain (points)."""
        df = self.baselines.copy()
        if df.empty:
            return df
        me = df.iloc[0]
        df["ppl_ratio_vs_prescribed"] = df["perplexity"] / me["perplexity"]
        df["acc_gain_of_prescribed"] = me["fact_accuracy"] - df["fact_accuracy"]
        df["prescribed_beats"] = (df["perplexity"] > me["perplexity"]) & (
            df["fact_accuracy"] <= me["fact_accuracy"]
        )
        df.loc[df.index[0], "prescribed_beats"] = False
        return df

    def summary(self, width: int = 36) -> str:
        """The comparison as text: one line per baseline, by how much the prescription beats it
        (perplexity, fact accuracy) and the forward passes each search spent; plan labels cut
        to ``width`` characters."""
        df = self.comparison()
        if df.empty:
            return "no baselines scored"
        me = df.iloc[0]
        beaten = df.iloc[1:]
        beaten = beaten[beaten["kind"] != "full precision"]
        lines = [
            f"prescribed {me['plan'][:width]}: {me['effective_bits']:.4f} bits/weight, "
            f"perplexity {me['perplexity']:.1f}, fact accuracy {me['fact_accuracy']:.3f}, "
            f"{int(me['forward_passes'])} forward passes; beats "
            f"{int(beaten['prescribed_beats'].sum())} of {len(beaten)} baselines at equal or "
            "lower budget"
        ]
        for _, r in df.iloc[1:].iterrows():
            word = "beats" if r["prescribed_beats"] else "LOSES TO"
            word = "vs" if r["kind"] == "full precision" else word
            pct = 100 * (r["perplexity"] / me["perplexity"] - 1)
            lines.append(
                f"  {word:<8} "
                f"{r['kind']:<16} {r['plan'][:width]:<{width}} {r['effective_bits']:.4f} b/w  "
                f"ppl {r['perplexity']:7.1f} ({pct:+6.1f}% vs prescribed)  "
                f"facts {r['fact_accuracy']:.3f} ({100 * r['acc_gain_of_prescribed']:+.1f} pts "
                f"for prescribed)  forward passes {int(r['forward_passes'])}"
            )
        return "\n".join(lines)
